"""experiment=autotune: a real Optuna search through Hydra's sweeper on the tiny model. The task function returns the
objective, trials over the memory cap are recorded as infeasible and never launched, and the sweep directory gets
the best command line (which runs), the trials table and the plots."""
import json
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO, run_entry

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

CAP_GIB = 0.05  # on tiny, micro-batch 1-2 fits under it and 8 does not (estimates about 0.03 vs 0.07-0.09 GiB)


def test_an_autotune_sweep_returns_tokens_per_s_skips_infeasible_trials_and_writes_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(["-m", "experiment=autotune", "model=tiny", "train.steps=3", "train.summary_warmup_steps=1",
                      "fusion=sdpa", "precision=fp32", "engine=ddp", "comm/bucket=fixed", "comm/overlap=on",
                      "logging.wandb_mode=disabled", f"autotune.memory_cap_gib={CAP_GIB}",
                      "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={sweep}"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((sweep / "trials.json").read_text())
    trials = report["trials"]
    assert len(trials) == 4 and set(report["knobs"]) <= {"train.micro_batch_size", "splitting"}
    ok = [t for t in trials if t["status"] == "ok"]
    infeasible = [t for t in trials if t["status"] == "infeasible"]
    assert ok and infeasible and len(ok) + len(infeasible) == 4, trials
    for t in ok:  # trained: the objective is the run's steady-state median tokens/s
        job = sweep / str(t["trial"])
        summary = json.loads((job / "summary.json").read_text())
        assert t["objective"] == pytest.approx(summary["median"]["perf/tokens_per_s"]) and t["objective"] > 0
        assert t["estimate_gib"] <= CAP_GIB
        assert t["micro_batch_size"] * t["grad_accum_steps"] == 8  # the global batch is fixed
    for t in infeasible:  # never launched: no model, no metrics, no summary
        job = sweep / str(t["trial"])
        assert t["estimate_gib"] > CAP_GIB and t["objective"] == 0.0
        assert not (job / "summary.json").exists() and not (job / "metrics.jsonl").exists()

    # The sweeper got the returned floats: its best value is the best trained trial's tokens/s.
    best_value = max(t["objective"] for t in ok)
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == pytest.approx(best_value)
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["tokens_per_s"] == pytest.approx(best_value)
    command = (sweep / "best_command.txt").read_text().strip()
    assert command == best["command"] and command.startswith("python -m experiments.train experiment=autotune")
    assert f"train.grad_accum_steps={best['grad_accum_steps']}" in command
    assert (sweep / "best_config.yaml").exists() and "| trial |" in (sweep / "trials.md").read_text()
    for plot in ("autotune_objective.png", "autotune_knobs.png"):
        assert (sweep / plot).stat().st_size > 1000
    # All trials share one wandb group (the multirun's).
    groups = {json.loads((sweep / str(t["trial"]) / "autotune_trial.json").read_text())["wandb_group"]
              for t in trials}
    assert groups == {f"sweep-{sweep.name}"}

    # The best command is ready to run (two steps here); the report can be written again from the command line.
    run_dir = tmp_path / "best_run"
    args = shlex.split(command)[3:] + ["train.steps=2", f"hydra.run.dir={run_dir}"]
    rerun = run_entry(args, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    again = subprocess.run([sys.executable, "-m", "experiments.autotune", str(sweep)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["counts"] == {"ok": len(ok), "infeasible": len(infeasible), "failed": 0}
