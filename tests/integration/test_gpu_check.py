"""`make gpu-check`'s CPU side: argument handling, sizing the stack by the memory estimate, the report writer, and
that it runs where deepspeed, megatron-core and wandb are missing (a bare GPU machine)."""
import json
import subprocess
import sys

import pytest
import torch

from experiments import gpu_check
from experiments.memory import USABLE_FRACTION
from tests.helpers import REPO

SMOKE = ["--device", "cpu", "--width", "small", "--layers", "2", "--micro-batches", "1", "--steps", "1",
         "--warmup", "1", "--splittings", "none", "full"]


def test_cpu_smoke_run_writes_the_json_and_the_table(tmp_path):
    # deepspeed, megatron-core and wandb made unimportable: the check must not need them
    code = ("import sys\nfor m in ('deepspeed', 'megatron', 'wandb'): sys.modules[m] = None\n"
            "from experiments.gpu_check import main\nmain(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, *SMOKE, "--fusions", "sdpa", "liger", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {(r["fusion"], r["splitting"]): r for r in report["rows"]}
    assert set(rows) == {("sdpa", "none"), ("sdpa", "full"), ("liger", "none"), ("liger", "full")}
    for s in ("none", "full"):
        ok = rows[("sdpa", s)]
        assert ok["status"] == "ok" and ok["tokens_per_s"] > 0 and ok["tflops_palm"] > 0 and ok["layers"] == 2
        assert ok["kernels"]["attention"] == "sdpa" and ok["estimate_bytes"] > 0
        assert rows[("liger", s)]["status"] == "unavailable" and "CUDA" in rows[("liger", s)]["reason"]
    # full recomputation keeps less than none, in the estimate the table shows
    assert rows[("sdpa", "full")]["estimate"]["activations"]["total"] < \
        rows[("sdpa", "none")]["estimate"]["activations"]["total"]
    assert report["tests"]["status"] == "skipped" and report["comm"]["status"] == "skipped"
    assert report["gemm_peak"]["tflops"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| fusion | splitting | micro-batch |" in table and "unavailable" in table
    assert table.count("| ok |") == 2


def test_rows_past_the_budget_are_listed_as_skipped(tmp_path):
    report = gpu_check.main([*SMOKE, "--fusions", "sdpa", "--budget-s", "0", "--skip-tests", "--skip-comm",
                             "--out", str(tmp_path)])
    assert [r["status"] for r in report["rows"]] == ["skipped", "skipped"]
    assert "budget" in report["rows"][0]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused_with_what_to_do():
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr


def test_bad_arguments_are_refused():
    for argv in (["--device", "cpu", "--width", "small", "--seq", "100000"], ["--device", "cpu", "--layers", "0"],
                 ["--device", "cpu", "--micro-batches", "0"]):
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("capacity_gib,expect_min", [(141, 8), (80, 4), (16, 4)])
def test_the_stack_takes_as_many_layers_as_the_estimate_lets_fit(capacity_gib, expect_min):
    width, capacity = gpu_check.WIDTHS["baichuan_7b"], capacity_gib * 2**30
    rows = [gpu_check.Row(f, s, mb) for f in ("sdpa", "compiled") for s in ("none", "full") for mb in (1, 2, 4)]
    layers = gpu_check.fit_layers(width, rows, 4096, "cuda", capacity, max_layers=32)
    assert expect_min <= layers <= 32

    def heaviest(n):
        return max(gpu_check.row_estimate(width, n, r, 4096, "cuda").total for r in rows)

    if heaviest(layers) <= USABLE_FRACTION * capacity:  # it fits, and one more layer would not (or 32 reached)
        assert layers == 32 or heaviest(layers + 1) > USABLE_FRACTION * capacity
    else:
        assert layers == 4  # the floor the issue sets, even where 4 do not fit: those rows then record an OOM
