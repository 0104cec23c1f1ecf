"""Techniques through the real entry point: a composed run, and bad combinations refused before any step."""
import json

import pytest

from systems import capabilities as caps
from tests.helpers import read_jsonl, run_entry


def test_composed_run_reports_activation_memory_hfu_and_kernels(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry([f"hydra.run.dir={run_dir}", "train.steps=3", "logging=disabled", "fusion=sdpa",
                      "splitting=all", "splitting.ce_chunk_tokens=256", "precision=bf16", "train.micro_batch_size=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all(r["mem/activation_bytes"] > 0 for r in rows)
    assert all(r["perf/tflops/hfu"] > r["perf/tflops/palm"] for r in rows)  # recomputation counted
    env = json.loads((run_dir / "summary.json").read_text())["environment"]
    assert env["dtype"] == "bf16" and env["precision"] == "bf16" and env["kernels"]["attention"] == "sdpa"
    assert env["splitting"]["chunked_ce"] and env["splitting"]["recompute_attention"]


@pytest.mark.skipif(caps.HAS_CUDA, reason="checks the CPU-only refusal")
@pytest.mark.parametrize("overrides,message", [
    (["fusion=flash"], "flash-attn needs a CUDA GPU; use fusion.attention=sdpa"),
    (["fusion=liger"], "fusion.rmsnorm=liger cannot run here"),
    (["precision=fp8"], "precision=fp8 needs a CUDA GPU"),
    (["precision=fp16", "precision.loss_scaling=none"], "fp16 without loss scaling"),
    (["splitting=full_recompute", "splitting.recompute_attention=true"], "would recompute twice"),
    (["fusion.attention=magic"], "fusion.attention='magic' is unknown"),
], ids=["flash_on_cpu", "liger_on_cpu", "fp8_on_cpu", "fp16_without_scaler", "double_recompute", "unknown_kernel"])
def test_bad_combinations_fail_at_start_up(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_entry([f"hydra.run.dir={run_dir}", "logging=disabled", *overrides], timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()  # before any training step
