"""Whole runs through the real entry point: `python -m experiments.train` and torchrun."""
import json

import pytest

from analysis.flops import CONVENTIONS
from tests.helpers import read_jsonl, run_entry

STEPS = 8


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = run_entry([f"hydra.run.dir={run_dir}", f"train.steps={STEPS}", "train.log_every=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_metrics_jsonl_has_one_row_per_step_with_every_metric(single_run):
    run_dir, _ = single_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    keys = {"train/loss", "train/lr", "train/grad_norm", "perf/step_s", "perf/tokens_per_s",
            "perf/tokens_per_s_per_device", "mem/peak_bytes"}
    keys |= {f"perf/{m}/{c}" for m in ("tflops", "mfu") for c in CONVENTIONS}
    for r in rows:
        assert keys <= r.keys()
        assert r["perf/step_s"] > 0 and 0 < r["perf/mfu/palm"] < 1.5 and r["mem/peak_bytes"] > 0
        assert r["perf/tflops/6n"] < r["perf/tflops/causal"] < r["perf/tflops/palm"]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5  # it learns
    assert rows[0]["train/lr"] < rows[4]["train/lr"]  # warm-up


def test_summary_sets_the_run_beside_baichuan_7b(single_run):
    run_dir, _ = single_run
    s = json.loads((run_dir / "summary.json").read_text())
    env = s["environment"]
    assert env["device_type"] == "cpu" and env["dtype"] == "fp32" and env["world_size"] == 1
    assert env["peak_source"] in ("measured", "cached measurement") and "GEMM calibration" in env["peak_method"]
    assert env["parameters"] == 1_444_480  # model=tiny
    v = s["vs_baichuan_7b"]
    assert v["reference"]["tflops_per_gpu"] == 182.0 and v["reference"]["mfu"] == 0.583
    assert v["achieved_mfu"] == s["median"]["perf/mfu/palm"] and "CPU" in v["meaning"]
    assert s["steps"] == STEPS and s["replicas"]["identical"]
    # The memory estimate made before anything was allocated, against the meter's count of what autograd saved.
    est = env["memory_estimate"]
    assert abs(est["activations"]["total"] / s["median"]["mem/activation_bytes"] - 1) < 0.02, est
    assert est["states"]["weights"] == 4 * env["parameters"] and est["total_bytes"] > est["activations"]["total"]


def test_run_directory_holds_config_tokenizer_and_offline_wandb(single_run):
    run_dir, proc = single_run
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "tokenizer.model").exists()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    out = proc.stdout + proc.stderr
    assert "loss" in out and "tok/s" in out and "TFLOPS" in out and "MFU" in out  # periodic console lines


def test_two_process_torchrun_ends_with_identical_parameters(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry([f"hydra.run.dir={run_dir}", "train.steps=4", "logging=disabled"], torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["environment"]["world_size"] == 2
    digests = s["replicas"]["parameter_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert s["environment"]["tokens_per_step"] == 2 * 8 * 128
    assert (run_dir / "train.log").exists() and (run_dir / "train_rank1.log").exists()
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 4  # rank 0 alone writes shared files


def test_fewer_files_than_ranks_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "only.txt").write_text("one document\n\nanother 123\n", encoding="utf-8")
    proc = run_entry([f"hydra.run.dir={tmp_path / 'run'}", f"data.data_dir={data}", "logging=disabled"],
                     torchrun_nproc=2, timeout=120)
    assert proc.returncode != 0
    assert "has 1 text files but the job has 2 ranks" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("checkpoint", ["off", "sync"])
def test_the_first_update_is_adamw_first_step(tmp_path, checkpoint):
    """Building a run must not touch the optimizer: torch's get_state_dict on a fresh AdamW initialises its state
    with a zero-gradient step, which would leave Adam's step count one ahead (first update 0.73 lr, not lr)."""
    from hydra import compose, initialize_config_dir

    from experiments.trainer import build_run, micro_batches
    from tests.helpers import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["train.steps=2", "logging=disabled", f"fault/checkpoint={checkpoint}"])
    run = build_run(cfg, tmp_path / "run")
    assert not run.engine.optimizer.state  # nothing stepped yet
    norm = run.engine.module.model.layers[0].input_layernorm.weight  # no weight decay: update = lr x m/sqrt(v)
    before = norm.detach().clone()
    run.engine.forward_backward(micro_batches(run), 1, lambda: run.precision.autocast("cpu"))
    lr = run.engine.step()["lr"]
    assert int(run.engine.optimizer.state[norm]["step"]) == 1
    moved = (norm.detach() - before).abs() / lr
    assert moved.median().item() == pytest.approx(1.0, abs=1e-3)  # Adam's first step moves each weight by lr
