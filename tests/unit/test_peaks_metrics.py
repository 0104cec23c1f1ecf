import json
import logging
import math
import re
import time

import pytest

from analysis import peaks
from analysis.metrics import MetricsProcessor
from analysis.peaks import calibrate_cpu_peak, device_key, gpu_peak, measure_gemm_flops, table_peak_flops
from analysis.sinks import JsonlSink

NAME_KEYS = [
    ("NVIDIA A800-SXM4-80GB", "a800"), ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA A100-PCIE-40GB", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100_sxm"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H800", "h800"),
    ("NVIDIA H800 PCIe", "h800_pcie"), ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA H20", "h20"), ("NVIDIA A10", "a10"),
    ("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"), ("Tesla V100-SXM2-32GB", "v100_sxm2"),
    ("Tesla V100-PCIE-16GB", "v100_pcie"), ("Tesla V100S-PCIE-32GB", "v100s_pcie"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("AMD Instinct MI300X", "mi300x"),
    # Other clocks or SM counts than any table entry: unknown, never a neighbour's peak.
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA A10G", None), ("NVIDIA L40", None),
    ("NVIDIA GeForce RTX 4090 D", None), ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
    ("Tesla V100-SXM3-32GB", None), ("NVIDIA GeForce GTX 1080", None),
]


@pytest.mark.parametrize("name,key", NAME_KEYS)
def test_device_names_map_to_table_keys(name, key):
    assert device_key(name) == key


# Dense bf16 TFLOPS as published, typed here from the datasheets rather than read from the table (NVIDIA prints
# "with sparsity" figures: halved). Names are what torch.cuda.get_device_name() returns on each product.
DATASHEET_BF16_DENSE = [
    ("NVIDIA H100 80GB HBM3", 989.4),  # H100 SXM5: 1,979 sparse
    ("NVIDIA H100 PCIe", 756.0),  # H100 PCIe: 1,513 sparse
    ("NVIDIA H800 PCIe", 756.0),  # export H100 PCIe: same tensor cores
    ("NVIDIA H800", 989.4),  # export H100 SXM5
    ("NVIDIA H200", 989.4),  # H200 SXM: 1,979 sparse
    ("NVIDIA GB200", 2500.0),  # GB200 NVL72, per GPU: 5 PFLOPS sparse
    ("NVIDIA B200", 2250.0),  # HGX B200, per GPU: 4.5 PFLOPS sparse
    ("NVIDIA A800-SXM4-80GB", 312.0),  # export A100
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.05),  # 733 sparse
    ("NVIDIA H20", 148.0),
    ("NVIDIA GeForce RTX 4090", 165.2),  # Ada whitepaper: bf16 with fp32 accumulate, 330.4 sparse
]


@pytest.mark.parametrize("name,tflops", DATASHEET_BF16_DENSE, ids=[n for n, _ in DATASHEET_BF16_DENSE])
def test_real_device_names_get_their_own_datasheet_bf16_peak(name, tflops):
    peak = gpu_peak(name, "bf16")
    assert peak.flops == pytest.approx(tflops * 1e12) and peak.source.startswith("table:")


def test_neighbouring_products_get_their_own_fp8_and_tf32_peaks():
    # The defects this guards: H800 PCIe read as SXM, GB200 read as B200 ("B200" is a substring of "GB200").
    assert gpu_peak("NVIDIA H800 PCIe", "fp8").flops == pytest.approx(1513e12)
    assert gpu_peak("NVIDIA H800", "fp8").flops == pytest.approx(1978.9e12)
    assert gpu_peak("NVIDIA GB200", "fp8").flops == pytest.approx(5000e12)
    assert gpu_peak("NVIDIA B200", "fp8").flops == pytest.approx(4500e12)
    assert gpu_peak("NVIDIA GB200", "tf32").flops == pytest.approx(1250e12)
    assert gpu_peak("NVIDIA H100 PCIe", "tf32").flops == pytest.approx(378e12)


def test_each_real_name_is_claimed_by_exactly_one_pattern():
    # Order-independence: no name may depend on which of two matching patterns comes first.
    from analysis.peaks import _NAME_PATTERNS

    for name in {n for n, key in NAME_KEYS if key} | {n for n, _ in DATASHEET_BF16_DENSE}:
        claims = [key for pattern, key in _NAME_PATTERNS if re.search(pattern, name, flags=re.IGNORECASE)]
        assert len(claims) == 1, f"{name!r} is claimed by {claims}"


def test_a_name_two_patterns_claim_is_unknown(monkeypatch, caplog):
    import analysis.peaks as peaks

    monkeypatch.setattr(peaks, "_NAME_PATTERNS", [(r"B200", "b200"), (r"GB200", "gb200")])
    with caplog.at_level(logging.WARNING):
        assert device_key("NVIDIA GB200") is None
    assert "several peak-table entries" in caplog.text


def test_peak_table_values():
    assert table_peak_flops("a800", "bf16") == 312e12 == table_peak_flops("a100", "fp16")
    assert table_peak_flops("h100_sxm", "bf16") == pytest.approx(989.4e12)
    assert table_peak_flops("h100_pcie", "bf16") == 756e12
    assert table_peak_flops("l40s", "bf16") == pytest.approx(362.05e12)
    assert table_peak_flops("a100", "tf32") == 156e12 and table_peak_flops("a100", "fp32") == 19.5e12
    assert table_peak_flops("v100_sxm2", "bf16") is None  # no bf16 tensor cores: unknown, not fp16's figure


