"""One command for a machine with one GPU (`make gpu-check`, at most about 8 minutes on an H100/H200):

    1. the `gpu`-marked tests (NCCL comm hook, fused kernels, fp8, ...), each file that has one;
    2. a Baichuan-7B-width stack (hidden 4096, 32 heads, ffn 11008, vocab 64000, seq 4096) with as many layers as
       the estimate says fit the card (at least 4), bf16, for each available fusion (sdpa, compiled, liger, fp8)
       x splitting (none, selective, full) x micro-batch (1, 2, 4): step time, tokens/s, MFU (palm) against the
       datasheet peak and against a bf16 GEMM peak measured here, CUDA peak memory against the estimate;
    3. `comm.bench` on a one-process NCCL group (before the rows, so the budget never skips it);
    4. gpu_check.json and gpu_check.md under --out.

    python -m experiments.gpu_check [--out DIR] [--budget-s 390] [--layers N] [--micro-batches 1 2 4] ...

Each row trains its own model from scratch (fp32 weights under bf16 autocast, fused AdamW, gradients kept
between steps as DDP's bucket views keep them, so the estimate of engine=ddp applies): `--warmup` steps, then
`--steps` timed ones; peak memory is the steady state's (reset after the warm-up). A row that cannot run here (a
library missing) says why; a row that runs out of memory is recorded as such, with its estimate, and the check goes
on. Rows stop starting once --budget-s is spent; those left are listed as skipped, never guessed.

`--device cpu --width small` runs the same code on a CPU (the tests use it); nothing GPU-specific is faked there:
the GPU sections say they were skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from analysis.flops import Recompute, flops_per_token
from analysis.peaks import cpu_name, gpu_peak, measure_gemm_flops
from comm.engines.ddp import DDPConfig
from comm.hooks import synchronizer
from experiments.memory import USABLE_FRACTION, MemoryEstimate, estimate_memory
from systems import capabilities as caps
from systems.fusion import FusionConfig, resolve
from systems.memory import total_memory_bytes
from systems.model import ModelConfig, build_model
from systems.precision import Precision
from systems.splitting import SplittingConfig
from systems.transforms import transform_model

REPO = Path(__file__).resolve().parents[1]
WIDTHS = {
    "baichuan_7b": ModelConfig(name="baichuan_7b_stack", n_layers=32, dim=4096, n_heads=32, ffn_dim=11008,
                               vocab_size=64000, max_seq_len=4096),
    "small": ModelConfig(name="small_stack", n_layers=4, dim=512, n_heads=8, ffn_dim=1376, vocab_size=8192,
                         max_seq_len=256),
}
_ELEMENTWISE = ("rmsnorm", "swiglu", "rope", "loss")
FUSIONS = {  # name -> (operators, compute dtype)
    "sdpa": (FusionConfig(attention="sdpa"), "bf16"),
    "compiled": (FusionConfig(attention="sdpa", **{op: "compiled" for op in _ELEMENTWISE}), "bf16"),
    "liger": (FusionConfig(attention="sdpa", **{op: "liger" for op in _ELEMENTWISE}), "bf16"),
    "fp8": (FusionConfig(attention="sdpa", **{op: "compiled" for op in _ELEMENTWISE}), "fp8"),
}
SPLITTINGS = {"none": SplittingConfig(), "selective": SplittingConfig(recompute_attention=True),
              "full": SplittingConfig(recompute_layers=True)}


@dataclasses.dataclass(frozen=True)
class Row:
    fusion: str
    splitting: str
    micro_batch: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for gpu_check.json/.md (default runs/gpu_check_<time>)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--width", default="baichuan_7b", choices=sorted(WIDTHS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: as many as fit, >= 4)")
    p.add_argument("--max-layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the width's, 4096)")
    p.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    p.add_argument("--splittings", nargs="+", default=list(SPLITTINGS), choices=list(SPLITTINGS))
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=390.0, help="stop starting rows after this many seconds")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-comm", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: run this on a GPU machine, or pass --device cpu --width small for the "
                "CPU smoke run")
    if min(args.micro_batches) < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--micro-batches must be >= 1, --steps >= 1 and --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers={args.layers} must be >= 1")
    seq = args.seq or WIDTHS[args.width].max_seq_len
    if seq > WIDTHS[args.width].max_seq_len:
        p.error(f"--seq={seq} exceeds the {args.width} width's {WIDTHS[args.width].max_seq_len}")
    args.seq = seq
    args.out = Path(args.out or REPO / "runs" / time.strftime("gpu_check_%Y-%m-%d_%H-%M-%S"))
    return args


def row_estimate(width: ModelConfig, layers: int, row: Row, seq: int, device: str) -> MemoryEstimate:
    fusion, dtype = FUSIONS[row.fusion]
    kernels = _kernels_or_sdpa(fusion, device, dtype)
    return estimate_memory(dataclasses.replace(width, n_layers=layers), seq=seq, micro_batch=row.micro_batch,
                           kernels=kernels, splitting=SPLITTINGS[row.splitting], compute_dtype=dtype,
                           engine_cfg=DDPConfig(), dp=1, bucket_bytes=0)


def _kernels_or_sdpa(fusion: FusionConfig, device: str, dtype: str) -> dict[str, str]:
    """The kernels a row runs, or (for sizing layers) what it would save were they available."""
    try:
        return resolve(fusion, device, "bf16" if dtype == "fp8" else dtype)
    except caps.Unavailable:
        return {"attention": "sdpa"}


def fit_layers(width: ModelConfig, rows: list[Row], seq: int, device: str, capacity: float, max_layers: int) -> int:
    """The most layers (4 at least, max_layers at most) for which every row's estimate fits the device."""
    best = 4
    for layers in range(4, max_layers + 1):
        if max(row_estimate(width, layers, r, seq, device).total for r in rows) > USABLE_FRACTION * capacity:
            break
        best = layers
    return best


