"""The activation estimate against the saved-tensor meter: model=small, every splitting option x attention kernel x
precision (and the compiled elementwise kernels with --compiled), one forward and backward each.

    python -m experiments.bench_memory [--micro-batch 8] [--compiled] [--out docs/benchmarks/memory_estimate.json]

The meter counts the bytes autograd really saves (systems.memory.SavedTensorMeter); the estimate
(systems.memory.activation_estimate) is computed from the shapes alone, before anything is allocated, and is what
refuses a run that cannot fit. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from analysis.peaks import cpu_name
from systems.fusion import FusionConfig, apply_fusion, resolve
from systems.memory import SavedTensorMeter, activation_estimate
from systems.model import ModelConfig, build_model
from systems.precision import Precision
from systems.splitting import SplittingConfig, apply_splitting

CONF = Path(__file__).resolve().parents[1] / "conf"
SPLITTINGS = ("none", "selective_recompute", "full_recompute", "chunked_ce", "tiled_mlp", "all")


def load(group: str, name: str) -> dict:
    """An option YAML's own values (Hydra's ``defaults`` list and ``_target_`` dropped: the dataclass has the rest)."""
    node = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    return {k: v for k, v in node.items() if k not in ("defaults", "_target_")}


def measure(model_cfg: ModelConfig, splitting: SplittingConfig, fusion: FusionConfig, dtype: str,
            micro_batch: int) -> tuple[int, float]:
    """(bytes the meter counted, bytes estimated) for one forward of (micro_batch, max_seq_len) tokens."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    kernels = apply_fusion(model, fusion, device="cpu", compute_dtype=dtype, refused=splitting.refused_kernels())
    apply_splitting(model, splitting)
    idx = torch.randint(0, model_cfg.vocab_size, (micro_batch, model_cfg.max_seq_len + 1))
    meter = SavedTensorMeter(model.parameters())
    with meter, Precision(compute_dtype=dtype).autocast("cpu"):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    estimate = activation_estimate(model_cfg, seq=model_cfg.max_seq_len, micro_batch=micro_batch, kernels=kernels,
                                   splitting=splitting, compute_dtype=dtype)["total"]
    assert kernels == resolve(fusion, "cpu", dtype, splitting.refused_kernels())
    return meter.last_bytes, estimate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--compiled", action="store_true", help="also the compiled rmsnorm/swiglu/rope (slow: compiles)")
    p.add_argument("--out", default="docs/benchmarks/memory_estimate.json")
    args = p.parse_args()
    model_cfg = ModelConfig(**load("model", "small"))
    fusions = {"eager": FusionConfig(attention="eager"), "sdpa": FusionConfig(attention="sdpa")}
    if args.compiled:
        fusions["sdpa+compiled"] = FusionConfig(attention="sdpa", rmsnorm="compiled", swiglu="compiled",
                                                rope="compiled")
    rows = []
    print(f"{'splitting':22s} {'fusion':14s} {'dtype':5s} {'meter MiB':>10s} {'estimate MiB':>12s} {'ratio':>7s}")
    for split in SPLITTINGS:
        for fname, fusion in fusions.items():
            for dtype in ("fp32", "bf16"):
                meter, est = measure(model_cfg, SplittingConfig(**load("splitting", split)), fusion, dtype,
                                     args.micro_batch)
                rows.append({"splitting": split, "fusion": fname, "dtype": dtype, "meter_bytes": meter,
                             "estimate_bytes": est, "ratio": est / meter})
                print(f"{split:22s} {fname:14s} {dtype:5s} {meter / 2**20:10.2f} {est / 2**20:12.2f} "
                      f"{est / meter:7.4f}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |estimate / meter - 1| = {worst:.2e} over {len(rows)} configurations")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(),
                               "torch": torch.__version__, "model": "small", "seq": model_cfg.max_seq_len,
                               "micro_batch": args.micro_batch, "worst_relative_error": worst, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
