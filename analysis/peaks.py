"""Peak FLOP/s per device and dtype: one table for GPUs, a measured GEMM rate for CPUs.

MFU divides achieved FLOP/s by these peaks. A GPU missing from the table is reported as unknown (MFU null),
never as another device's peak. A CPU has no datasheet figure that training can approach, so its peak is
measured: the best rate of large square GEMMs in the run's dtype over the operand layouts a training step uses,
with the run's thread count, cached per machine, thread count, dtype and torch version (``calibrate_cpu_peak``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) tensor-core TFLOPS from NVIDIA/AMD datasheets; fp32 is the non-tensor-core rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "a100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},  # SXM and PCIe alike
    "a800": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},  # export A100: same compute
    "h100_sxm": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "h800": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},  # SXM
    "h100_pcie": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "h200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},  # SXM
    "h20": {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0, "fp8": 296.0},
    "l40s": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},
    "l4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0},
    "a10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "v100": {"fp32": 15.7, "fp16": 125.0},  # SXM2; no bf16 tensor cores
    "b200": {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
    "mi300x": {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9},
}

# torch.cuda.get_device_name() -> table key, first match wins. Variants with other clocks or memory
# (H100 NVL, H200 NVL, A10G) are deliberately absent: they report unknown rather than a wrong peak.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"A800", "a800"), (r"A100", "a100"),
    (r"H100.*PCIe", "h100_pcie"), (r"H100.*(HBM3|SXM)", "h100_sxm"), (r"H800", "h800"),
    (r"H200(?!.*NVL)", "h200"), (r"\bH20\b", "h20"),
    (r"L40S", "l40s"), (r"\bL4\b", "l4"), (r"\bA10\b", "a10"), (r"V100", "v100"),
    (r"B200", "b200"), (r"MI300X", "mi300x"),
]

BAICHUAN_7B = {"tflops_per_gpu": 182.0, "mfu": 0.583, "device": "a800", "dtype": "bf16",
               "gpus": 1000, "peak_tflops": 312.0}


def device_key(device_name: str) -> str | None:
    """Table key for a device name such as 'NVIDIA A800-SXM4-80GB', or None when it is not in the table."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def table_peak_flops(key: str, dtype: str) -> float | None:
    """Peak FLOP/s of a table device in a dtype (fp32/tf32/bf16/fp16/fp8), or None when unknown."""
    tflops = PEAK_TFLOPS.get(key, {}).get(dtype)
    return None if tflops is None else tflops * 1e12


@dataclass
class Peak:
    """The peak MFU is measured against, and where it came from."""

    flops: float | None  # FLOP/s per device; None = unknown (MFU is then null)
    device: str  # what the peak describes, e.g. 'NVIDIA A800-SXM4-80GB' or the CPU model
    dtype: str
    source: str  # 'table:<key>', 'measured', 'cached measurement', 'override' or 'unknown'
    method: str  # one line a person can read


_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_CALIBRATION_VERSION = 2  # bump when the method changes, so stale cached peaks are measured again


def _cache_key(dtype: str, threads: int) -> str:
    import torch

    ident = f"v{_CALIBRATION_VERSION}|{cpu_name()}|{os.cpu_count()}|{platform.machine()}|{threads}|{dtype}|{torch.__version__}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


# Operand layouts a training step uses: NT is nn.Linear's forward (x @ W.T), NN its input gradient (g @ W),
# TN its weight gradient (g.T @ x). CPU libraries pick different kernels per layout: on an AVX2-only CPU, bf16
# NT/TN run ~15x faster than NN, so timing one layout can misstate the peak by an order of magnitude.
_LAYOUTS = {"NN": lambda a, b: a @ b, "NT": lambda a, b: a @ b.t(), "TN": lambda a, b: a.t() @ b}


def measure_gemm_flops(dtype: str, *, sizes: tuple[int, ...] = (256, 512, 1024, 2048),
                       budget_s: float = 0.25) -> tuple[float, dict[str, dict[int, float]]]:
    """Best FLOP/s of n x n GEMMs on the CPU over layouts, sizes and repeats, in the current thread count.

    The best repeat, not the median: a peak is what the hardware can do, and other processes on a shared
    machine only ever slow a repeat down. Per layout, sizes grow while the next size's matmul (8x the work) is
    predicted to take under 2 x ``budget_s``: a slow kernel then costs about a second instead of minutes.
    Returns (best FLOP/s, {layout: {n: FLOP/s}}).
    """
    import torch

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"no CPU GEMM calibration for dtype {dtype!r}; use one of {sorted(_TORCH_DTYPES)}")
    tdtype = getattr(torch, _TORCH_DTYPES[dtype])
    rates: dict[str, dict[int, float]] = {}
    for layout, matmul in _LAYOUTS.items():
        rates[layout] = {}
        for n in sizes:
            a, b = torch.randn(n, n).to(tdtype), torch.randn(n, n).to(tdtype)
            t0 = time.perf_counter()
            matmul(a, b)  # warm-up, and a first estimate of the cost of one call
            once = time.perf_counter() - t0
            times = []
            for _ in range(max(3, min(10, int(budget_s / max(once, 1e-6))))):
                t0 = time.perf_counter()
                matmul(a, b)
                times.append(time.perf_counter() - t0)
            rates[layout][n] = 2 * n**3 / min(times)
            if 8 * min(times) > 2 * budget_s:
                break
    return max(r for by_size in rates.values() for r in by_size.values()), rates


def calibrate_cpu_peak(dtype: str, cache_dir: str | Path, *, refresh: bool = False) -> Peak:
    """Measured CPU peak for ``dtype`` with this process's torch thread count, cached under cache_dir."""
    import torch

    threads = torch.get_num_threads()
    path = Path(cache_dir).expanduser() / "cpu_peak.json"
    key = _cache_key(dtype, threads)
    cache = _read_json(path)
    if key in cache and not refresh:
        entry = cache[key]
        return Peak(entry["flops"], cpu_name(), dtype, "cached measurement", entry["method"])
    t0 = time.perf_counter()
    best, rates = measure_gemm_flops(dtype)
    per_layout = "; ".join(f"{layout} " + ", ".join(f"{n}: {r / 1e9:.1f}" for n, r in by_size.items())
                           for layout, by_size in rates.items())
    method = (f"CPU GEMM calibration: best of repeated square {dtype} matmuls in layouts NN/NT/TN with {threads} "
              f"threads (GFLOP/s by layout and size: {per_layout}), torch {torch.__version__}, measured "
              f"{time.strftime('%Y-%m-%d')} in {time.perf_counter() - t0:.1f}s")
    cache[key] = {"flops": best, "method": method, "cpu": cpu_name(), "threads": threads, "dtype": dtype}
    _write_json_atomic(path, cache)
    return Peak(best, cpu_name(), dtype, "measured", method)


def gpu_peak(device_name: str, dtype: str) -> Peak:
    key = device_key(device_name)
    flops = table_peak_flops(key, dtype) if key else None
    if flops is None:
        log.warning("no peak FLOPS for %r in %s: MFU is reported as null. Set hardware.peak_tflops to the "
                    "device's dense %s peak to get MFU.", device_name, dtype, dtype)
        return Peak(None, device_name, dtype, "unknown", f"{device_name!r}/{dtype} is not in the peak table")
    return Peak(flops, device_name, dtype, f"table:{key}", f"datasheet dense {dtype} peak of {key}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
