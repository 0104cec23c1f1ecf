"""From a chuanliu run's configs to the predictor's inputs: one source of truth.

The predictor reads the typed configs the trainer builds (systems.fusion.FusionConfig, systems.splitting.
SplittingConfig, systems.precision.Precision, the engine's config class named by ``engine._target_``, comm's
AlgorithmConfig, OverlapConfig, BucketConfig, fault's CheckpointConfig), validated the same way (OmegaConf
structured merge: an unknown key or a bad value is an error). An option it cannot model is an error that names it;
what it deliberately does not carry over (an emulated slow link, a simulated topology) is said in the notes.
A tp/pp run's ``parallel`` section (comm's ParallelConfig) becomes the predictor's ``Layout``
(``layout_from_config``): torch's schedule name (``parallel.pp_schedule``) maps to the papers' through
comm/schedules.py, the schedule table the trainer's pipeline and the predictor share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from analysis.predictor.inputs import GPU, Cluster, ModelShape, Techniques
from analysis.predictor.parallel import Layout
from comm.buckets import BucketConfig
from comm.engines import current_target
from comm.hooks import AlgorithmConfig, OverlapConfig
from comm.schedules import from_torch, get_schedule
from comm.slowlink import LinkConfig
from fault.checkpoint import CheckpointConfig
from systems.fusion import FusionConfig
from systems.precision import Precision
from systems.splitting import SplittingConfig

REPO = Path(__file__).resolve().parents[2]
FUSED = ("compiled", "liger", "auto")  # a kernel per operator; auto picks Liger or compiled on a GPU


@dataclass(frozen=True, kw_only=True)
class Mapped:
    """Techniques plus what the mapping could not carry to a cluster, said rather than dropped."""

    techniques: Techniques
    notes: list[str] = field(default_factory=list)
    layout: Layout | None = None  # a tp/pp run's layout in the predictor's terms (schedule by comm/schedules.py)
    grad_accum: int | None = None  # with ``layout``: m, the micro-batches each pipeline runs per step


def typed(node: dict | None, cls: type, key: str) -> Any:
    """``node`` validated against the dataclass the trainer uses for it (the same structured merge)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = dict(node or {})
    target = raw.pop("_target_", None)
    raw.pop("defaults", None)  # an option YAML read as is: Hydra's composition list, not a value
    if target:  # an option's own class (e.g. comm.hierarchical.FlatAllReduce for comm.algorithm)
        from hydra.utils import get_class

        option = get_class(current_target(target, key))
        if not (isinstance(option, type) and issubclass(option, cls)):
            raise ValueError(f"{key}._target_={target} is not a {cls.__name__}")
        cls = option
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), raw))
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise ValueError(f"{key}: {str(e).splitlines()[0]}") from None


def _engine(engine: Any, precision: Precision) -> dict:
    """The engine's config object -> engine, buckets, overlap and reduction dtype in the predictor's terms."""
    name = type(engine).__name__
    half = 2 if precision.compute_dtype in ("bf16", "fp16", "fp8") else 4
    if name == "DDPConfig":  # chuanliu's DDP keeps fp32 weights under autocast: fp32 gradients are reduced
        return {"engine": "ddp", "reduce_bytes": 4}
    if name == "FSDP2Config":
        return {"engine": "zero3", "layers_per_unit": engine.layers_per_unit,
                "reshard_after_forward": engine.reshard_after_forward, "reduce_bytes": half}
    if name == "MegatronConfig":
        grad = 4 if engine.grad_reduce_in_fp32 else half
        out = {"engine": "zero1" if engine.use_distributed_optimizer else "ddp", "reduce_bytes": grad}
        if engine.bucket_size:
            out["bucket_bytes"] = float(engine.bucket_size * grad)
        if engine.overlap_grad_reduce is not None:
            out["overlap"] = engine.overlap_grad_reduce
        return out
    if name == "DeepSpeedConfig":
        if engine.config_json:  # the JSON wins, as in the trainer
            js = engine.json_config()
            zero = js.get("zero_optimization", {})
            stage, bucket, overlap = zero.get("stage", 0), zero.get("reduce_bucket_size"), zero.get("overlap_comm")
        else:
            stage, bucket, overlap = engine.zero_stage, engine.reduce_bucket_size, engine.overlap_comm
        out = {"engine": ("ddp", "zero1", "zero2", "zero3")[stage], "reduce_bytes": half}
        if bucket:
            out["bucket_bytes"] = float(bucket) * half
        if overlap is not None:
            out["overlap"] = bool(overlap)
        return out
    raise ValueError(f"engine {name} cannot be modelled by the predictor; it knows DDPConfig, FSDP2Config, "
                     "DeepSpeedConfig and MegatronConfig (analysis/predictor/configs.py)")


