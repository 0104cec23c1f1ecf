"""A training run: ``build_run`` turns the config into components, ``train_loop`` steps them.

Build order (each step gets only the sub-config it needs):
    dist info -> device/threads -> precision -> data + tokenizer -> model -> optimizer/schedule -> engine
    -> peak FLOPS + FLOPs per token -> metrics processor + sinks (rank 0)
    -> fault tolerance: event log, checkpoint manager (resume from the newest valid checkpoint), chaos, watchdog
The loop never branches on config strings: every choice was made while building.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import socket
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from analysis.flops import Recompute, flops_per_token, matmul_params
from analysis.metrics import MetricsProcessor
from analysis.peaks import Peak, calibrate_cpu_peak, cpu_name, gpu_peak
from analysis.sinks import LoggingConfig
from comm.buckets import BucketChoice, BucketConfig, MeasuredCollective, choose_bucket_bytes, estimate_backward_s
from comm.engines.ddp import DDPConfig
from comm.engines.engine import Engine, EngineInputs, replica_digests
from comm.hierarchical import flat_all_reduce
from comm.hooks import AlgorithmConfig, OverlapConfig, build_comm_hook, synchronizer
from comm.parallel import ParallelConfig, apply_tensor_parallel, build_mesh
from comm.parallel.pipeline import SPLIT_BACKWARD
from comm.parallel.tensor import NoCommMeter, TPCommMeter
from comm.parallel.tensor import clip_grad_norm_ as tp_clip_grad_norm_
from comm.slowlink import LinkConfig, SlowLink
from comm.topology import TopologyConfig, build_groups, discover_topology
from experiments.config import ConfigError, plain, typed
from experiments.dist import DistInfo, dist_info
from experiments.memory import MemoryEstimate, check_fits, estimate_memory, pipeline_in_flight
from fault.chaos import Chaos, ChaosConfig
from fault.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointManager,
    CheckpointParts,
    FnState,
    SaveFailed,
)
from fault.events import EventLog, restart_count
from fault.watchdog import ComputeTimer, FaultDetected, Watchdog, WatchdogConfig, check_losses, install_stop_handler
from systems import capabilities
from systems.data import DataConfig, build_data, resolve_cache_dir
from systems.fusion import FusionConfig, resolve
from systems.memory import SavedTensorMeter, peak_memory_fn
from systems.model import ModelConfig, build_model, count_parameters
from systems.optim import OptimConfig, build_optimizer, build_scheduler
from systems.precision import Precision
from systems.splitting import SplittingConfig
from systems.transforms import transform_model

log = logging.getLogger("chuanliu")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 40  # optimizer steps
    seq_len: int = 128  # tokens per sample (each sample holds seq_len + 1 tokens: inputs and shifted targets)
    micro_batch_size: int = 8  # samples per forward/backward on each rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 1337  # model init and everything random; identical on every rank
    device: str = "auto"  # auto (cuda if available, else cpu), cpu or cuda
    log_every: int = 5  # console line every N steps (metrics.jsonl gets every step)
    summary_warmup_steps: int = 3  # first steps left out of summary.json's steady-state medians

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r} is unknown; use auto, cpu or cuda")


@dataclass(kw_only=True)
class HardwareConfig:
    peak_tflops: float | None = None  # override the per-device dense peak (TFLOPS, run's dtype) used for MFU
    recalibrate: bool = False  # CPU: measure the GEMM peak again instead of using the cached figure
    cache_dir: str = "~/.cache/chuanliu"  # where the CPU peak calibration is cached ($CHUANLIU_CACHE wins)


@dataclass
class Run:
    train: TrainConfig
    info: DistInfo
    device: torch.device
    precision: Precision
    engine: Engine
    next_batch: Callable[[], torch.Tensor]
    metrics: MetricsProcessor
    environment: dict[str, Any]
    run_dir: Path
    sync: Callable[[], None]
    peak_memory: Callable[[], int]
    meter: SavedTensorMeter
    show_progress: bool
    loader: Any  # systems.data.PackedLoader: its position is checkpointed
    events: EventLog
    checkpoint: Checkpointer  # load() once, save(step) after each step: the engine, loader and RNG as its parts
    chaos: Chaos
    watchdog: Watchdog
    compute_timer: ComputeTimer  # forward compute, without the engine's parameter gathers (stragglers)
    tp_comm: Any  # tensor parallelism's collectives timed per step (comm.parallel.tensor.TPCommMeter) or a no-op
    start_step: int = 0  # the step of the checkpoint resumed from (0: a fresh start)
    resumed_from: str | None = None
    step: int = 0  # the step in progress (for events)


def pick_device(train: TrainConfig, info: DistInfo) -> torch.device:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu (or auto)")
    if train.device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    # Several ranks on one CPU split its cores, unless the user (or torchrun) set OMP_NUM_THREADS.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def measure_peak(hw: HardwareConfig, device: torch.device, dtype: str, info: DistInfo) -> Peak:
    if hw.peak_tflops is not None:
        return Peak(hw.peak_tflops * 1e12, _device_name(device), dtype, "override",
                    "hardware.peak_tflops set by the user")
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), dtype)
    # Rank 0 measures alone (others would compete for the cores) and hands its figure to the rest: a figure it
    # did not cache (measured on a busy host) must not be measured again by every rank at once.
    box = [calibrate_cpu_peak(dtype, resolve_cache_dir(hw.cache_dir), refresh=hw.recalibrate) if info.is_main
           else None]
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _optimizer_and_schedule(model: torch.nn.Module, optim_cfg: OptimConfig, steps: int):
    optimizer = build_optimizer(model, optim_cfg)
    return optimizer, build_scheduler(optimizer, optim_cfg, steps)


@dataclass(frozen=True)
class Settings:
    """Every config group of a run, checked against its dataclass (experiments.config.typed)."""

    train: TrainConfig
    model: ModelConfig
    data: DataConfig
    precision: Precision
    hardware: HardwareConfig
    logging: LoggingConfig
    optim: OptimConfig
    engine: Any  # an engine config: build(EngineInputs) -> Engine, state_bytes(...) (comm/engines/engine.py)
    fusion: FusionConfig
    splitting: SplittingConfig
    topology: TopologyConfig
    algorithm: AlgorithmConfig
    overlap: OverlapConfig
    link: LinkConfig
    bucket: BucketConfig
    checkpoint: CheckpointConfig
    chaos: ChaosConfig
    watchdog: WatchdogConfig
    parallel: ParallelConfig


# Settings field -> config key. Every node names its class with _target_ (conf/); typed() builds and checks it.
GROUPS = {"train": "train", "model": "model", "data": "data", "precision": "precision", "hardware": "hardware",
          "logging": "logging", "optim": "optim", "engine": "engine", "fusion": "fusion", "splitting": "splitting",
          "topology": "comm.topology", "algorithm": "comm.algorithm", "overlap": "comm.overlap", "link": "comm.link",
          "bucket": "comm.bucket", "checkpoint": "fault.checkpoint", "chaos": "fault.chaos",
          "watchdog": "fault.watchdog", "parallel": "parallel"}


def read_settings(cfg: DictConfig) -> Settings:
    hints = typing.get_type_hints(Settings)
    values = {}
    for name, key in GROUPS.items():
        value = typed(OmegaConf.select(cfg, key), key)
        if hints[name] is not Any and not isinstance(value, hints[name]):
            raise ConfigError(f"{key}._target_ names {type(value).__name__}, not a subclass of "
                              f"{hints[name].__name__}; fix the YAML's _target_")
        values[name] = value
    s = Settings(**values)
    check_fault_config(s.checkpoint, s.chaos, s.watchdog)
    if s.train.seq_len > s.model.max_seq_len:
        raise ConfigError(f"train.seq_len={s.train.seq_len} exceeds model.max_seq_len={s.model.max_seq_len}; "
                          "lower train.seq_len or raise model.max_seq_len")
    return s


@dataclass(frozen=True)
class Work:
    """What one step computes, for the metrics: FLOPs per token (every convention), the peak, tokens per step."""

    fpt: dict[str, float]
    peak: Peak
    dtype: str
    tokens_per_step: int


@dataclass(frozen=True)
class FaultTolerance:
    """Built before the Run and handed to it: the event log, the watchdog (already watching, so loading is watched),
    the checkpoint manager and this rank's chaos injectors (attached to the model after a resume)."""

    events: EventLog
    watchdog: Watchdog
    checkpoint: CheckpointManager
    chaos: Chaos


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work (comm/parallel): this rank's data-parallel coordinate and size (the data and
    the gradient reduction follow them), and the (dp, pp, tp) mesh when tp or pp is above 1."""

    dp_rank: int
    dp_size: int
    tp: int
    pp: int = 1
    mesh: Any = None  # torch DeviceMesh with dims ("dp", "pp", "tp"), or None (plain data parallelism)
    groups: dict[str, Any] = field(default_factory=dict)  # which ranks form each group (summary.json)
    pp_microbatches: int = 1  # the schedule's microbatches per step (pp > 1)

    def dp_of_rank(self, world_size: int) -> list[int]:
        """Every rank's data-parallel coordinate (the checkpoint maps per-rank data positions by it)."""
        if self.mesh is None:
            return list(range(world_size))
        return [r // (world_size // self.dp_size) for r in range(world_size)]  # dp is the outermost mesh dim


def pipeline_microbatches(s: Settings) -> int:
    """The schedule's microbatches per step: parallel.pp_microbatches, or the step's accumulation micro-batches
    (at least one per stage); the step's rows (micro-batch x accumulation) must split into them evenly."""
    p, t = s.parallel, s.train
    m = p.microbatches(t.grad_accum_steps)
    rows = t.micro_batch_size * t.grad_accum_steps
    if rows % m:
        raise ConfigError(f"parallel.pp={p.pp}: a step's {rows} rows (train.micro_batch_size={t.micro_batch_size} x "
                          f"train.grad_accum_steps={t.grad_accum_steps}) do not split into {m} equal pipeline "
                          "microbatches; set parallel.pp_microbatches to a divisor of the rows, or change the batch")
    return m


def build_layout(s: Settings, info: DistInfo, device: torch.device) -> Layout:
    """dp = world / (tp x pp), refused when it does not divide; with tp or pp > 1 the mesh, tp innermost (one
    node), dp outermost. What model parallelism cannot combine with yet is refused here, before any work."""
    p = s.parallel
    shape = p.layout(info.world_size, n_heads=s.model.n_heads, n_layers=s.model.n_layers)
    if p.tp == 1 and p.pp == 1:
        return Layout(dp_rank=info.rank, dp_size=info.world_size, tp=1)
    which = " and ".join(f"parallel.{k}={getattr(p, k)}" for k in ("tp", "pp") if getattr(p, k) > 1)
    limits = {"engine=ddp": isinstance(s.engine, DDPConfig),
              "comm/algorithm=native": type(s.algorithm) is AlgorithmConfig,
              "precision other than fp8": s.precision.compute_dtype != "fp8"}
    if p.tp > 1:
        limits.update({
            "no splitting": not any(v is True for v in s.splitting.__dict__.values()),
            "fusion without compiled or Liger kernels (fusion=sdpa or eager)":
                not s.fusion.compile_layers and all(getattr(s.fusion, op) == "eager"
                                                     for op in ("rmsnorm", "swiglu", "rope", "loss"))})
    if p.pp > 1:
        limits["no fp16 loss scaling"] = s.precision.loss_scaling == "none"
        if p.tp > 1:
            limits["no sequence parallelism together with pp"] = not p.sequence_parallel
    missing = [k for k, ok in limits.items() if not ok]
    if missing:
        raise ConfigError(f"{which} runs, for now, only with {', '.join(limits)}; this run lacks: "
                          f"{', '.join(missing)}")
    m = 1
    if p.pp > 1:
        from comm.parallel.pipeline import check_layout

        m = pipeline_microbatches(s)
        try:
            check_layout(p.pp_schedule, p.pp, p.pp_virtual_stages, s.model.n_layers, m)
        except ValueError as e:
            raise ConfigError(f"parallel.pp_schedule={p.pp_schedule}: {e}") from None
    # Ranks per node: the virtual nodes' size (comm/topology=simulated), else the launcher's local world.
    per_node = (info.world_size // s.topology.nodes if s.topology.nodes
                else int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    mesh, groups = build_mesh(p, info.world_size, device.type, ranks_per_node=per_node, n_heads=s.model.n_heads,
                              n_layers=s.model.n_layers)
    return Layout(dp_rank=groups["coords"]["dp"], dp_size=shape["dp"], tp=p.tp, pp=p.pp, mesh=mesh, groups=groups,
                  pp_microbatches=m)


def split_pipeline(s: Settings, model: torch.nn.Module, layout: Layout, device: torch.device):
    """pp > 1: this rank's stages and the schedule (comm/parallel/pipeline.py), and the model pruned to them (its
    parameters keep the unsplit names). pp = 1: (None, model)."""
    if layout.pp == 1:
        return None, model
    from comm.parallel.pipeline import build_pipeline, stage_module

    p = s.parallel
    pipe = build_pipeline(model, layout.mesh["pp"], schedule=p.pp_schedule, n_microbatches=layout.pp_microbatches,
                          virtual_stages=p.pp_virtual_stages, device=device)
    return pipe, stage_module(model, pipe.chunks)


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Builders in order; each takes what the ones before made. Only loading a checkpoint (start) follows the Run."""
    info = dist_info()
    s = read_settings(cfg)
    device = pick_device(s.train, info)
    s.precision.check(device.type)
    layout = build_layout(s, info, device)
    memory = check_memory(s, device, layout)
    s.precision.setup(device.type)
    seed_everything(s.train.seed)
    tokenizer, loader = build_data(s.data, seq_len=s.train.seq_len, micro_batch_size=s.train.micro_batch_size,
                                   rank=layout.dp_rank, world_size=layout.dp_size)  # a tp group reads alike
    if tokenizer.vocab_size > s.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size="
                          f"{s.model.vocab_size}; raise model.vocab_size or lower data.vocab_size")
    model = build_model(s.model, device)
    kernels = transform_model(model, fusion=s.fusion, splitting=s.splitting, precision=s.precision,
                              device_type=device.type)
    if layout.tp > 1:  # after the operator slots are set: it replaces the loss with its vocabulary gather
        apply_tensor_parallel(model, layout.mesh["tp"], s.parallel.sequence_parallel)
    n_params = count_parameters(model)  # the whole model's, before a pipeline keeps this rank's stages
    pipe, model = split_pipeline(s, model, layout, device)
    work = measure_work(s, device, info, kernels, layout)
    engine, bucket, topology = build_engine(s, model, device, info, memory, work, layout, pipe)
    environment = describe(s, device, info, work, n_params, kernels, tokenizer, engine, bucket, topology, memory)
    environment["parallel"] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp_size,
                               "sequence_parallel": s.parallel.sequence_parallel and layout.tp > 1,
                               **({"schedule": pipe.knobs["schedule"], "virtual_stages": pipe.knobs["virtual_stages"],
                                   "microbatches": pipe.knobs["n_microbatches"]} if pipe else {}),
                               **{k: v for k, v in layout.groups.items() if k.endswith("_groups")}}
    if layout.mesh is not None and topology is not None:  # which dims stay inside a node (tp should) or cross
        from comm.parallel.pipeline import placement

        environment["parallel"]["placement"] = placement(layout.groups, topology.node_of_rank)
        if info.is_main:
            log.info("parallel layout: %s", ", ".join(
                f"{d}={environment['parallel'][d]} ({where})" for d, where in
                environment["parallel"]["placement"].items()))
    metrics = build_metrics(s, cfg, run_dir, info, work, engine, kernels, tokenizer, environment)
    compute_timer = ComputeTimer(device)
    compute_timer.exclude_engine_hooks(engine.module)  # before chaos or anything else adds forward pre-hooks
    fault = build_fault_tolerance(s, run_dir, info, layout)
    sync = synchronizer(device)
    run = Run(train=s.train, info=info, device=device, precision=s.precision, engine=engine,
              next_batch=lambda: loader.next_batch().to(device, non_blocking=True), metrics=metrics,
              environment=environment, run_dir=run_dir, sync=sync, peak_memory=peak_memory_fn(device),
              meter=SavedTensorMeter(engine.module.parameters(), live=layout.pp > 1,
                                     enabled=pipe is None or pipe.knobs["schedule"] not in SPLIT_BACKWARD),
              show_progress=info.is_main and s.logging.progress_bar, loader=loader, events=fault.events,
              checkpoint=Checkpointer(fault.checkpoint, checkpoint_parts(s, engine, loader, device)),
              chaos=fault.chaos, watchdog=fault.watchdog, compute_timer=compute_timer,
              tp_comm=TPCommMeter() if layout.tp > 1 else NoCommMeter())
    try:
        start(run, s)
    except BaseException:
        run.checkpoint.close()  # a job refused at resume gives the checkpoint directory back (its lease)
        raise
    return run


def check_memory(s: Settings, device: torch.device, layout: Layout) -> MemoryEstimate:
    """Refuse what cannot fit before allocating anything (the kernels are resolved as apply_fusion will)."""
    rows = s.train.micro_batch_size  # per forward; under a pipeline, the schedule's microbatch
    if layout.pp > 1:
        rows = s.train.micro_batch_size * s.train.grad_accum_steps // layout.pp_microbatches
    memory = estimate_memory(
        s.model, seq=s.train.seq_len, micro_batch=rows, splitting=s.splitting,
        kernels=resolve(s.fusion, device.type, s.precision.compute_dtype, s.splitting.refused_kernels()),
        compute_dtype=s.precision.compute_dtype, engine_cfg=s.engine, dp=layout.dp_size,
        bucket_bytes=int(s.bucket.bucket_cap_mb * 2**20), tp=layout.tp, pp=layout.pp,
        sequence_parallel=s.parallel.sequence_parallel and layout.tp > 1,
        in_flight=pipeline_in_flight(s.parallel.pp_schedule, layout.pp, layout.pp_microbatches,
                                     s.parallel.pp_virtual_stages))
    check_fits(memory, s.model, device)
    return memory


def measure_work(s: Settings, device: torch.device, info: DistInfo, kernels: dict[str, str],
                 layout: Layout) -> Work:
    dtype = s.precision.peak_dtype(device.type)
    m = s.model
    fpt = flops_per_token(n_layers=m.n_layers, dim=m.dim, ffn_dim=m.ffn_dim, vocab_size=m.vocab_size,
                          seq_len=s.train.seq_len, recompute=Recompute(**s.splitting.recomputed(kernels)))
    tokens = layout.dp_size * s.train.micro_batch_size * s.train.grad_accum_steps * s.train.seq_len
    return Work(fpt=fpt, peak=measure_peak(s.hardware, device, dtype, info), dtype=dtype, tokens_per_step=tokens)


def build_engine(s: Settings, model: torch.nn.Module, device: torch.device, info: DistInfo, memory: MemoryEstimate,
                 work: Work, layout: Layout, pipe=None) -> tuple[Engine, BucketChoice, Any]:
    """The collectives (topology, groups, comm hook), the bucket size, then the engine over the model."""
    comm_hook, topology, reduce = None, None, MeasuredCollective("flat all-reduce", flat_all_reduce)
    if info.world_size > 1:  # collectives: every rank discovers and builds the same groups
        topology, link = discover_topology(s.topology), SlowLink(s.link)
        if pipe is None:
            comm_hook = build_comm_hook(s.algorithm, s.overlap, build_groups(topology), link, device)
        elif link.enabled:  # pipeline sends and the dp reduction wait the link where they cross nodes
            from comm.parallel.pipeline import P2PDelay

            pipe.link_delay = P2PDelay(link, topology.node_of_rank, info.rank).install()
        if comm_hook:  # the cost model times what training will run
            reduce = MeasuredCollective(f"comm/algorithm={s.algorithm.name}", comm_hook[1].reduce)
    bucket = choose_bucket_bytes(
        s.bucket, grad_elements=count_parameters(model), grad_element_bytes=memory.grad_bytes,
        world_size=layout.dp_size, reduce=reduce, device=device,
        backward_s=estimate_backward_s(work.fpt["hfu"], work.tokens_per_step // info.world_size, work.peak.flops))
    optimizer, scheduler = _optimizer_and_schedule(model, s.optim, s.train.steps)
    engine = s.engine.build(EngineInputs(
        model=model, optimizer=optimizer, scheduler=scheduler, grad_clip=s.optim.grad_clip, device=device,
        scaler=s.precision.make_scaler(device.type), compute_dtype=s.precision.compute_dtype,
        bucket_bytes=bucket.bucket_bytes, bucket_elements=bucket.elements, overlap=s.overlap.enabled,
        comm_hook=comm_hook, make_optimizer=lambda m: _optimizer_and_schedule(m, s.optim, s.train.steps),
        **({"dp_mesh": layout.mesh["dp"], "clip_grad_norm": tp_clip_grad_norm_} if layout.mesh is not None else {}),
        pipeline=pipe))
    return engine, bucket, topology


def describe(s: Settings, device: torch.device, info: DistInfo, work: Work, n_params: int,
             kernels: dict[str, str], tokenizer, engine: Engine, bucket: BucketChoice, topology,
             memory: MemoryEstimate) -> dict[str, Any]:
    """The environment summary.json records."""
    m, t, peak = s.model, s.train, work.peak
    return {
        "device_type": device.type, "device_name": _device_name(device), "dtype": work.dtype,
        "peak_tflops": None if peak.flops is None else peak.flops / 1e12, "peak_source": peak.source,
        "peak_method": peak.method, "world_size": info.world_size, "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "hostname": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": m.name, "parameters": n_params,
        "matmul_parameters": matmul_params(n_layers=m.n_layers, dim=m.dim, ffn_dim=m.ffn_dim,
                                           vocab_size=m.vocab_size),
        "tokenizer_vocab": tokenizer.vocab_size, "seq_len": t.seq_len, "tokens_per_step": work.tokens_per_step,
        "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "precision": s.precision.compute_dtype, "loss_scaling": s.precision.loss_scaling, "kernels": kernels,
        "compile_layers": s.fusion.compile_layers, "splitting": s.splitting.__dict__,
        "capabilities": capabilities.summary(),
        "topology": topology.describe() if topology else "1 rank", "comm_algorithm": s.algorithm.name,
        "overlap": s.overlap.enabled, "bucket": bucket.as_dict(), "engine": engine.knobs,
        "engine_unhonoured": engine.unhonoured, "memory_estimate": memory.as_dict(),
    }


def build_metrics(s: Settings, cfg: DictConfig, run_dir: Path, info: DistInfo, work: Work, engine: Engine,
                  kernels: dict[str, str], tokenizer, environment: dict[str, Any]) -> MetricsProcessor:
    """The metrics processor; on rank 0 also its sinks, the run directory's tokenizer and the start-up log lines."""
    sinks = []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run_dir / "tokenizer.model")
        sinks = s.logging.build(run_dir=run_dir, config=plain(cfg), log_every=s.train.log_every,
                                total_steps=s.train.steps, write=tqdm.write)
        log.info("peak for MFU: %s", work.peak.method)
        log.info("engine: %s", ", ".join(f"{k}={v}" for k, v in engine.knobs.items()))
        for reason in engine.unhonoured:
            log.warning("engine cannot honour a setting: %s", reason)
        log.info("operators: %s%s; splitting: %s; precision: %s", kernels,
                 " + compiled layers" if s.fusion.compile_layers else "",
                 {k: v for k, v in s.splitting.__dict__.items() if v is True} or "none", s.precision.compute_dtype)
        log.info("model %s: %s parameters, %.3f GFLOP/token (palm); %d ranks x %d threads on %s",
                 s.model.name, f"{environment['parameters']:,}", work.fpt["palm"] / 1e9, info.world_size,
                 torch.get_num_threads(), environment["device_name"])
    return MetricsProcessor(flops_per_token=work.fpt, peak_flops=work.peak.flops,
                            tokens_per_step=work.tokens_per_step, world_size=info.world_size, sinks=sinks,
                            warmup_steps=s.train.summary_warmup_steps)


def check_fault_config(ckpt: CheckpointConfig, chaos: ChaosConfig, watchdog: WatchdogConfig) -> None:
    kinds = chaos.kinds_used()
    if any(k.needs_watchdog for k in kinds) and not watchdog.enabled:
        raise ConfigError("a hang fault needs the watchdog (fault.watchdog.enabled=true); without it the job "
                          "would wait out the process-group timeout")
    if any(k.needs_checkpoint for k in kinds) and not ckpt.enabled:
        raise ConfigError(f"fault.chaos={chaos.name} injects into checkpoints but fault/checkpoint is off; use "
                          "fault/checkpoint=sync or async")
    if kinds and not ckpt.enabled:
        log.warning("fault.chaos=%s with fault/checkpoint=off: a restarted job starts again from step 0",
                    chaos.name)


def checkpoint_fingerprint(model_cfg: ModelConfig, train: TrainConfig, data: DataConfig,
                           dp: int) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the shapes of the weights and the data order (with
    data.shard=rows the global batch's rows, whatever dp splits them; otherwise each rank's micro-batch)."""
    rows = {"global_rows": train.micro_batch_size * dp} if data.shard == "rows" else {
        "micro_batch_size": train.micro_batch_size}
    return {"model": {k: getattr(model_cfg, k) for k in ("n_layers", "dim", "n_heads", "ffn_dim", "vocab_size")},
            "seq_len": train.seq_len, **rows, "grad_accum_steps": train.grad_accum_steps}


def build_fault_tolerance(s: Settings, run_dir: Path, info: DistInfo, layout: Layout) -> FaultTolerance:
    """The event log, the watchdog (watching from here on, under its start-up timeout), the checkpoint manager and
    the chaos injectors, in that order."""
    events = EventLog(run_dir, info.rank)
    watchdog = Watchdog(s.watchdog, run_dir=run_dir, rank=info.rank, world_size=info.world_size,
                        events=events).start()
    checkpoint = CheckpointManager(s.checkpoint, run_dir=run_dir, rank=info.rank, world_size=info.world_size,
                                   fingerprint=checkpoint_fingerprint(s.model, s.train, s.data, layout.dp_size),
                                   events=events, progress=watchdog.progress,
                                   # data.shard=rows: every rank holds the same (global) data position
                                   dp_of_rank=layout.dp_of_rank(info.world_size) if s.data.shard == "files"
                                   else [0] * info.world_size)
    chaos = Chaos(s.chaos, rank=info.rank, world_size=info.world_size, total_steps=s.train.steps, events=events,
                  checkpoint_dir=checkpoint_dir(s.checkpoint, run_dir))
    return FaultTolerance(events=events, watchdog=watchdog, checkpoint=checkpoint, chaos=chaos)


def checkpoint_dir(ckpt_cfg: CheckpointConfig, run_dir: Path) -> Path:
    return Path(ckpt_cfg.dir) if ckpt_cfg.dir else run_dir / "checkpoints"


def checkpoint_parts(s: Settings, engine: Engine, loader: Any, device: torch.device) -> CheckpointParts:
    """What a checkpoint of this run holds: the engine's sharded state (DCP) and its own small state, the data
    position, DeepSpeed's own format where the engine has one; after a load the engine is primed (DDP's buckets
    laid out as in a run that never stopped)."""
    def prime() -> None:
        example = torch.zeros(s.train.micro_batch_size, s.train.seq_len, dtype=torch.long, device=device)
        engine.prime(example, example, lambda: s.precision.autocast(device.type))
    return CheckpointParts(sharded=engine.sharded_state, load_sharded=engine.load_sharded_state,
                           local={"engine": FnState(engine.local_state, engine.load_local_state), "loader": loader},
                           native=engine.native, trust_pickle=s.checkpoint.trust_pickle, after_load=prime)


def start(run: Run, s: Settings) -> None:
    """Resume from the newest valid checkpoint (the engine's state dict is made only if there is one; an engine with
    its own format, DeepSpeed, reads it inside the committed directory), then arm chaos on the model and the
    launcher's stop signal, and record the start."""
    loaded = run.checkpoint.load()
    if loaded is not None:
        run.start_step = run.step = loaded.step
        run.resumed_from = str(loaded.path)
        if run.info.is_main:
            log.info("resumed from %s (step %d)", loaded.path, loaded.step)
    run.chaos.attach(run.engine.module)
    install_stop_handler(run.events, lambda: run.step, run.watchdog)
    run.environment.update(checkpoint={"mode": s.checkpoint.mode, "every": s.checkpoint.every,
                                       "dir": str(checkpoint_dir(s.checkpoint, run.run_dir))},
                           resumed_from=run.resumed_from, restart=restart_count(), chaos=s.chaos.name)
    if run.info.is_main:
        run.events.emit("start", step=run.start_step, resumed_from=run.resumed_from, world_size=run.info.world_size,
                        chaos=s.chaos.name, checkpoint=s.checkpoint.mode)


