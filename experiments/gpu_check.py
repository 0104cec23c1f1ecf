"""One command for a machine with one GPU (`make gpu-check`, inside --budget-s, 8 minutes by default):

    1. the `gpu`-marked tests (NCCL comm hook, fused kernels, fp8, ...), each file that has one;
    2. communication: device-to-device copy bandwidth; with 2+ GPUs, `comm.bench` (NCCL all-reduce latency and bus
       bandwidth) over all of them. One GPU measures no collective, and says so (an all-reduce over one rank moves
       no data: it would time a copy);
    3. a Baichuan-7B-width stack (hidden 4096, 32 heads, ffn 11008, vocab 64000, seq 4096) with as many layers as
       the estimate says fit the card with headroom (at least 4), bf16, for each available fusion (sdpa, compiled,
       liger, fp8) x splitting (none, selective, full) x micro-batch (1, 2, 4): step time, tokens/s, MFU (palm)
       against the datasheet peak (fp8 rows: a FLOPs-weighted fp8/bf16 peak, docs/flops.md) and against a bf16
       GEMM peak measured here, CUDA peak memory (allocated and reserved) against the estimate;
    4. gpu_check.json and gpu_check.md under --out, rewritten after every phase and every row.

    python -m experiments.gpu_check [--out DIR] [--budget-s 480] [--layers N] [--micro-batches 1 2 4] ...

Made for one chance on a lent machine: every phase and row is isolated (a failure is a row marked ``error`` with
the exception's last line, a phase past its time a ``timeout``), every row is listed from the start (``pending``),
and the report is rewritten atomically after each, so a run killed at any moment leaves everything it measured.
Phases get a share of the one --budget-s; a row still running GRACE_S past the budget is cut (marked ``timeout``,
the report written, the process ended), since a hung CUDA kernel cannot be interrupted. Rows run in an order that
gives every fusion and every splitting one row before any gets a second, so a short budget still covers them all.

Each row trains its own model from scratch (fp32 weights under bf16 autocast, fused AdamW, gradients kept
between steps as DDP's bucket views keep them, so the estimate of engine=ddp applies): `--warmup` steps, then
`--steps` timed ones; peak memory is the steady state's (reset after the warm-up). A row that cannot run here (a
library missing) says why; a row that runs out of memory is recorded as such, with its estimate, and the check goes
on. Rows stop starting once --budget-s is spent; those left are listed as skipped, never guessed.

`--device cpu --width small` runs the same code on a CPU (the tests and CI's dry run use it; about a minute with
--budget-s 60); nothing GPU-specific is faked there: the GPU sections say they were skipped.
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
import threading
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
# Of --budget-s, the most each phase before the rows may take (the rows get the rest, and what a phase leaves).
PHASE_SHARE = {"tests": 0.30, "comm": 0.08}
GRACE_S = 30.0  # a row started within the budget may run this long past it before it is cut
HEADROOM = 0.90  # the heaviest row's estimate fills at most this much of the usable memory (estimates err ~10%)


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
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="the whole check's time: phases get a share, rows stop starting once it is spent")
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
        if max(row_estimate(width, layers, r, seq, device).total for r in rows) > \
                HEADROOM * USABLE_FRACTION * capacity:
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


def row_order(rows: list[Row]) -> list[Row]:
    """Rows reordered so that every fusion and every splitting gets a row before any gets its second (then the
    smaller micro-batch first): a budget cut short still covers each technique once."""
    left, order = list(rows), []
    fusions: dict[str, int] = {}
    splittings: dict[str, int] = {}
    while left:
        pick = min(left, key=lambda r: (fusions.get(r.fusion, 0), splittings.get(r.splitting, 0), r.micro_batch,
                                        rows.index(r)))
        left.remove(pick)
        order.append(pick)
        fusions[pick.fusion] = fusions.get(pick.fusion, 0) + 1
        splittings[pick.splitting] = splittings.get(pick.splitting, 0) + 1
    return order


def fp8_weighted_peak(fpt_palm: float, fp8_flops: float, device_name: str) -> float | None:
    """The peak an fp8 row's MFU is taken against: its FLOPs per token split between the fp8 GEMMs (the decoder's
    Float8Linear layers, at the fp8 peak) and the rest (attention, the bf16 LM head, at the bf16 peak), combined as
    the time each share would take at its own peak (docs/flops.md). None where the table knows no peak."""
    fp8, bf16 = gpu_peak(device_name, "fp8").flops, gpu_peak(device_name, "bf16").flops
    if not fp8 or not bf16:
        return None
    return fpt_palm / (fp8_flops / fp8 + (fpt_palm - fp8_flops) / bf16)


def last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


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
        step_model = torch.compile(model) if dtype == "fp8" else model  # torchao: float8 is fast only compiled
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
                loss = step_model(x, y)
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
            out["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            out["estimate_error"] = estimate.total / out["peak_bytes"] - 1
            if dtype == "fp8":  # the decoder's linears run in fp8, forward and backward (6 FLOPs per weight)
                fp8_flops = 6 * layers * (4 * width.dim**2 + 3 * width.dim * width.ffn_dim)
                peak = fp8_weighted_peak(fpt["palm"], fp8_flops, torch.cuda.get_device_name(device))
                out.update(peak_tflops=None if peak is None else peak / 1e12, fp8_flops_share=fp8_flops / fpt["palm"])
    except torch.OutOfMemoryError as e:
        out.update(status="oom", reason=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 (one row's failure is that row's result; the check goes on)
        out.update(status="error", reason=last_line(e))
    finally:
        del model, optimizer
        _reset_memory(device)
    return out


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def phase_commands(device: torch.device, out_dir: Path) -> dict[str, list[str] | str]:
    """The subprocess each phase runs, or why it does not run here."""
    if device.type != "cuda":
        return {"tests": "no GPU: the gpu-marked tests skip themselves"}
    files = sorted({str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                    if "mark.gpu" in p.read_text()})
    return {"tests": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--timeout=120",
                      f"--junitxml={out_dir / 'gpu_tests.xml'}", *files]}


def run_phase(cmd: list[str] | str, timeout_s: float) -> dict:
    """A subprocess phase, bounded: passed / failed / timeout (with its output so far), never an exception."""
    if isinstance(cmd, str):
        return {"status": "skipped", "reason": cmd}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, timeout_s),
                              check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return {"status": "timeout", "reason": f"still running after {timeout_s:.0f} s (its share of --budget-s)",
                "seconds": time.perf_counter() - t0, "output_tail": "\n".join(out.strip().splitlines()[-40:])}
    except OSError as e:
        return {"status": "error", "reason": last_line(e)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"status": "passed" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
            "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - t0,
            "output_tail": "\n".join(tail[-40:])}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy within one GPU: bytes copied per second (each byte is read and written: the memory
    traffic is twice that), best of 5 x 10 copies timed with CUDA events."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        end.synchronize()
        best = max(best, 10 * nbytes / (start.elapsed_time(end) / 1e3))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "copy_gb_s": best / 1e9, "memory_traffic_gb_s": 2 * best / 1e9}


def comm_phase(device: torch.device, out_dir: Path, timeout_s: float, gpus: int | None = None) -> dict:
    """What one machine's GPUs can say about communication: the copy bandwidth of one GPU, and NCCL's all-reduce
    (comm.bench under torchrun, one process per GPU) only where there are two or more."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no GPU: NCCL needs one"}
    gpus = torch.cuda.device_count() if gpus is None else gpus
    result = {"gpus": gpus}
    try:
        result["copy"] = copy_bandwidth(device)
    except Exception as e:  # noqa: BLE001
        result["copy"] = {"status": "error", "reason": last_line(e)}
    if gpus < 2:
        return {**result, "status": "ok", "collective": None,
                "reason": "1 GPU: no collective measured (an all-reduce over one rank moves no data)"}
    json_out = out_dir / "comm_bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
           "comm.bench", "--backend", "nccl", "--out", str(json_out)]
    result.update(run_phase(cmd, timeout_s))
    result["status"] = "ok" if result["status"] == "passed" else result["status"]
    if json_out.exists():
        result["collective"] = json.loads(json_out.read_text())
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
    """gpu_check.json (everything) and gpu_check.md (the table a person reads), each replaced atomically, so a run
    killed while writing leaves the previous version whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    _write_atomic(json_path, json.dumps(report, indent=1, default=str))
    env, datasheet = report["environment"], report["environment"].get("datasheet_bf16_tflops")
    gemm = (report.get("gemm_peak") or {}).get("tflops")
    lines = [f"# gpu-check: {env.get('gpu', env['device_type'])}, {env['date']}", "",
             f"torch {env['torch']}, Python {env['python']}, CPU {env['cpu']}; {report['width']} width, "
             f"{report['layers']} layers, seq {report['seq']}; "
             + (f"bf16 GEMM peak measured {gemm:.1f} TFLOPS" if gemm else "bf16 GEMM peak not measured")
             + (f", datasheet {datasheet:.1f}" if datasheet else "") + f"; {report.get('state', 'running')}", "",
             ("| fusion | splitting | micro-batch | step (s) | tokens/s | TFLOPS (palm) | MFU datasheet | "
              "MFU measured GEMM | peak alloc (GiB) | reserved (GiB) | estimate (GiB) | estimate error | status |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("status") != "ok":
            est = f"{r['estimate_bytes'] / 2**30:.1f}" if "estimate_bytes" in r else ""
            lines.append(f"| {r['fusion']} | {r['splitting']} | {r['micro_batch']} | | | | | | | | {est} | | "
                         f"{r['status']}{': ' + r['reason'][:90] if r.get('reason') else ''} |")
            continue
        tf, peak, reserved = r["tflops_palm"], r.get("peak_bytes"), r.get("reserved_bytes")
        sheet = r.get("peak_tflops", datasheet)  # fp8 rows: the FLOPs-weighted fp8/bf16 peak
        mfu_sheet = f"{tf / sheet:.1%}" if sheet else "n/a"
        mfu_gemm = f"{tf / gemm:.1%}" if gemm else "n/a"
        gib = [f"{b / 2**30:.1f}" if b else "n/a" for b in (peak, reserved)]
        error = f"{r['estimate_error']:+.1%}" if "estimate_error" in r else "n/a"
        lines.append(f"| {r['fusion']} | {r['splitting']} | {r['micro_batch']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {tf:.1f} | {mfu_sheet} | {mfu_gemm} | {gib[0]} | {gib[1]} | "
                     f"{r['estimate_bytes'] / 2**30:.1f} | {error} | ok |")
    for name in ("tests", "comm"):
        section = report[name]
        note = section.get("summary") or section.get("reason")
        lines += ["", f"**{name}**: {section['status']}" + (f" ({note})" if note else "")]
        if name == "comm" and isinstance(section.get("copy"), dict) and "copy_gb_s" in section["copy"]:
            lines[-1] += f"; device-to-device copy {section['copy']['copy_gb_s']:,.0f} GB/s"
    _write_atomic(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RowWatch:
    """Cuts a row that runs past its time: a hung kernel or compile cannot be interrupted from Python, so the row is
    marked ``timeout``, the rest ``skipped``, the report written, and the process ends (exit 124)."""

    def __init__(self, report: dict, out_dir: Path):
        self.report, self.out_dir, self._timer = report, out_dir, None

    def start(self, index: int, limit_s: float) -> None:
        self._timer = threading.Timer(limit_s, self._expire, (index, limit_s))
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self, index: int, limit_s: float) -> None:
        rows = self.report["rows"]
        rows[index] = {**rows[index], "status": "timeout",
                       "reason": f"still running after {limit_s:.0f} s (past --budget-s); the check stopped here"}
        for i in range(index + 1, len(rows)):
            rows[i] = {**rows[i], "status": "skipped", "reason": f"row {index} hung"}
        self.report["state"] = "stopped: a row hung"
        write_report(self.report, self.out_dir)
        print(f"[gpu-check] row {index} hung past {limit_s:.0f} s: report written to {self.out_dir}", flush=True)
        os._exit(124)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.out.mkdir(parents=True, exist_ok=True)
    width = WIDTHS[args.width]
    rows = row_order([Row(f, s, mb) for f in args.fusions for s in args.splittings for mb in args.micro_batches])
    capacity = total_memory_bytes(device)
    layers = args.layers or fit_layers(width, rows, args.seq, device.type, capacity, args.max_layers)
    print(f"[gpu-check] {args.width} width, {layers} layers, seq {args.seq}, {len(rows)} rows, budget "
          f"{args.budget_s:.0f} s -> {args.out}", flush=True)
    pending = {"status": "pending"}
    report = {"width": args.width, "layers": layers, "seq": args.seq, "budget_s": args.budget_s, "state": "running",
              "environment": environment(device), "tests": dict(pending), "comm": dict(pending), "gemm_peak": None,
              "rows": [{**dataclasses.asdict(r), **pending} for r in rows]}
    write_report(report, args.out)

    def share(name: str) -> float:  # a phase's time: its share of the budget, within what is left
        return max(0.0, min(PHASE_SHARE[name] * args.budget_s, deadline - time.perf_counter()))
    commands = phase_commands(device, args.out)
    report["tests"] = {"status": "skipped", "reason": "--skip-tests"} if args.skip_tests \
        else run_phase(commands.get("tests", "no gpu-marked tests here"), share("tests"))
    write_report(report, args.out)
    print(f"[gpu-check] tests: {report['tests']['status']} {report['tests'].get('summary', '')}", flush=True)
    try:
        report["comm"] = {"status": "skipped", "reason": "--skip-comm"} if args.skip_comm \
            else comm_phase(device, args.out, share("comm"))
    except Exception as e:  # noqa: BLE001
        report["comm"] = {"status": "error", "reason": last_line(e)}
    write_report(report, args.out)
    print(f"[gpu-check] comm: {report['comm']['status']} {report['comm'].get('reason', '')}", flush=True)
    try:
        report["gemm_peak"] = gemm_peak(device)
    except Exception as e:  # noqa: BLE001
        report["gemm_peak"] = {"tflops": None, "status": "error", "reason": last_line(e)}
    write_report(report, args.out)
    watch = RowWatch(report, args.out)
    took: dict[str, float] = {}  # the longest row so far of each fusion: what its next row is expected to take
    for i, row in enumerate(rows):
        left = deadline - time.perf_counter()
        expected = took.get(row.fusion, 0.0)
        if left <= 0 or expected > left:  # a row that would end past the budget is not started; cheaper ones may
            report["rows"][i] = {**dataclasses.asdict(row), "status": "skipped", "reason": (
                f"--budget-s={args.budget_s:g} spent" if left <= 0 else
                f"would not finish within --budget-s={args.budget_s:g} (a {row.fusion} row took {expected:.0f} s,"
                f" {left:.0f} s left)")}
            write_report(report, args.out)
            continue
        watch.start(i, left + GRACE_S)
        t_row = time.perf_counter()
        try:
            r = run_row(width, layers, row, args, device)
        finally:
            watch.stop()
        if r["status"] not in ("unavailable",):
            took[row.fusion] = max(took.get(row.fusion, 0.0), time.perf_counter() - t_row)
        report["rows"][i] = r
        write_report(report, args.out)
        print(f"[gpu-check] {row.fusion:8s} {row.splitting:9s} mb {row.micro_batch}: {r['status']}"
              + (f" {r['step_s']:.3f} s/step, {r['tflops_palm']:.1f} TFLOPS palm" if r["status"] == "ok" else
                 f" ({r.get('reason', '')[:120]})"), flush=True)
    report["seconds"] = time.perf_counter() - t_start
    report["state"] = "finished"
    json_path, md_path = write_report(report, args.out)
    print(md_path.read_text())
    print(f"[gpu-check] wrote {json_path} and {md_path} in {report['seconds']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