def test_unknown_gpu_gives_null_peak_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        peak = gpu_peak("NVIDIA Imaginary X9", "bf16")
    assert peak.flops is None and peak.source == "unknown"
    assert "MFU is reported as null" in caplog.text and "hardware.peak_tflops" in caplog.text
    m = MetricsProcessor(flops_per_token={c: 1e6 for c in ("6n", "palm", "causal", "hfu")}, peak_flops=peak.flops,
                         tokens_per_step=1000, world_size=1)
    row = m.step(1, loss=1.0, lr=1e-3, grad_norm=1.0, step_s=0.5, mem_peak_bytes=0)
    assert row["perf/mfu/palm"] is None and row["perf/tflops/palm"] == pytest.approx(2000 * 1e6 / 1e12)


def test_cpu_calibration_is_measured_then_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(peaks, "others_share", lambda *a: 0.0)  # a quiet host, whatever else runs beside the suite
    first = calibrate_cpu_peak("fp32", tmp_path)
    assert first.source == "measured" and first.flops > 1e9  # any CPU does > 1 GFLOP/s in fp32 GEMM
    assert "GEMM calibration" in first.method and "threads" in first.method
    again = calibrate_cpu_peak("fp32", tmp_path)
    assert again.source == "cached measurement" and again.flops == first.flops
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["dtype"] == "fp32"
    with pytest.raises(ValueError, match="no CPU GEMM calibration for dtype"):
        calibrate_cpu_peak("fp8", tmp_path)


def test_processor_computes_throughput_tflops_and_mfu():
    fpt = {"6n": 6e6, "palm": 8e6, "causal": 7e6, "hfu": 9e6}
    m = MetricsProcessor(flops_per_token=fpt, peak_flops=100e9, tokens_per_step=4096, world_size=2,
                         warmup_steps=1)
    for step, step_s in enumerate([9.0, 1.0, 2.0, 4.0], start=1):
        row = m.step(step, loss=5.0 - step, lr=1e-3, grad_norm=0.5, step_s=step_s, mem_peak_bytes=step * 10)
    assert row["perf/tokens_per_s"] == 1024 and row["perf/tokens_per_s_per_device"] == 512
    assert row["perf/tflops/palm"] == pytest.approx(512 * 8e6 / 1e12)
    assert row["perf/mfu/hfu"] == pytest.approx(512 * 9e6 / 100e9)
    s = m.summary({"device_type": "cpu", "device_name": "x", "dtype": "fp32", "peak_tflops": 0.1})
    assert s["median"]["perf/step_s"] == 2.0  # median of the steps after warm-up (1, 2, 4), not of 9
    assert s["loss"] == {"first": 4.0, "last": 1.0} and s["mem/peak_bytes"] == 40
    v = s["vs_baichuan_7b"]
    assert v["convention"] == "palm" and v["reference"]["tflops_per_gpu"] == 182.0
    assert v["mfu_ratio_to_58_3"] == pytest.approx(s["median"]["perf/mfu/palm"] / 0.583)
    assert "CPU" in v["meaning"]


def test_jsonl_sink_keeps_a_nonfinite_loss_as_null_with_a_flag(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.log({"step": 1, "train/loss": math.nan, "perf/step_s": 0.1})
    sink.close({})
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["train/loss"] is None and row["nonfinite"] == ["train/loss"] and row["perf/step_s"] == 0.1


def test_gemm_calibration_times_every_layout_a_training_step_uses():
    # nn.Linear forward is NT, its input gradient NN, its weight gradient TN; CPU kernels differ per layout.
    best, rates = measure_gemm_flops("fp32", sizes=(64, 128))
    assert set(rates) == {"NN", "NT", "TN"} and all(set(r) == {64, 128} for r in rates.values())
    assert best == max(r for by_size in rates.values() for r in by_size.values())


def test_mfu_above_100_percent_warns_once(caplog):
    m = MetricsProcessor(flops_per_token={c: 1e6 for c in ("6n", "palm", "causal", "hfu")}, peak_flops=1e6,
                         tokens_per_step=10, world_size=1)
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            m.step(step, loss=1.0, lr=1e-3, grad_norm=1.0, step_s=1.0, mem_peak_bytes=0)
    assert caplog.text.count("exceeds 100%") == 1


def test_a_calibration_on_a_busy_host_is_used_once_and_not_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(peaks, "others_share", lambda *a: 0.6)  # other processes held 60% of the CPU meanwhile
    peak = calibrate_cpu_peak("fp32", tmp_path)
    assert peak.flops > 1e9 and peak.source == "measured (host busy: not cached)" and "60%" in peak.method
    assert not (tmp_path / "cpu_peak.json").exists() and "used for this run only" in caplog.text


def test_the_host_share_of_other_processes_counts_what_they_ran():
    import subprocess
    import sys

    host0, own0, t0 = peaks.host_cpu_s(), time.process_time(), time.perf_counter()
    burn = subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                           "while time.process_time() - t < 0.5: pass"], check=True, timeout=60)
    share = peaks.others_share(host0, own0, time.perf_counter() - t0)
    assert burn.returncode == 0 and share is not None and share > 0.05  # another process's 0.5 CPU-seconds seen