def gemm_peak(device: torch.device) -> dict:
    """The best bf16 GEMM rate this device reaches (8192^3 on a GPU, timed with CUDA events), the realistic
    ceiling MFU is also held against."""
    if device.type != "cuda":
        flops, _ = measure_gemm_flops("bf16", sizes=(256, 512, 1024))
        return {"tflops": flops / 1e12, "method": "CPU bf16 GEMM calibration (analysis.peaks)"}
    n, best = 8192, 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3))
    return {"tflops": best / 1e12, "method": f"best of 5 x 10 bf16 {n}^3 matmuls, CUDA events"}


def run_row(width: ModelConfig, layers: int, row: Row, args, device: torch.device) -> dict:
    fusion, dtype = FUSIONS[row.fusion]
    splitting = SPLITTINGS[row.splitting]
    model_cfg = dataclasses.replace(width, n_layers=layers)
    out = {"fusion": row.fusion, "splitting": row.splitting, "micro_batch": row.micro_batch, "layers": layers}
    precision = Precision(compute_dtype=dtype)
    try:
        precision.check(device.type)
        resolve(fusion, device.type, "bf16" if dtype == "fp8" else dtype)
    except caps.Unavailable as e:
        return {**out, "status": "unavailable", "reason": str(e)}
    estimate = row_estimate(width, layers, row, args.seq, device.type)
    out["estimate_bytes"] = estimate.total
    out["estimate"] = estimate.as_dict()
    model = optimizer = None
    try:
        _reset_memory(device)
        torch.manual_seed(0)
        model = build_model(model_cfg, device)
        kernels = transform_model(model, fusion=fusion, splitting=splitting, precision=precision,
                                  device_type=device.type)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(0, model_cfg.vocab_size, (row.micro_batch, args.seq + 1), device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]
        times, sync = [], synchronizer(device)
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with precision.autocast(device.type):
                loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as DDP's bucket views keep them
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        fpt = flops_per_token(n_layers=layers, dim=width.dim, ffn_dim=width.ffn_dim, vocab_size=width.vocab_size,
                              seq_len=args.seq, recompute=Recompute(**splitting.recomputed(kernels)))
        tokens_per_s = row.micro_batch * args.seq / step_s
        out.update(status="ok", kernels=kernels, step_s=step_s, tokens_per_s=tokens_per_s,
                   tflops_palm=fpt["palm"] * tokens_per_s / 1e12, tflops_hfu=fpt["hfu"] * tokens_per_s / 1e12,
                   loss=float(loss))
        if device.type == "cuda":
            out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            out["estimate_error"] = estimate.total / out["peak_bytes"] - 1
    except torch.OutOfMemoryError as e:
        out.update(status="oom", reason=str(e).splitlines()[0])
    finally:
        del model, optimizer
        _reset_memory(device)
    return out


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_tests(device: torch.device, out_dir: Path) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no GPU: the gpu-marked tests skip themselves"}
    files = sorted({str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                    if "mark.gpu" in p.read_text()})
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--timeout=120",
           f"--junitxml={out_dir / 'gpu_tests.xml'}", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"status": "passed" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
            "files": files, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - t0,
            "output_tail": "\n".join(tail[-40:])}