def save_checkpoint(run: Run, step: int) -> float | None:
    """Save when due; returns the seconds training was blocked (None when no save was due). A save that committed
    nothing (a full disk, an I/O error) is recorded and training goes on: the next save tries again, and a job that
    died here would only restart into the same full disk."""
    if not run.checkpoint.due(step, run.train.steps):
        return None
    run.watchdog.beat(step, "checkpoint")
    t0 = time.perf_counter()
    with record_failed_save(run, step):
        return run.checkpoint.save(step, run.train.steps, before_commit=run.chaos.before_commit(step),
                                   throttle=run.chaos.io_throttle(step))
    return time.perf_counter() - t0


@contextlib.contextmanager
def record_failed_save(run: Run, step: int) -> Iterator[None]:
    """A SaveFailed (raised on every rank alike) becomes a ``checkpoint_failed`` event and one error line."""
    try:
        yield
    except SaveFailed as e:
        failed = e.step if e.step is not None else step
        log.error("checkpoint step %d failed, training goes on (the next save tries again): %s", failed, e)
        if run.info.is_main:
            run.events.emit("checkpoint_failed", durable=True, step=failed, at_step=step, detail=str(e)[:500])


def micro_batches(run: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(run.train.grad_accum_steps):
        batch = run.next_batch()  # (B, T + 1)
        yield batch[:, :-1], batch[:, 1:]


def train_loop(run: Run) -> dict[str, Any]:
    @contextlib.contextmanager
    def forward_context():  # entered once per micro-batch forward; the timer includes an injected slowdown
        run.watchdog.progress.next_micro()
        with run.precision.autocast(run.device.type), run.meter, run.compute_timer(), run.chaos.forward():
            yield
    # disable=None: tqdm shows the bar only on a terminal, so CI logs get the periodic lines alone.
    bar = tqdm(range(run.start_step + 1, run.train.steps + 1), disable=None if run.show_progress else True,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0, initial=run.start_step,
               total=run.train.steps)
    for step in bar:
        run.step = step
        run.chaos.step_start(step)
        run.watchdog.beat(step, "forward_backward")
        t0 = time.perf_counter()
        run.meter.reset_peak()
        with run.tp_comm:
            loss = run.engine.forward_backward(micro_batches(run), run.train.grad_accum_steps, forward_context)
        check_losses(step, run.engine.rank_losses, run.events, rank=run.info.rank,  # before NaN reaches weights
                     origins=getattr(run.engine, "nan_origins", None))
        run.watchdog.beat(step, "optimizer")
        stats = run.engine.step()
        loss_value = loss.item()
        run.sync()
        step_s = time.perf_counter() - t0
        forward_s = run.compute_timer.take()
        block_s = save_checkpoint(run, step)
        run.metrics.step(step, loss=loss_value, lr=stats["lr"], grad_norm=stats["grad_norm"], step_s=step_s,
                         mem_peak_bytes=run.peak_memory(),
                         extra={"mem/activation_bytes": run.meter.peak_bytes,
                                "precision/loss_scale": stats["loss_scale"],
                                "precision/skipped_steps": stats["skipped_steps"],
                                "fault/forward_s": forward_s, "fault/ckpt_block_s": block_s,
                                **{k: v for k, v in stats.items() if k.startswith(("comm/", "pp/"))},
                                **run.tp_comm.take()})
        run.watchdog.beat(step, "done", forward_s)
        if step == run.start_step + 1 and run.info.is_main:
            run.events.emit("step_done", step=step)  # the first step of this process: recovery is complete
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    with record_failed_save(run, run.train.steps):
        run.checkpoint.wait()
    run.watchdog.stop()
    summary = run.metrics.summary(run.environment)
    digests = replica_digests(run.engine)
    summary["replicas"] = {"parameter_sha256": digests, "identical": len(set(digests)) == 1}
    if not summary["replicas"]["identical"]:
        log.error("model replicas differ across ranks at the end of training: %s", digests)
    if run.info.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        run.events.emit("finish", step=run.train.steps, steps_done=run.train.steps - run.start_step)
    run.metrics.close(summary)
    run.checkpoint.close()
    return summary


# What gloo and NCCL say (as a plain RuntimeError) when the rank at the other end of a collective is gone.
PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "NCCL error",
                "Broken pipe")


