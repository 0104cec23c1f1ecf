"""The autotune pieces that need no training: the importance of each knob, the best command line, the
conditional knobs the sweeper's custom search space adds, and the accumulation at a fixed global batch."""
import pytest

from analysis.autotune import best_command, importance
from experiments.autotune import _accumulation, conditional_knobs


def _trial(objective, status="ok", **values):
    return {"status": status, "objective": objective, "values": {k.replace("__", "."): v for k, v in values.items()}}


def test_importance_is_the_share_of_variance_a_knob_explains():
    trials = [_trial(100, mb="1", overlap="on"), _trial(100, mb="1", overlap="off"),
              _trial(300, mb="8", overlap="on"), _trial(300, mb="8", overlap="off"),
              _trial(0.0, status="infeasible", mb="8", overlap="on")]  # not trained: not counted
    imp = importance(trials, ["mb", "overlap"])
    assert imp["mb"] == pytest.approx(1.0) and imp["overlap"] == pytest.approx(0.0)
    half = importance([_trial(100, a="x", b="p"), _trial(200, a="x", b="q"), _trial(200, a="y", b="p"),
                       _trial(300, a="y", b="q")], ["a", "b"])
    assert half == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert importance(trials[:2], ["mb"]) == {"mb": None}  # too few trained trials to say


def test_the_best_command_names_what_differs_from_the_primary_config_and_not_the_search():
    trial = {"choices": {"model": "small", "precision": "bf16", "fusion": "sdpa", "experiment": "autotune",
                         "hydra/sweeper": "autotune", "comm/overlap": "on"},
             "primary_choices": {"model": "tiny", "precision": "fp32", "fusion": "sdpa", "comm/overlap": "on"},
             "overrides": ["train.micro_batch_size=4", "precision=bf16", "experiment=autotune", "train.steps=8",
                           "engine.zero_stage=1", "autotune.memory_cap_gib=0.85", "hydra.sweeper.n_trials=8"],
             "grad_accum_steps": 2}
    assert best_command(trial) == ("python -m experiments.train model=small precision=bf16 "
                                   "train.micro_batch_size=4 engine.zero_stage=1 train.grad_accum_steps=2")


class _FakeTrial:
    def __init__(self, params, user_attrs=None):
        self.params, self.user_attrs = dict(params), dict(user_attrs or {})

    def suggest_categorical(self, name, choices):
        self.params[name] = choices[0]
        return choices[0]


def test_conditional_knobs_are_searched_only_under_their_option():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"autotune": {"conditional": {"engine=deepspeed": {"engine.zero_stage": [1, 2]},
                                                         "comm/bucket=fixed": {"comm.bucket.bucket_cap_mb": [5]}}}})
    ds = _FakeTrial({"engine": "deepspeed", "comm/bucket": "cost_model"})
    conditional_knobs(cfg, ds)
    assert ds.params == {"engine": "deepspeed", "comm/bucket": "cost_model", "engine.zero_stage": 1}
    ddp = _FakeTrial({"engine": "ddp"}, user_attrs={"comm/bucket": "fixed"})  # fixed on the command line
    conditional_knobs(cfg, ddp)
    assert ddp.params == {"engine": "ddp", "comm.bucket.bucket_cap_mb": 5}
    given = _FakeTrial({"engine": "deepspeed"}, user_attrs={"engine.zero_stage": 3})  # the user's value stays
    conditional_knobs(cfg, given)
    assert "engine.zero_stage" not in given.params


def test_the_accumulation_keeps_the_global_batch_or_rules_the_trial_out():
    assert _accumulation(8, 1, 2) == 4 and _accumulation(8, 2, 4) == 1
    assert _accumulation(8, 1, 3) is None and _accumulation(8, 4, 4) is None


def test_the_preset_sampler_measures_each_configuration_once_until_all_are_tried():
    import optuna
    from optuna.distributions import CategoricalDistribution

    from experiments.autotune import distinct_tpe_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"mb": CategoricalDistribution([1, 2, 4]), "precision": CategoricalDistribution(["fp32", "bf16"])}
    study = optuna.create_study(direction="maximize", sampler=distinct_tpe_sampler(
        seed=0, n_startup_trials=2, warn_independent_sampling=False))
    seen = []
    for _ in range(8):  # 6 combinations: the first 6 trials are all different, then TPE may repeat its best
        trial = study.ask()
        combo = tuple(trial._suggest(k, d) for k, d in space.items())
        seen.append(combo)
        study.tell(trial, combo[0] * (2 if combo[1] == "bf16" else 1))  # a peak at (4, bf16)
    assert len(set(seen[:6])) == 6 and (4, "bf16") in seen[:6]


def test_memory_first_seeds_take_per_engine_the_largest_micro_batch_that_fits():
    from experiments.autotune import memory_first_seeds

    space = {"train.micro_batch_size": [1, 2, 4, 8], "precision": ["fp32", "bf16"],
             "engine": ["ddp", "deepspeed", "deepspeed_zero3"]}
    # A fake estimate: fp32 needs twice what bf16 does; ZeRO-3 fits twice what the others do.
    limit = {"ddp": 4, "deepspeed": 4, "deepspeed_zero3": 8}
    calls = []

    def fits(p):
        calls.append(p)
        return p["train.micro_batch_size"] * (2 if p["precision"] == "fp32" else 1) <= limit[p["engine"]]

    seeds = memory_first_seeds(space, fits, per="engine")
    assert seeds == [{"engine": "ddp", "train.micro_batch_size": 4, "precision": "bf16"},
                     {"engine": "deepspeed", "train.micro_batch_size": 4, "precision": "bf16"},
                     {"engine": "deepspeed_zero3", "train.micro_batch_size": 8, "precision": "bf16"}]
    # The user's order is the preference: fp32 (listed first) wherever it fits at the largest micro-batch.
    assert memory_first_seeds(space, lambda p: True, per="engine")[0]["precision"] == "fp32"
    assert memory_first_seeds(space, lambda p: True, per=None) == [
        {"train.micro_batch_size": 8, "precision": "fp32", "engine": "ddp"}]
    assert memory_first_seeds(space, lambda p: False, per="engine") == []  # nothing fits: no seed
    assert memory_first_seeds({"precision": ["fp32"]}, lambda p: True, per=None) == []  # no micro-batch knob
    assert len(calls) < 4 * 2 * 3  # it stops at the first fit per engine


def test_the_preset_sampler_proposes_its_seeds_first_then_searches():
    import optuna
    from optuna.distributions import CategoricalDistribution

    from experiments.autotune import distinct_tpe_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"mb": CategoricalDistribution([1, 2, 4]), "precision": CategoricalDistribution(["fp32", "bf16"])}
    seeds = [{"mb": 4, "precision": "bf16"}, {"mb": 2}]  # a seed may leave a knob to the sampler
    study = optuna.create_study(direction="maximize", sampler=distinct_tpe_sampler(
        seed=0, n_startup_trials=2, warn_independent_sampling=False, seeds=seeds))
    seen = []
    for _ in range(6):
        trial = study.ask()
        combo = tuple(trial._suggest(k, d) for k, d in space.items())
        seen.append(combo)
        study.tell(trial, float(combo[0]))
    assert seen[0] == (4, "bf16") and seen[1][0] == 2
    assert len(set(seen)) == 6  # then distinct configurations, as without seeds
