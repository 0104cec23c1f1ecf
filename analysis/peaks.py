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

# Dense (no 2:4 sparsity) tensor-core TFLOPS per GPU from the vendors' datasheets; fp32 is the non-tensor-core
# rate. NVIDIA's datasheets print the sparse figure for tf32/bf16/fp16/fp8 (footnote "with sparsity"): halved here.
# fp16 and fp8 are the rates with fp32 accumulation, which is what PyTorch's GEMMs and torch._scaled_mm use.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # A100 datasheet (SXM4 and PCIe, 40 and 80 GB alike); A800 is the export A100 (NVLink cut, same compute).
    "a100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "a800": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    # H100 datasheet, SXM5 and PCIe columns. H800 is the export H100 (NVLink 400 GB/s, FP64 cut), same
    # tensor-core rates per form factor: H800 SXM = H100 SXM, H800 PCIe = H100 PCIe.
    "h100_sxm": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "h800": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},  # SXM
    "h100_pcie": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    "h800_pcie": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0},
    # H200 SXM and GH200 datasheets: the H100 SXM compute with more HBM (H200 NVL, lower clocks, is absent).
    "h200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "gh200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "h20": {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0, "fp8": 296.0},  # H20 datasheet
    "l40s": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0},  # L40S datasheet
    "l4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0},  # L4 datasheet
    "a10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},  # A10 datasheet
    # V100 datasheet, per form factor; Volta has no bf16 tensor cores (bf16 is unknown, not fp16's figure).
    "v100_sxm2": {"fp32": 15.7, "fp16": 125.0},
    "v100_pcie": {"fp32": 14.0, "fp16": 112.0},
    "v100s_pcie": {"fp32": 16.4, "fp16": 130.0},
    # Ada Lovelace architecture whitepaper, appendix table for the RTX 4090: GeForce cards run fp16/bf16/fp8
    # tensor cores at half rate with fp32 accumulation (bf16 165.2, fp16 165.2, fp8 330.3; tf32 82.6).
    "rtx4090": {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3},
    # Blackwell per GPU: the "Individual Blackwell GPU Specifications" rows of NVIDIA's GB200 NVL72 / HGX B200
    # specification table (with sparsity: fp8 10 / 9, fp16 and bf16 5 / 4.5, tf32 2.5 / 2.2 PFLOPS; fp32 80 / 75
    # TFLOPS). A GB200 superchip's GPU is configurable up to 1.2 kW, an HGX B200 up to 1 kW: separate entries.
    "b200": {"fp32": 75.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
    "gb200": {"fp32": 80.0, "tf32": 1250.0, "bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0},
    # AMD Instinct MI300X datasheet (dense).
    "mi300x": {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9},
}

# torch.cuda.get_device_name() -> table key. Each pattern matches one product and excludes its neighbours
# (word boundaries keep "B200" out of "NVIDIA GB200" and "H200" out of "NVIDIA GH200"; PCIe and NVL variants are
# excluded explicitly), so the order of this list does not matter and device_key refuses a name two patterns
# claim. Products with other clocks (H100 NVL, H200 NVL, A10G, RTX 4090 D, laptop parts, V100 SXM3) are
# deliberately absent: they report unknown rather than a neighbour's peak. Names as torch reports them:
# "NVIDIA A800-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe",
# "NVIDIA H800" (SXM), "NVIDIA H800 PCIe", "NVIDIA GH200 480GB", "Tesla V100-SXM2-32GB", "AMD Instinct MI300X".
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bA800\b", "a800"), (r"\bA100\b", "a100"),
    (r"\bH100\b.*\bPCIe\b", "h100_pcie"), (r"\bH100\b(?!.*\b(PCIe|NVL)\b).*\b(HBM3|SXM\d?)\b", "h100_sxm"),
    (r"\bH800\b.*\bPCIe\b", "h800_pcie"), (r"\bH800\b(?!.*\b(PCIe|NVL)\b)", "h800"),
    (r"\bH200\b(?!.*\b(PCIe|NVL)\b)", "h200"), (r"\bGH200\b", "gh200"), (r"\bH20\b", "h20"),
    (r"\bL40S\b", "l40s"), (r"\bL4\b", "l4"), (r"\bA10\b", "a10"),
    (r"\bV100-SXM2\b", "v100_sxm2"), (r"\bV100-PCIE\b", "v100_pcie"), (r"\bV100S-PCIE\b", "v100s_pcie"),
    (r"\bRTX 4090\s*$", "rtx4090"),
    (r"\bB200\b", "b200"), (r"\bGB200\b", "gb200"), (r"\bMI300X\b", "mi300x"),
]

