"""experiment=autotune: a real Optuna search through Hydra's sweeper on the tiny model. The task function returns the
objective, trials over the memory cap are recorded as infeasible and never launched, a conditional knob is searched
only under its option, and the sweep ends with a best command line and YAML that run, and a report with the
trials table and plots."""
import json
import shlex

import pytest
import yaml

from tests.helpers import run_entry

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

# On tiny (fp32, no splitting) the estimate is about 0.04 GiB at micro-batch 2, 0.06 at 4 and 0.09 at 8.
CAP_GIB = 0.07


def test_an_autotune_sweep_returns_tokens_per_s_never_launches_infeasible_trials_and_writes_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(["-m", "experiment=autotune", "model=tiny", "train.steps=3", "train.summary_warmup_steps=1",
                      "train.micro_batch_size=2,4,8", "fusion=sdpa", "splitting=none", "precision=fp32",
                      "engine=ddp", "comm/bucket=fixed", "logging=disabled", f"autotune.memory_cap_gib={CAP_GIB}",
                      # the memory-first seed (micro-batch 4, the largest under the cap), then seeded random
                      # draws (n_startup_trials=10: no TPE step, whose picks would follow the noisy timings)
                      "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.n_startup_trials=10",
                      f"hydra.sweep.dir={sweep}"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((sweep / "report" / "report.json").read_text())["autotune"]
    trials = report["trials"]
    assert len(trials) == 6
    # The knobs: micro-batch and overlap from the preset's space, and the bucket size because comm/bucket=fixed
    # (autotune.conditional); the other groups were fixed on the command line.
    assert set(report["knobs"]) <= {"train.micro_batch_size", "comm/overlap", "comm.bucket.bucket_cap_mb"}
    assert all("comm.bucket.bucket_cap_mb" in t["values"] for t in trials)
    assert trials[0]["values"]["train.micro_batch_size"] == "4" and trials[0]["status"] == "ok"  # the seed
    by_status = {s: [t for t in trials if t["status"] == s] for s in ("ok", "repeat", "infeasible", "failed")}
    assert len(by_status["ok"]) >= 3 and by_status["infeasible"] and not by_status["failed"], trials
    for t in by_status["ok"]:  # trained: the objective is the run's steady-state median tokens/s
        summary = json.loads((sweep / str(t["trial"]) / "summary.json").read_text())
        assert t["objective"] == pytest.approx(summary["median"]["perf/tokens_per_s"]) and t["objective"] > 0
        assert t["estimate_gib"] <= CAP_GIB and t["values"]["train.micro_batch_size"] in ("2", "4")
        assert t["micro_batch_size"] * t["grad_accum_steps"] == 8  # the global batch is fixed
        assert summary["environment"]["memory_estimate"]["total_gib"] == pytest.approx(t["estimate_gib"], abs=1e-3)
    for t in by_status["infeasible"]:  # never launched: no metrics, no summary, no model built
        job = sweep / str(t["trial"])
        assert t["estimate_gib"] > CAP_GIB and t["objective"] == 0.0 and not t["launched"]
        assert not (job / "summary.json").exists() and not (job / "metrics.jsonl").exists()
        log = (job / "train.log").read_text()
        assert "engine:" not in log and "operators:" not in log and "autotune: infeasible" in log
    assert report["infeasible_launched"] == []
    for t in by_status["repeat"]:  # a configuration proposed again reuses the earlier measurement, trains nothing
        first = next(o for o in by_status["ok"] if sorted(o["overrides"]) == sorted(t["overrides"]))
        assert t["objective"] == first["objective"] and not t["launched"]

    # The sweeper received the returned floats: its best value is the best trained trial's tokens/s.
    best_value = max(t["objective"] for t in by_status["ok"])
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == pytest.approx(best_value)
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["tokens_per_s"] == pytest.approx(best_value)
    command = (sweep / "best_command.txt").read_text().strip()
    assert command == best["command"] and "experiment=" not in command and "hydra." not in command
    assert f"train.grad_accum_steps={best['grad_accum_steps']}" in command
    md = (sweep / "report" / "report.md").read_text()
    assert "## Autotune" in md and "Importance per knob" in md
    for plot in ("autotune_objective.png", "autotune_importance.png"):
        assert (sweep / "report" / plot).stat().st_size > 1000
    assert {t["wandb_group"] for t in trials} == {f"sweep-{sweep.name}"}  # one wandb group for the sweep

    # The best command runs as it is (two steps here) with the trial's settings; so does the best YAML.
    run_dir = tmp_path / "best_run"
    rerun = run_entry([*shlex.split(command)[3:], "train.steps=2", f"hydra.run.dir={run_dir}"], timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["environment"]["memory_estimate"]["total_gib"] <= CAP_GIB
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert cfg["model"]["name"] == "tiny" and "autotune" not in cfg
    assert (cfg["train"]["micro_batch_size"], cfg["train"]["grad_accum_steps"]) == (best["micro_batch_size"],
                                                                                   best["grad_accum_steps"])
    yaml_dir = tmp_path / "best_yaml_run"
    from_yaml = run_entry(["--config-dir", str(sweep), "--config-name", "best_config", "train.steps=2",
                           f"hydra.run.dir={yaml_dir}"], timeout=120)
    assert from_yaml.returncode == 0, from_yaml.stderr[-3000:]
    assert json.loads((yaml_dir / "summary.json").read_text())["steps"] == 2


def test_the_seed_comes_first_and_a_trial_the_trainer_refuses_fails_without_ending_the_sweep(tmp_path):
    """precision=fp8 passes the memory estimate but the trainer refuses it on a CPU (SystemExit): that trial is
    recorded as failed, with the trainer's sentence, and the sweep goes on to the other configurations."""
    sweep = tmp_path / "sweep"
    proc = run_entry(["-m", "experiment=autotune", "model=tiny", "train.steps=2", "train.summary_warmup_steps=1",
                      "train.micro_batch_size=2,4", "precision=fp32,fp8", "fusion=sdpa", "splitting=none",
                      "engine=ddp", "comm/bucket=fixed", "comm/overlap=on", "logging=disabled",
                      "autotune.conditional=null", f"autotune.memory_cap_gib={CAP_GIB}",
                      "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = json.loads((sweep / "report" / "report.json").read_text())["autotune"]["trials"]
    combos = [(t["values"]["train.micro_batch_size"], t["values"]["precision"]) for t in trials]
    # The memory-first seed: the largest micro-batch that fits (4 at this cap), the listed-first precision.
    assert combos[0] == ("4", "fp32") and sorted(combos) == [("2", "fp32"), ("2", "fp8"), ("4", "fp32"),
                                                             ("4", "fp8")]
    for t in trials:
        job = sweep / str(t["trial"])
        if t["values"]["precision"] == "fp8":  # estimated, under the cap, launched, refused by the trainer
            assert t["status"] == "failed" and t["estimate_gib"] <= CAP_GIB, t
            assert "refused by the trainer" in t["reason"] and "fp8" in t["reason"]
            assert not (job / "summary.json").exists()
        else:
            summary = json.loads((job / "summary.json").read_text())
            assert t["status"] == "ok" and t["objective"] == pytest.approx(summary["median"]["perf/tokens_per_s"])
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["knobs"]["precision"] == "fp32"