def techniques_from_configs(*, fusion: FusionConfig, splitting: SplittingConfig, precision: Precision,
                            engine: Any, algorithm: AlgorithmConfig, overlap: OverlapConfig, bucket: BucketConfig,
                            checkpoint: CheckpointConfig, link: LinkConfig | None = None) -> Mapped:
    notes = []
    refused = splitting.refused_kernels().get("loss", {})
    if fusion.loss in refused:  # the trainer refuses it too (systems/fusion.resolve)
        raise ValueError(refused[fusion.loss])
    if precision.compute_dtype == "fp32":
        dtype = "tf32" if precision.allow_tf32 else "fp32"
    else:
        dtype = precision.compute_dtype
    fused = lambda op: getattr(fusion, op) in FUSED or fusion.compile_layers
    auto_loss = "kernel" if "liger" in refused else "fused"  # auto passes over what splitting cannot wrap
    loss = {"eager": "eager", "compiled": "kernel", "liger": "fused", "auto": auto_loss}[fusion.loss]
    if fusion.loss == "auto":
        picked = "the compiled loss" if auto_loss == "kernel" else "Liger's fused linear-cross-entropy"
        notes.append(f"fusion.loss=auto is taken as {picked} (what it picks on a GPU with liger-kernel installed)")
    eng = _engine(engine, precision)
    tech = Techniques(
        attention="eager" if fusion.attention == "eager" else "flash",  # SDPA runs FlashAttention-2 on a GPU
        fused_norm=fused("rmsnorm"), fused_act=fused("swiglu"), fused_rope=fused("rope"), loss=loss,
        chunked_ce=splitting.chunked_ce,
        recompute="full" if splitting.recompute_layers else ("selective" if splitting.recompute_attention
                                                             else "none"),
        recompute_mlp=splitting.recompute_mlp or splitting.tiled_mlp, precision=dtype,
        collective=algorithm.predictor_collective, bucket=bucket,
        overlap=algorithm.overlaps_always or overlap.enabled,
        checkpoint_block_s=5.0 if checkpoint.mode == "async" else 60.0)
    if "bucket_bytes" in eng:
        eng["bucket"] = None  # the engine's own bucket setting wins over comm/bucket, as in the trainer
    tech = replace(tech, **eng)
    if link is not None and (link.inter_alpha_us or link.inter_gbps):
        notes.append("comm.link emulates a slow link on one machine; the cluster's own network is modelled instead")
    if checkpoint.mode == "off":
        notes.append("fault.checkpoint.mode=off: goodput assumes synchronous checkpoints at Young's interval")
    return Mapped(techniques=tech, notes=notes)


def _engine_config(node: dict) -> Any:
    from hydra.utils import get_class

    target = (node or {}).get("_target_")
    if not target:
        raise ValueError("engine has no _target_; the predictor needs the engine's config class (conf/engine/)")
    return typed(node, get_class(current_target(target)), "engine")


def techniques_from_config(cfg: dict) -> Mapped:
    """A run's resolved config (.hydra/config.yaml as a dict) -> Techniques, through the trainer's dataclasses."""
    need = ["fusion", "splitting", "precision", "engine", "comm", "fault"]
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ValueError(f"run config lacks {missing}; the predictor reads the sections the trainer builds")
    comm, fault = cfg["comm"], cfg["fault"]
    precision = typed(cfg["precision"], Precision, "precision")
    mapped = techniques_from_configs(
        fusion=typed(cfg["fusion"], FusionConfig, "fusion"),
        splitting=typed(cfg["splitting"], SplittingConfig, "splitting"), precision=precision,
        engine=_engine_config(cfg["engine"]), algorithm=typed(comm.get("algorithm"), AlgorithmConfig, "comm.algorithm"),
        overlap=typed(comm.get("overlap"), OverlapConfig, "comm.overlap"),
        bucket=typed(comm.get("bucket"), BucketConfig, "comm.bucket"),
        checkpoint=typed(fault.get("checkpoint"), CheckpointConfig, "fault.checkpoint"),
        link=typed(comm.get("link"), LinkConfig, "comm.link"))
    layout = layout_from_config(cfg)
    if layout is not None:  # the techniques map; the layout is carried beside them, for predict_layout
        mapped = replace(mapped, layout=layout[0], grad_accum=layout[1])
        mapped.notes.append(f"this run's layout ({layout[0].label()}) is not applied here: the column is the "
                            "data-parallel (ZeRO-2) 1024-GPU setup; predict the layout with "
                            f"python -m analysis.predictor --techniques megatron {layout_flags(*layout)}")
    return mapped


