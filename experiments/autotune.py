"""Autotune: an Optuna search over the technique knobs through Hydra's sweeper. Start at ``run_trial``.

    python -m experiments.train -m experiment=autotune       # the search (conf/experiment/autotune.yaml)
    python -m analysis.report multirun/<stamp>               # its report again (trials, best, plots)

Each trial is one Hydra job of experiments.train. ``run_trial`` sets the accumulation that keeps the global batch
fixed, then estimates the run's memory per rank (experiments.memory.estimate_memory, engine-aware, as the trainer's
own check does); over ``autotune.memory_cap_gib`` (or the device's usable memory) the trial is recorded as
infeasible and returns 0 without building a model, a loader or an engine. Otherwise it trains and returns the
steady-state median tokens/s (summary.json's ``median["perf/tokens_per_s"]``), which the sweeper maximises.
Every job leaves ``autotune_trial.json``; ``SweepCallback`` turns them into the best command line and YAML, the
trials table and the plots when the sweep ends (analysis/autotune.py, through analysis.report).

The sampler (``distinct_tpe_sampler``) first proposes the memory-first seeds (``memory_first_seeds``, DeepSpeed's
autotuner's first step: per engine, the largest micro-batch that fits), then TPE without repeats.
``conditional_knobs`` is the sweeper's ``custom_search_space``: knobs that exist under one option only
(``engine.zero_stage`` under ``engine=deepspeed``, ``comm.bucket.bucket_cap_mb`` under ``comm/bucket=fixed``) are
searched only in trials that chose that option.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from analysis.autotune import INFEASIBLE, TRIAL_FILE

log = logging.getLogger(__name__)

GIB = 2**30


def _visible_gpus() -> int:
    """conf/experiment/autotune.yaml's hydra.launcher.gpus_per_node: submitit_local hides the GPUs it is not given
    (CUDA_VISIBLE_DEVICES), so each trial's process gets every GPU this one sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


OmegaConf.register_new_resolver("chuanliu_visible_gpus", _visible_gpus, replace=True)


@dataclass(kw_only=True)
class AutotuneConfig:
    """conf/experiment/autotune.yaml's ``autotune`` node."""

    global_batch: int | None = 8  # sequences per optimizer step over the data-parallel ranks: each trial sets
    # train.grad_accum_steps = global_batch / (dp x train.micro_batch_size); None: the accumulation as given
    memory_cap_gib: float | None = None  # per rank, on the memory estimate; None: the device's usable memory
    conditional: dict[str, dict[str, list[Any]]] | None = None  # "group=option" -> {key: choices}: searched only
    # in trials that chose that option (see conditional_knobs); null (autotune.conditional=null): none
    seed_per: str | None = "engine"  # memory-first seeds (AutotuneSweeper): one per option of this knob, at the
    # largest micro-batch that fits; null: one seed; autotune.seed=false: no seeds
    seed: bool = True  # enqueue the memory-first seeds before the sampler's own trials


# ------------------------------------------------------------------------------------------------ one trial
def _accumulation(global_batch: int, dp: int, micro_batch: int) -> int | None:
    per_step = dp * micro_batch
    return global_batch // per_step if per_step > 0 and global_batch % per_step == 0 else None


def estimate_gib(cfg: DictConfig) -> tuple[float, float]:
    """(this config's memory estimate per rank, the usable memory of its device), both in GiB: what
    experiments.trainer.check_memory computes before allocating anything, without its refusal."""
    from experiments.dist import dist_info
    from experiments.memory import USABLE_FRACTION, estimate_memory
    from experiments.trainer import pick_device, read_settings
    from systems.fusion import resolve
    from systems.memory import total_memory_bytes

    s = read_settings(cfg)
    info = dist_info()
    device = pick_device(s.train, info)
    memory = estimate_memory(
        s.model, seq=s.train.seq_len, micro_batch=s.train.micro_batch_size, splitting=s.splitting,
        kernels=resolve(s.fusion, device.type, s.precision.compute_dtype, s.splitting.refused_kernels()),
        compute_dtype=s.precision.compute_dtype, engine_cfg=s.engine, dp=_data_parallel(cfg),
        bucket_bytes=int(s.bucket.bucket_cap_mb * 2**20))
    return memory.total / GIB, USABLE_FRACTION * total_memory_bytes(device) / GIB