BAICHUAN_7B = {"tflops_per_gpu": 182.0, "mfu": 0.583, "device": "a800", "dtype": "bf16",
               "gpus": 1000, "peak_tflops": 312.0}


def device_key(device_name: str) -> str | None:
    """Table key for a device name such as 'NVIDIA A800-SXM4-80GB', or None when it is not in the table.

    None too, with a warning, when two patterns claim the name: a table bug must read as unknown, never as
    whichever neighbour happens to come first."""
    keys = [key for pattern, key in _NAME_PATTERNS if re.search(pattern, device_name, flags=re.IGNORECASE)]
    if len(keys) > 1:
        log.warning("device name %r matches several peak-table entries %s: treated as unknown", device_name, keys)
    return keys[0] if len(keys) == 1 else None


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
    source: str  # "table:<key>", "measured" (+ " (host busy: not cached)"), "cached measurement", "override", "unknown"
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
    t0, host0, own0 = time.perf_counter(), host_cpu_s(), time.process_time()
    best, rates = measure_gemm_flops(dtype)
    wall = time.perf_counter() - t0
    busy = others_share(host0, own0, wall)
    per_layout = "; ".join(f"{layout} " + ", ".join(f"{n}: {r / 1e9:.1f}" for n, r in by_size.items())
                           for layout, by_size in rates.items())
    method = (f"CPU GEMM calibration: best of repeated square {dtype} matmuls in layouts NN/NT/TN with {threads} "
              f"threads (GFLOP/s by layout and size: {per_layout}), torch {torch.__version__}, measured "
              f"{time.strftime('%Y-%m-%d')} in {wall:.1f}s")
    if busy is not None and busy > BUSY_HOST_SHARE:
        # A peak measured while other processes held the cores is too low, and every later MFU on this machine
        # would read too high (seen: 86 GFLOP/s cached under load on a host that reaches ~190, then MFU 104%).
        log.warning("CPU peak calibration ran while other processes used %.0f%% of this host's CPU: the measured "
                    "%.1f GFLOP/s is used for this run only (MFU may read high) and measured again next time",
                    100 * busy, best / 1e9)
        return Peak(best, cpu_name(), dtype, "measured (host busy: not cached)",
                    f"{method}; {100 * busy:.0f}% of the host's CPU went to other processes meanwhile")
    cache[key] = {"flops": best, "method": method, "cpu": cpu_name(), "threads": threads, "dtype": dtype}
    _write_json_atomic(path, cache)
    return Peak(best, cpu_name(), dtype, "measured", method)


BUSY_HOST_SHARE = 0.25  # of the host's CPU taken by other processes during a calibration: above it, not cached


def host_cpu_s() -> float | None:
    """CPU seconds every process on this host has used since boot (/proc/stat: user, nice, system, irq, softirq,
    steal); None where there is no /proc."""
    try:
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(jiffies[:3]) + sum(jiffies[5:8])) / os.sysconf("SC_CLK_TCK")


def others_share(host0: float | None, own0: float, wall_s: float) -> float | None:
    """The share of this host's CPU that other processes used since (host0, own0), over wall_s seconds."""
    host1 = host_cpu_s()
    if host0 is None or host1 is None or wall_s <= 0:
        return None
    others = (host1 - host0) - (time.process_time() - own0)
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1))


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