def peer_failure(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, is a collective broken by a peer. The whole chain is
    read: torch's pipelining re-raises a failed p2p or tp all-reduce as RuntimeError("[Stage 0] failed to run
    forward ...") from the gloo error (measured: a killed rank was otherwise blamed on its tensor-parallel peer)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistError) or any(s in str(e) for s in PEER_FAILURE):
            return True
        e = e.__cause__ or e.__context__
    return False


def quiet_other_ranks(info: DistInfo) -> None:
    """Ranks other than 0 log warnings only on the console (their log files keep everything)."""
    if info.is_main:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Build and train; bad input found while building ends the process with one line on stderr."""
    quiet_other_ranks(dist_info())
    try:
        run = build_run(cfg, run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # Unavailable is a ValueError too
        raise SystemExit(f"chuanliu: error: {e}") from None
    if run.start_step >= run.train.steps:  # e.g. a finished run started again: leave its files as they are
        log.warning("the checkpoint resumed from is at step %d and train.steps=%d: nothing left to train (raise "
                    "train.steps to continue); %s is unchanged", run.start_step, run.train.steps, run.run_dir)
        run.watchdog.stop()
        run.checkpoint.close()
        return {}
    try:
        summary = train_loop(run)
    except FaultDetected:
        raise  # its detector logged the event; the launcher restarts the job
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        # A peer that died breaks the collective this rank was in; anything else is this rank's own failure.
        peer = peer_failure(e)
        dead = run.watchdog.unresponsive_ranks() if peer else []
        run.events.emit("detected", durable=True, cause="collective_failure" if peer else "exception",
                        blamed_rank=(dead[0] if dead else None) if peer else run.info.rank, dead_ranks=dead,
                        step=run.step, detail=f"{type(e).__name__}: {e}"[:500])
        raise
    if run.info.is_main:
        v = summary["vs_baichuan_7b"]
        mfu = v["achieved_mfu"]
        log.info("done: %s tok/s/device, %.4f TFLOPS/device (palm), MFU %s vs Baichuan-7B 182 TFLOPS / 58.3%%. "
                 "Run dir: %s", f"{summary['median']['perf/tokens_per_s_per_device']:,.0f}",
                 v["achieved_tflops_per_device"], "n/a" if mfu is None else f"{100 * mfu:.1f}%", run.run_dir)
    return summary


