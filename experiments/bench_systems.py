"""Benchmark of the single-device techniques: baseline and every variant in one process, as ratios.

    python -m experiments.bench_systems                      # all three sections
    python -m experiments.bench_systems --sections techniques --model small --steps 12

Sections:
    techniques  fusion and splitting variants on --model in fp32 against the eager baseline
                (fusion=eager splitting=none): step time ratio, tokens/s, TFLOPS and MFU (palm), HFU, and the
                activation memory ratio (bytes saved for backward, systems.memory.SavedTensorMeter)
    precision   fp32, bf16 and fp16 on --precision-model (bf16/fp16 are slow on CPUs without native support:
                reported as measured)
    loss        the LM head + loss alone at vocab 64000, seq 2048, hidden 4096 (Baichuan-7B's head): saved
                activation bytes and time, full vs chunked cross-entropy
Every row trains through experiments.trainer like experiments.train does; medians exclude --warmup steps
(compilation happens there). Writes docs/benchmarks/systems_<date>.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from analysis.peaks import cpu_name
from experiments.bench_models import REPO, run_config
from systems.memory import SavedTensorMeter
from systems.model import cross_entropy_loss
from systems.splitting import chunked_loss

TECHNIQUES = {  # name -> overrides; the first is the baseline every ratio is against
    "eager (baseline)": ["fusion=eager", "splitting=none"],
    "sdpa": ["fusion=sdpa"],
    "compiled ops": ["fusion=compiled"],
    "compiled layers": ["fusion=compiled_layers"],
    "auto": ["fusion=auto"],
    "sdpa + chunked CE": ["fusion=sdpa", "splitting=chunked_ce"],
    "sdpa + tiled MLP": ["fusion=sdpa", "splitting=tiled_mlp"],
    "sdpa + selective recompute": ["fusion=sdpa", "splitting=selective_recompute"],
    "sdpa + full recompute": ["fusion=sdpa", "splitting=full_recompute"],
    "eager + selective recompute": ["fusion=eager", "splitting=selective_recompute"],
    "compiled ops + all splitting": ["fusion=compiled", "splitting=all"],
}
PRECISIONS = {"fp32": ["precision=fp32"], "bf16": ["precision=bf16"], "fp16": ["precision=fp16"]}


def table(rows: list[dict], base: dict) -> list[str]:
    out = ["| variant | step ms | step time ratio | tokens/s | TFLOPS (palm) | MFU palm | HFU | activation MB | "
           "activation ratio |", "|" + "---|" * 9]
    for r in rows:
        out.append(f"| {r['name']} | {r['step_ms']:.0f} | {r['step_ms'] / base['step_ms']:.2f} | "
                   f"{r['tokens_per_s']:,.0f} | {r['tflops_palm']:.4f} | {100 * r['mfu_palm']:.1f}% | "
                   f"{100 * r['mfu_hfu']:.1f}% | {r['activation_bytes'] / 2**20:.1f} | "
                   f"{r['activation_bytes'] / base['activation_bytes']:.2f} |")
    return out


def measure(name: str, overrides: list[str], args, run_dir: Path) -> dict:
    s = run_config(overrides, args.steps, args.warmup, run_dir)
    med = s["median"]
    return {"name": name, "overrides": overrides, "step_ms": 1e3 * med["perf/step_s"],
            "tokens_per_s": med["perf/tokens_per_s"], "tflops_palm": med["perf/tflops/palm"],
            "mfu_palm": med["perf/mfu/palm"], "mfu_hfu": med["perf/mfu/hfu"],
            "activation_bytes": med["mem/activation_bytes"], "kernels": s["environment"]["kernels"],
            "peak_tflops": s["environment"]["peak_tflops"], "loss_last": s["loss"]["last"]}


def loss_memory(vocab: int, seq: int, dim: int, chunks: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    hidden = torch.randn(seq, dim, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, dim) * 0.02)
    targets = torch.randint(0, vocab, (seq,))
    variants = {"full logits": cross_entropy_loss}
    variants.update({f"chunked, {c} tokens": chunked_loss(cross_entropy_loss, c) for c in chunks})
    rows = []
    for name, fn in variants.items():
        times = []
        for _ in range(repeats):
            meter = SavedTensorMeter([weight])
            t0 = time.perf_counter()
            with meter:
                loss = fn(hidden, weight, targets)
            loss.backward()
            times.append(time.perf_counter() - t0)
            hidden.grad = weight.grad = None
        rows.append({"name": name, "saved_bytes": meter.last_bytes, "seconds": statistics.median(times),
                     "loss": loss.item()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=["techniques", "precision", "loss"])
    p.add_argument("--model", default="small")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--precision-model", default="tiny")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--only", nargs="*", help="technique names to run (default: all)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    args = p.parse_args()
    result: dict = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(),
                             "threads": torch.get_num_threads(), "torch": torch.__version__,
                             "python": platform.python_version(), "args": vars(args)}}
    with tempfile.TemporaryDirectory() as tmp:
        if "techniques" in args.sections:
            chosen = {k: v for k, v in TECHNIQUES.items() if not args.only or k in args.only or k.endswith("(baseline)")}
            rows = [measure(name, [f"model={args.model}", f"train.micro_batch_size={args.micro_batch}", *ov], args,
                            Path(tmp) / f"t{i}") for i, (name, ov) in enumerate(chosen.items())]
            result["techniques"] = rows
            print(f"\n## techniques: model={args.model}, micro-batch {args.micro_batch}, fp32\n")
            print("\n".join(table(rows, rows[0])))
        if "precision" in args.sections:
            rows = [measure(name, [f"model={args.precision_model}", "train.micro_batch_size=2", "fusion=sdpa", *ov],
                            args, Path(tmp) / f"p{name}") for name, ov in PRECISIONS.items()]
            result["precision"] = rows
            print(f"\n## precision: model={args.precision_model}, micro-batch 2, sdpa (MFU against each dtype's "
                  "measured peak)\n")
            print("\n".join(table(rows, rows[0])))
    if "loss" in args.sections:
        rows = loss_memory(64000, 2048, 4096, [1024, 256], repeats=2)
        result["loss"] = rows
        base = rows[0]
        print("\n## loss: LM head + cross-entropy, vocab 64000, seq 2048, hidden 4096, fp32\n")
        print("| variant | saved MB | memory vs full | time s | time ratio | loss |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['saved_bytes'] / 2**20:.0f} | {base['saved_bytes'] / r['saved_bytes']:.1f}x "
                  f"less | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} | {r['loss']:.6f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"systems_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
