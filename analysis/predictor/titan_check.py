"""An independent check: torchtitan's published FSDP throughput, which the data set leaves out on purpose.

Never fitted, never in data/*.csv: these rows are predicted with the constants fitted on the calibration half and
compared, to see whether the predictor holds on a codebase (torchtitan: LLaMA-3 shapes, SwiGLU, RoPE, grouped-query
attention, FSDP2, torch.compile, float8) that the fit never saw. Rows as published (read 2026-12-03):

    pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Tables 1 and 3; 8 x H100 96GB HBM2e at 500 W
        per host, 400 Gb/s RDMA per GPU; seq 8192 from its llama3_8b.toml; local batch 2; selective op AC)
    pytorch/torchtitan benchmarks/llama3-8b_h200_202506_trainy-whitefiber.md (400 Gb/s CX-7 per GPU)
    pytorch/torchtitan docs/performance.md at 3faaa1a (64 x A100 80GB, FSDP2, local batch 1; network not stated)

Unstated: FSDP's reduction dtype (torchtitan's default reduces in fp32; bf16 as the alternative), NCCL's algorithm,
and the A100 cluster's network (8 or 4 NICs of 200 or 100 Gb/s).
"""
from __future__ import annotations

import statistics
from dataclasses import replace

from analysis.predictor.inputs import Cluster, ModelShape, Ranges, Techniques, get_gpu
from analysis.predictor.interval import predict_interval

SOURCE = "https://github.com/pytorch/torchtitan"
LLAMA3_8B = ModelShape(name="llama3_8b", n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       vocab_size=128256, max_seq_len=8192)
LLAMA3_70B = ModelShape(name="llama3_70b", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                        vocab_size=128256, max_seq_len=8192)
FSDP = Techniques(attention="flash", engine="zero3", reduce_bytes=4, recompute="selective")
COMPILED = replace(FSDP, fused_norm=True, fused_act=True, fused_rope=True)  # torch.compile per block
FP8 = replace(COMPILED, precision="fp8")
# (case, model, GPU, GPUs, NIC Gb/s per GPU or None, techniques, local batch, published tokens/s/GPU)
ROWS = [
    ("8B, 8 H100, FSDP", LLAMA3_8B, "h100_sxm", 8, 400, FSDP, 2, 5762),
    ("8B, 8 H100, FSDP + compile", LLAMA3_8B, "h100_sxm", 8, 400, COMPILED, 2, 6667),
    ("8B, 8 H100, FSDP + compile + float8", LLAMA3_8B, "h100_sxm", 8, 400, FP8, 2, 8532),
    ("8B, 128 H100, FSDP", LLAMA3_8B, "h100_sxm", 128, 400, FSDP, 2, 5605),
    ("8B, 128 H100, FSDP + compile", LLAMA3_8B, "h100_sxm", 128, 400, COMPILED, 2, 6514),
    ("8B, 128 H100, FSDP + compile + float8", LLAMA3_8B, "h100_sxm", 128, 400, FP8, 2, 8380),
    ("8B, 32 H200, FSDP + compile + float8", LLAMA3_8B, "h200", 32, 400, FP8, 2, 10938),
    ("8B, 64 H200, FSDP + compile + float8", LLAMA3_8B, "h200", 64, 400, FP8, 2, 10753),
    ("8B, 64 A100, FSDP2, selective op AC", LLAMA3_8B, "a100_80", 64, None, FSDP, 1, 2973),
    ("70B, 64 A100, FSDP2, full AC", LLAMA3_70B, "a100_80", 64, None, replace(FSDP, recompute="full"), 1, 331),
]


def check() -> dict:
    rows = []
    for case, model, gpu, gpus, nic, tech, mb, published in ROWS:
        cluster = Cluster(name=case, gpu=get_gpu(gpu), gpus=gpus, nics_per_node=8, nic_gbps=nic or 200.0)
        ranges = Ranges(reduce_bytes=(4, 2), nccl_algo=("auto", "ring"),
                        nics_per_node=() if nic else (8, 4), nic_gbps=() if nic else (200.0, 100.0))
        iv = predict_interval(model, cluster, tech, seq_len=8192, micro_batch=mb, ranges=ranges,
                              published_tokens_per_s=published)
        pred = iv.point.tokens_per_s_per_gpu
        rows.append({"case": case, "published": published, "predicted": pred, "error": (pred - published) / published,
                     "interval": [iv.low.tokens_per_s_per_gpu, iv.high.tokens_per_s_per_gpu],
                     "predicted_memory_gb": iv.point.peak_memory_bytes / 1e9})
    errs = [abs(r["error"]) for r in rows]
    return {"rows": rows, "mean_abs_error": statistics.fmean(errs), "source": SOURCE}


def format_check(result: dict) -> str:
    lines = [f"{'torchtitan row':<42} {'published':>9} {'predicted':>9} {'error':>7}  interval"]
    for r in result["rows"]:
        lo, hi = r["interval"]
        lines.append(f"{r['case']:<42} {r['published']:>9,} {r['predicted']:>9,.0f} {r['error']:>+7.1%}  "
                     f"[{lo:,.0f}, {hi:,.0f}]")
    lines.append(f"mean |error| {result['mean_abs_error']:.1%} over {len(result['rows'])} rows (never fitted)")
    return "\n".join(lines)