def _data_parallel(cfg: DictConfig) -> int:
    from experiments.dist import dist_info

    world = dist_info().world_size
    tp, pp = (int(OmegaConf.select(cfg, f"parallel.{k}", default=1) or 1) for k in ("tp", "pp"))
    return max(1, world // (tp * pp))


def _rss_mib() -> float | None:
    try:
        kb = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        return round(int(kb.split()[1]) / 1024, 1)
    except (OSError, StopIteration, ValueError):  # not Linux
        return None


def _release_earlier_trials() -> None:
    """Under a launcher that runs trials in one process (hydra/launcher=basic): collect what the earlier trials
    left (models and engines in reference cycles, which a full collection would otherwise sweep during this
    trial's timed steps) and hand the freed heap back to the OS. It cannot free what a library keeps referenced
    (DeepSpeed engines stay alive after their trial, ~0.3 GB per `small` trial): the preset's submitit_local
    launcher gives each trial a fresh process instead."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.exists() else []


def _same_on_every_rank(value: Any) -> Any:
    """Rank 0's value on every rank: under torchrun each rank runs the sweeper, and their samplers (seeded alike)
    must see the same objectives to propose the same next trial."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _measured_before(run_dir: Path, overrides: list[str]) -> dict | None:
    """A trial of this sweep that already trained exactly this configuration (TPE may propose one again): its
    record, so the repeat costs no training. Decided on rank 0, which wrote the records."""
    found = None
    if _multirun() and overrides:
        for job in sorted(p for p in run_dir.parent.iterdir() if p.name.isdigit() and p != run_dir):
            try:
                rec = json.loads((job / TRIAL_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if rec.get("status") == "ok" and sorted(rec.get("overrides") or []) == sorted(overrides):
                found = {"trial": int(job.name), "objective": rec["objective"]}
                break
    return _same_on_every_rank(found)


def feasibility(cfg: DictConfig, tune: AutotuneConfig) -> dict[str, Any]:
    """Whether this trial may be launched, decided before anything is built: ``status`` "ok" or "infeasible" (the
    global batch does not split into whole accumulation steps, or the memory estimate exceeds the cap), with
    ``reason``, ``grad_accum_steps``, ``estimate_gib`` and ``memory_cap_gib``. Sets train.grad_accum_steps."""
    out: dict[str, Any] = {"status": "ok", "estimate_gib": None, "memory_cap_gib": None}
    if tune.global_batch is not None:  # a fixed global batch: the micro-batch knob decides the accumulation
        accum = _accumulation(tune.global_batch, _data_parallel(cfg), int(cfg.train.micro_batch_size))
        if accum is None:
            return {**out, "status": "infeasible", "grad_accum_steps": None,
                    "reason": f"autotune.global_batch={tune.global_batch} is not a multiple of dp x "
                              f"train.micro_batch_size={cfg.train.micro_batch_size}"}
        cfg.train.grad_accum_steps = accum
    out["grad_accum_steps"] = int(cfg.train.grad_accum_steps)
    try:
        gib, usable = estimate_gib(cfg)
    except Exception as e:  # noqa: BLE001  a config the trainer would refuse: the trainer says why (trial fails)
        log.warning("autotune: no memory estimate (%s); training decides", e)
        return out
    caps = [c for c in (tune.memory_cap_gib, usable) if c is not None]  # the device's own limit counts too
    cap = min(caps) if caps else None
    out.update(estimate_gib=gib, memory_cap_gib=cap)
    if cap is not None and gib > cap:
        out.update(status="infeasible", reason=f"memory estimate {gib:.3f} GiB per rank > cap {cap:.3f} GiB")
    return out


def run_trial(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict]) -> float:
    """One trial: infeasible (never built or trained) when the estimate exceeds the cap, else the steady-state
    median tokens/s of a short training run."""
    from experiments.dist import dist_info

    tune = _tune_config(cfg)
    record: dict[str, Any] = {"overrides": _overrides(run_dir), "status": "failed", "objective": None,
                              "micro_batch_size": int(cfg.train.micro_batch_size),
                              "wandb_group": OmegaConf.select(cfg, "logging.group"),  # one group per sweep
                              # what earlier trials of this process left behind (they share its threads, heap)
                              "threads_at_start": threading.active_count(), "rss_mib_at_start": _rss_mib()}
    main = dist_info().is_main

    def finish(**fields) -> None:
        record.update(fields)
        if main:
            (run_dir / TRIAL_FILE).write_text(json.dumps(record, indent=1) + "\n")

    check = feasibility(cfg, tune)
    record.update({k: v for k, v in check.items() if k != "status"})
    if check["status"] == "infeasible":
        finish(status="infeasible", objective=INFEASIBLE, wall_s=0.0)
        log.warning("autotune: infeasible, not launched: %s", record["reason"])
        return INFEASIBLE
    earlier = _measured_before(run_dir, record["overrides"])
    if earlier is not None:  # each distinct configuration trains once per sweep
        finish(status="repeat", objective=earlier["objective"], wall_s=0.0,
               reason=f"same configuration as trial {earlier['trial']}: its measurement, not trained again")
        log.info("autotune: %s", record["reason"])
        return float(earlier["objective"])
    _release_earlier_trials()
    record["rss_mib_before_training"] = _rss_mib()
    on_sigterm = signal.getsignal(signal.SIGTERM)  # the trainer's stop handler holds its run: not past the trial
    t0 = time.perf_counter()
    try:
        try:
            summary = train(cfg, run_dir)
        except SystemExit as e:  # a refused config: in a sweep a failed trial, not the end of the search
            record["reason"] = f"refused by the trainer: {e.code}"
            if not _multirun():
                raise
            raise RuntimeError(f"trial refused: {e.code}") from None
        except Exception as e:
            record["reason"] = f"{type(e).__name__}: {e}"
            raise
        value = float(_same_on_every_rank((summary.get("median") or {}).get("perf/tokens_per_s") or INFEASIBLE))
        record.update(status="ok", objective=value)
        return value
    finally:
        finish(wall_s=round(time.perf_counter() - t0, 3))
        if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# --------------------------------------------------------------------------------- the sweeper's search space
def conditional_knobs(cfg: DictConfig, trial) -> None:
    """hydra.sweeper.custom_search_space: for each ``"group=option": {key: choices}`` of autotune.conditional,
    suggest the keys only in a trial that chose that option (TPE models them on those trials alone). A key fixed
    on the command line (a sweeper user attribute) is left as given."""
    node = OmegaConf.select(cfg, "autotune.conditional")
    conditional = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    chosen = {**{k: str(v) for k, v in trial.user_attrs.items()}, **{k: str(v) for k, v in trial.params.items()}}
    for condition, knobs in conditional.items():
        key, _, option = condition.partition("=")
        if chosen.get(key) != option:
            continue
        for name, choices in knobs.items():
            if name not in trial.user_attrs:
                trial.suggest_categorical(name, list(choices))


def distinct_tpe_sampler(**kwargs: Any):
    """hydra.sweeper.sampler._target_: the memory-first seeds (``memory_first_seeds``: per engine, the largest
    micro-batch that fits), then Optuna's TPE (multivariate) that measures each configuration once, built with
    TPESampler's arguments and ``seeds`` (a list of knob -> value; None: this sweep's, from ``sweep_seeds``). The
    seeds are the first trials of a fresh study and count against n_trials (a study resumed from storage gets
    none). On a small discrete space TPE left alone proposes its best point again and again,
    and on a budget of a third of the points each repeat is a point not explored. Here a proposal already tried is
    drawn again (TPE's next candidate), then replaced by a random untried one; the start-up trials are random
    without replacement; once every combination has been tried, TPE's proposal stands. Non-categorical knobs and
    conditional ones (TPE samples those apart) pass as TPE draws them."""
    return _distinct_tpe_class()(**kwargs)


@functools.cache
def _distinct_tpe_class():  # made on first use: importing this module (every training run does) skips optuna
    import itertools
    import random
    import warnings

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.samplers import TPESampler

    class _DistinctTPE(TPESampler):
        def __init__(self, *, n_startup_trials: int = 10, seed: int | None = None, multivariate: bool = True,
                     seeds: list[dict[str, Any]] | None = None, **kwargs):
            with warnings.catch_warnings():  # multivariate TPE is "experimental" in Optuna 2.10: chosen on purpose
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                super().__init__(n_startup_trials=n_startup_trials, seed=seed, multivariate=True, **kwargs)
            self._startup, self._draw, self._seeds = n_startup_trials, random.Random(seed), seeds

        def _seed(self, trial) -> dict[str, Any] | None:
            if self._seeds is None:  # computed once, when the sweep asks for its first trial (not in a resumed study)
                fresh = trial.number == 0 and "config" in _SWEEP
                self._seeds = sweep_seeds(_SWEEP["config"]) if fresh else []
            return self._seeds[trial.number] if trial.number < len(self._seeds) else None

        def sample_independent(self, study, trial, param_name, param_distribution):
            seed = self._seed(trial)
            if seed is not None and param_name in seed:
                return seed[param_name]
            return super().sample_independent(study, trial, param_name, param_distribution)

        def sample_relative(self, study, trial, search_space):
            seed = self._seed(trial)
            if seed is not None:  # a seed's knobs as given; a knob it leaves open is drawn independently
                return {k: seed[k] for k in search_space if k in seed}
            space = {k: d for k, d in search_space.items() if isinstance(d, CategoricalDistribution)}
            if not space or len(space) != len(search_space):
                return super().sample_relative(study, trial, search_space)
            trials = study.get_trials(deepcopy=False)
            seen = {tuple(t.params.get(k) for k in space) for t in trials if t.number != trial.number}
            done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            if done >= self._startup:
                for _ in range(16):
                    params = super().sample_relative(study, trial, search_space)
                    if tuple(params.get(k) for k in space) not in seen:
                        return params
            combos = itertools.product(*(d.choices for d in space.values()))
            untried = [c for c in itertools.islice(combos, 100_000) if c not in seen]
            if not untried:
                return super().sample_relative(study, trial, search_space)
            return dict(zip(space, self._draw.choice(untried)))

    return _DistinctTPE


# ------------------------------------------------------------------- memory-first seeds (DeepSpeed's first step)
MICRO_BATCH = "train.micro_batch_size"


def memory_first_seeds(space: dict[str, list], fits: Callable[[dict[str, Any]], bool], *, per: str | None,
                       max_estimates: int = 256) -> list[dict[str, Any]]:
    """The configurations to measure first: for each option of the ``per`` knob (the engine: DeepSpeed's autotuner
    does this per ZeRO stage), the largest micro-batch that ``fits`` (the memory estimate under the cap), the other
    categorical knobs at the first options, in the order the space lists them, that let it fit (the user's order
    is the preference). A larger micro-batch at a fixed global batch means fewer, larger matmuls and fewer
    accumulation steps: the usual best throughput, which TPE then refines. No seed for an option where nothing
    fits within ``max_estimates`` estimates; none at all without a micro-batch knob."""
    import itertools

    if MICRO_BATCH not in space:
        return []
    others = [k for k in space if k not in (MICRO_BATCH, per)]
    seeds, used = [], 0
    for option in (space[per] if per in space else [None]):
        found = None
        for mb in sorted(space[MICRO_BATCH], key=float, reverse=True):
            for combo in itertools.product(*(space[k] for k in others)):
                if used >= max_estimates:
                    break
                params = {**({per: option} if per in space else {}), MICRO_BATCH: mb, **dict(zip(others, combo))}
                used += 1
                if fits(params):
                    found = params
                    break
            if found:
                break
        if found:
            seeds.append(found)
    return seeds


_SWEEP: dict[str, Any] = {}  # the multirun's config, stashed by SweepCallback.on_multirun_start for the sampler


def sweep_seeds(config: DictConfig) -> list[dict[str, Any]]:
    """The memory-first seeds of this sweep: its categorical knobs (hydra.sweeper.params and the command line's
    comma lists), each candidate judged by ``feasibility`` on the config a trial with those values would get (Hydra
    composes it as the launcher will), as the trial itself will judge it. Empty with autotune.seed=false."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

    tune = _tune_config(config)
    if not tune.seed:
        return []
    params = [f"{k!s}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    distributions, fixed = create_params_from_overrides([*params, *task])
    space = {k: list(d.choices) for k, d in distributions.items()
             if isinstance(d, CategoricalDistribution) and k not in fixed}
    base = [f"{k}={v}" for k, v in fixed.items()]
    loader = GlobalHydra.instance().config_loader()

    def fits(values: dict[str, Any]) -> bool:
        cfg = loader.load_sweep_config(config, [*base, *(f"{k}={v}" for k, v in values.items())])
        return feasibility(cfg, _tune_config(cfg))["status"] == "ok"

    t0 = time.perf_counter()
    seeds = memory_first_seeds(space, fits, per=tune.seed_per)
    log.info("autotune: %d memory-first seeds (%.1f s of estimates): %s", len(seeds), time.perf_counter() - t0,
             seeds)
    return seeds


def _tune_config(cfg: DictConfig) -> AutotuneConfig:
    from experiments.config import typed

    return typed(cfg.autotune, "autotune", AutotuneConfig)


# ------------------------------------------------------------------------------------------- the sweep's end
try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class SweepCallback(Callback):  # type: ignore[misc,valid-type]
    """An autotune sweep's start and end. At the start: its config, for the sampler's memory-first seeds. When it
    ends (rank 0): analysis.report over the sweep, in <sweep>/report/ with its Autotune section, which also writes
    best.yaml, best_command.txt and best_config.yaml into the sweep directory; logged to the sweep's wandb group in
    the runs' wandb mode."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _SWEEP["config"] = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis import report
        from experiments.dist import dist_info

        if not dist_info().is_main:
            return
        sweep = Path(config.hydra.sweep.dir)
        mode = OmegaConf.select(config, "logging.wandb_mode", default="offline") or "offline"
        if report.main([str(sweep), "--wandb", mode]) == 0 and (sweep / "best_command.txt").exists():
            log.info("autotune: best configuration: %s", (sweep / "best_command.txt").read_text().strip())