def comm_bench(device: torch.device, out_dir: Path) -> dict:
    """comm.bench on a one-process NCCL group (torchrun, one worker)."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no GPU: NCCL needs one"}
    json_out = out_dir / "comm_bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "comm.bench",
           "--backend", "nccl", "--out", str(json_out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    result = {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
              "output_tail": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])}
    if json_out.exists():
        result["bench"] = json.loads(json_out.read_text())
    return result


def environment(device: torch.device) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": cpu_name(), "capabilities": caps.summary(),
           "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
        peak = gpu_peak(props.name, "bf16")
        env["datasheet_bf16_tflops"] = None if peak.flops is None else peak.flops / 1e12
        env["datasheet_source"] = peak.source
    return env


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """gpu_check.json (everything) and gpu_check.md (the table a person reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    env, datasheet, gemm = report["environment"], report["environment"].get("datasheet_bf16_tflops"), \
        report["gemm_peak"]["tflops"]
    lines = [f"# gpu-check: {env.get('gpu', env['device_type'])}, {env['date']}", "",
             f"torch {env['torch']}, Python {env['python']}, CPU {env['cpu']}; {report['width']} width, "
             f"{report['layers']} layers, seq {report['seq']}; bf16 GEMM peak measured {gemm:.1f} TFLOPS"
             + (f", datasheet {datasheet:.1f}" if datasheet else ""), "",
             "| fusion | splitting | micro-batch | step (s) | tokens/s | TFLOPS (palm) | MFU datasheet | "
             "MFU measured GEMM | peak mem (GiB) | estimate (GiB) | estimate error | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("status") != "ok":
            est = f"{r['estimate_bytes'] / 2**30:.1f}" if "estimate_bytes" in r else ""
            lines.append(f"| {r['fusion']} | {r['splitting']} | {r['micro_batch']} | | | | | | | {est} | | "
                         f"{r['status']}: {r.get('reason', '')[:90]} |")
            continue
        tf, peak = r["tflops_palm"], r.get("peak_bytes")
        mfu_sheet = f"{tf / datasheet:.1%}" if datasheet else "n/a"
        peak_gib = f"{peak / 2**30:.1f}" if peak else "n/a"
        error = f"{r['estimate_error']:+.1%}" if "estimate_error" in r else "n/a"
        lines.append(f"| {r['fusion']} | {r['splitting']} | {r['micro_batch']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {tf:.1f} | {mfu_sheet} | {tf / gemm:.1%} | {peak_gib} | "
                     f"{r['estimate_bytes'] / 2**30:.1f} | {error} | ok |")
    for name in ("tests", "comm"):
        section = report[name]
        lines += ["", f"**{name}**: {section['status']}" + (f" ({section.get('summary') or section.get('reason')})"
                                                           if section.get("summary") or section.get("reason") else "")]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    width = WIDTHS[args.width]
    rows = [Row(f, s, mb) for f in args.fusions for s in args.splittings for mb in args.micro_batches]
    capacity = total_memory_bytes(device)
    layers = args.layers or fit_layers(width, rows, args.seq, device.type, capacity, args.max_layers)
    print(f"[gpu-check] {args.width} width, {layers} layers, seq {args.seq}, {len(rows)} rows -> {args.out}",
          flush=True)
    report = {"width": args.width, "layers": layers, "seq": args.seq, "environment": environment(device),
              "tests": {"status": "skipped", "reason": "--skip-tests"} if args.skip_tests
              else gpu_tests(device, args.out)}
    print(f"[gpu-check] tests: {report['tests']['status']} {report['tests'].get('summary', '')}", flush=True)
    report["comm"] = {"status": "skipped", "reason": "--skip-comm"} if args.skip_comm else comm_bench(device, args.out)
    print(f"[gpu-check] comm.bench: {report['comm']['status']}", flush=True)
    report["gemm_peak"] = gemm_peak(device)
    report["rows"] = []
    for row in rows:
        if time.perf_counter() - t_start > args.budget_s:
            report["rows"].append({**dataclasses.asdict(row), "status": "skipped",
                                   "reason": f"--budget-s={args.budget_s:g} spent"})
            continue
        r = run_row(width, layers, row, args, device)
        report["rows"].append(r)
        print(f"[gpu-check] {row.fusion:8s} {row.splitting:9s} mb {row.micro_batch}: {r['status']}"
              + (f" {r['step_s']:.3f} s/step, {r['tflops_palm']:.1f} TFLOPS palm" if r["status"] == "ok" else
                 f" ({r.get('reason', '')[:120]})"), flush=True)
    report["seconds"] = time.perf_counter() - t_start
    json_path, md_path = write_report(report, args.out)
    print(md_path.read_text())
    print(f"[gpu-check] wrote {json_path} and {md_path} in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