def layout_from_config(cfg: dict) -> tuple[Layout, int] | None:
    """A run's ``parallel`` section (the trainer's ParallelConfig) -> (the predictor's Layout, m micro-batches per
    pipeline and step), or None for plain data parallelism. torch's schedule name maps to the papers' through
    comm/schedules.py, the table both read; m is the trainer's rule (ParallelConfig.microbatches)."""
    if not (cfg.get("parallel") or {}):
        return None
    from comm.parallel.mesh import ParallelConfig

    par: ParallelConfig = typed(cfg["parallel"], ParallelConfig, "parallel")
    if par.tp == 1 and par.pp == 1:
        return None
    sched = from_torch(par.pp_schedule) if par.pp > 1 else get_schedule("1f1b")
    v = par.pp_virtual_stages if par.pp > 1 else 1
    accum = int((cfg.get("train") or {}).get("grad_accum_steps", 1))
    m = par.microbatches(accum) if par.pp > 1 else accum
    try:
        layout = Layout(tp=par.tp, pp=par.pp, sp=par.sequence_parallel and par.tp > 1, schedule=sched.name,
                        virtual_stages=v)
    except ValueError as e:
        raise ValueError(f"parallel: {e}") from None
    return layout, m


def layout_flags(layout: Layout, grad_accum: int) -> str:
    """The predictor's command-line flags for ``layout`` with ``grad_accum`` micro-batches per pipeline."""
    flags = f"--tp {layout.tp} --pp {layout.pp}" + (" --sp" if layout.sp else "")
    if layout.pp > 1:
        flags += f" --schedule {layout.schedule}" + (f" --virtual-stages {layout.chunks}" if layout.chunks > 1 else "")
    return flags + f" --grad-accum {grad_accum}"


def model_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a run's resolved config (its ``model:`` section) or from a model yaml itself."""
    from systems.model import ModelConfig

    node = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    m: ModelConfig = typed(node, ModelConfig, "model")
    return ModelShape(name=m.name, n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, ffn_dim=m.ffn_dim,
                      vocab_size=m.vocab_size, max_seq_len=m.max_seq_len)


# Shapes the data set's validation mentions that chuanliu does not train (mosaicml/mpt-7b config.json).
EXTRA_MODELS = {"mpt_7b": ModelShape(name="mpt_7b", n_layers=32, dim=4096, n_heads=32, ffn_dim=16384,
                                     vocab_size=50432, mlp="gelu", tied_embeddings=True, position="alibi")}


def load_model(name: str) -> ModelShape:
    """A model by name: conf/model/<name>.yaml (what chuanliu trains), or a shape in EXTRA_MODELS."""
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name]
    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        choices = sorted([p.stem for p in path.parent.glob("*.yaml")] + list(EXTRA_MODELS))
        raise ValueError(f"unknown model {name!r}; choose one of {choices}")
    from omegaconf import OmegaConf

    return model_from_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


# ----------------------------------------------------------------------------------------------- this CPU
def cpu_cluster(peak_tflops: float, dtype: str, world_size: int = 1, mem_gbps: float = 10.0) -> Cluster:
    """This machine as a 'cluster': processes share one node, loopback stands in for NVLink, the peak is the
    measured GEMM rate (analysis/peaks.py) and tiles do not quantise (sms=1)."""
    gpu = GPU(name="cpu", peak_key="", hbm_gb=1e6, hbm_gbps=mem_gbps, sms=1, nvlink_busbw_gbps=5.0, family="cpu",
              peak_override={d: peak_tflops for d in ("fp32", "tf32", "bf16", "fp16", "fp8")})
    return Cluster(name="cpu_local", gpu=gpu, gpus=world_size, gpus_per_node=world_size, nics_per_node=1,
                   nic_gbps=40.0)


def _fastest_step_s(summary: dict, run_dir: Path) -> float:
    """The fastest logged step after warm-up, else the summary median. On a shared CPU other processes only
    ever slow a step down (the rule analysis/peaks.py uses for the GEMM peak); medians here varied 10x."""
    warmup = int(summary.get("environment", {}).get("summary_warmup_steps", 3))
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r][warmup:]
    except (OSError, ValueError):
        steps = []
    return min(steps) if steps else summary["median"]["perf/step_s"]


def load_run_case(run_dir: Path) -> dict:
    """What a CPU calibration needs from a run directory: its typed configs, shape and fastest step."""
    from omegaconf import OmegaConf

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    env = summary["environment"]
    return {"model": model_from_config(cfg), "tech": techniques_from_config(cfg).techniques,
            "seq": int(env["seq_len"]), "mb": int(env["micro_batch_size"]),
            "accum": int(env.get("grad_accum_steps", 1)), "world_size": int(env.get("world_size", 1)),
            "peak_tflops": float(env["peak_tflops"]), "measured_step_s": _fastest_step_s(summary, run_dir)}
