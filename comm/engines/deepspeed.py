"""The DeepSpeed engine: ZeRO stages 0-3 behind the training loop's one engine interface (comm/engines/engine.py).

Start with ``DeepSpeedConfig.build``: it turns chuanliu's decisions (precision, grad clip, the comm/bucket and
comm/overlap policies) into a DeepSpeed config dict, or loads a DeepSpeed JSON verbatim (``config_json``, the
Baichuan-7B preset), and calls ``deepspeed.initialize`` with the optimizer and schedule the loop built.

Decisions, and why:
- Buckets. DeepSpeed's ``reduce_bucket_size``/``allgather_bucket_size`` count ELEMENTS, not bytes (ZeRO allocates
  ``bucket_size`` elements of the gradient dtype). Left at None they follow the comm/bucket policy:
  ``BucketChoice.elements``: the policy's bytes in elements of the gradients' dtype (bf16 with bf16.enabled).
- Precision. ``bf16`` turns on DeepSpeed's ``bf16.enabled``: the module's weights become bf16 and the ZeRO optimizer
  keeps fp32 master weights (chuanliu's own bf16 instead keeps fp32 weights under autocast). The loop's
  ``forward_context`` is still entered around every forward: it carries the activation meter, the forward timer
  and chaos injection, and its bf16 autocast on bf16 weights only keeps autocast's fp32 ops (losses) in fp32.
  fp16 is refused on CPU by DeepSpeed itself; we refuse it earlier with the way out. fp8 has no DeepSpeed path.
- Accumulation. The loop hands ``n_micro`` micro-batches then calls ``step()``. DeepSpeed's documented manual mode
  does exactly that: ``set_gradient_accumulation_boundary(False)`` for all but the last micro-batch (gradients
  accumulate locally, no reduction, like DDP's ``no_sync``), ``True`` for the last, ``backward(loss / n_micro,
  scale_wrt_gas=False)`` each time and one ``engine.step()``. DeepSpeed's own ``gradient_accumulation_steps`` stays
  1 (so its ``train_batch_size`` bookkeeping is per micro-batch; the loop's tokens/s figures are chuanliu's own).
- Checkpoints. DeepSpeed's own format (``engine.save_checkpoint``: module, ZeRO optimizer partitions with the fp32
  master weights, the lr schedule, step counters) is written by ``native_save(dir)`` into the checkpoint directory
  that ``fault.checkpoint`` commits, and read back by ``native_load(dir)``; ``sharded_state`` adds the whole
  weights for torch.distributed.checkpoint, a portable copy that other tools can read without DeepSpeed.
- Safe resume. DeepSpeed reads its files with ``torch.load(weights_only=False)``, so a tampered checkpoint would run
  code at resume. ``native_check`` first reads only each file's pickle and refuses any class beyond
  ``DEEPSPEED_SAFE_GLOBALS`` (what DeepSpeed's own ZeRO 0-3 checkpoints hold); ``native_load`` then swaps the
  checkpoint engine's reader for ``torch.load(weights_only=True)`` with that allow-list. ``trust_pickle=True``
  (``fault.checkpoint.trust_pickle``) restores DeepSpeed's full unpickler, for trusted checkpoints only.
- Start-up. DeepSpeed's communication backend JIT-builds its shared-memory all-reduce op in every process (about
  18 s cold). That op serves only ``inference_all_reduce`` (tensor-parallel inference layers); ZeRO training never
  calls it, so by default (``shm_comm=false``) we mark it unavailable and skip the build. With ``shm_comm=true`` the
  build is cached under ``$CHUANLIU_CACHE/torch_extensions`` (unless ``TORCH_EXTENSIONS_DIR`` is set).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import pickle
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from comm.engines.engine import EngineInputs, StateBytes, gather_rank_losses

NATIVE_DIR = "deepspeed"  # DeepSpeed's own checkpoint, inside a fault.checkpoint step directory
NATIVE_TAG = "state"
_SHM_OP = "deepspeed_shm_comm"

# Every class DeepSpeed 0.19.8 pickles into the checkpoints native_save writes, beyond what torch's weights_only
# unpickler allows already (tensors, OrderedDict, plain types); found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints in fp32 and bf16. Named as strings
# because deepspeed is optional: importing this module must not import it.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizers save their (static) loss scaler object
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3 optimizer states record their stage as this enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1/2: each parameter's slice of the flat partition
)
_TRUST_HINT = ("if you trust this checkpoint (you or someone you trust wrote it), fault.checkpoint.trust_pickle=true "
               "loads it with DeepSpeed's full unpickler")


def _cache_dir() -> Path:
    return Path(os.environ.get("CHUANLIU_CACHE") or "~/.cache/chuanliu").expanduser()


def import_deepspeed(shm_comm: bool):
    """Import deepspeed with its CPU shared-memory comm op skipped (shm_comm=False) or built into a cache."""
    if shm_comm:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    import deepspeed  # noqa: PLC0415 (optional dependency: imported only when the engine is selected)
    import deepspeed.ops

    if not shm_comm:
        # The dict DeepSpeed consults before building an op (build_shm_op in deepspeed/comm/torch.py); it is cached
        # in the module, so the edit holds for the process.
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False
    return deepspeed


def deep_merge(base: Mapping, extra: Mapping) -> dict:
    """base with extra's leaves written over it, as plain dicts (extra may be an OmegaConf node)."""
    out = {k: deep_merge(v, {}) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = deep_merge(out.get(k, {}) if isinstance(out.get(k), Mapping) else {}, v) \
            if isinstance(v, Mapping) else v
    return out


def _safe_classes() -> list[type]:
    """DEEPSPEED_SAFE_GLOBALS as the classes themselves (what torch.serialization.safe_globals takes)."""
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def check_native_files(path: Path) -> None:
    """Refuse DeepSpeed's files under ``path/deepspeed`` if one is not a regular file or its pickle names a class
    beyond DEEPSPEED_SAFE_GLOBALS. Reads only each file's pickle (no tensors), so it is cheap before a load."""
    root = Path(path) / NATIVE_DIR
    if not root.is_dir() and not root.is_symlink():
        raise ValueError(f"checkpoint {path} holds no DeepSpeed state ({root} is missing)")
    entries = [root] + [Path(top) / name for top, dirs, files in os.walk(root) for name in dirs + files]
    for f in sorted(entries):
        mode = f.lstat().st_mode
        if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            # A link could point DeepSpeed's reader at a file outside the checkpoint, which was never checked.
            raise ValueError(f"refusing DeepSpeed checkpoint file {f}: it is a symlink or not a regular file; "
                             "native_save never writes one, so the checkpoint was altered")
        if stat.S_ISDIR(mode) or (f.parent == root and f.suffix == ".py"):
            continue  # zero_to_fp32.py and the like: DeepSpeed's offline recovery scripts, never read by a load
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except (ValueError, RuntimeError) as e:  # not a torch.save zip: its pickle cannot be read on its own
            raise ValueError(f"refusing DeepSpeed checkpoint file {f}: it is not a torch.save zip file ({e}), so "
                             f"its contents cannot be checked before unpickling; {_TRUST_HINT}") from None
        disallowed = sorted(set(unsafe) - set(DEEPSPEED_SAFE_GLOBALS))
        if disallowed:
            raise ValueError(f"refusing DeepSpeed checkpoint file {f}: it names {', '.join(disallowed)}, beyond the "
                             "classes DeepSpeed's own checkpoints hold; loading it would unpickle arbitrary objects, "
                             f"which can run code; {_TRUST_HINT}")


@contextlib.contextmanager
def weights_only_reads(checkpoint_engine) -> Iterator[None]:
    """Within the block, ``checkpoint_engine.load`` (every file DeepSpeed's load_checkpoint reads) unpickles with
    ``weights_only=True`` and DEEPSPEED_SAFE_GLOBALS instead of DeepSpeed's ``weights_only=False``."""
    classes = _safe_classes()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(classes):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph of advice; the line that names the culprit is the one worth keeping.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0])
            why = why.split(". Please use")[0]  # torch then suggests allow-listing it, the opposite of our advice
            raise ValueError(f"refusing DeepSpeed checkpoint file {path}: weights_only unpickling refused it "
                             f"({why[:300]}); loading it fully would unpickle arbitrary objects, which can run "
                             f"code; {_TRUST_HINT}") from None

    # An instance attribute shadows the class's method for this engine only, and is removed afterwards. Torch,
    # Fast and Decoupled checkpoint engines all read a path with torch.load, so this reader is theirs made safe.
    before = vars(checkpoint_engine).get("load")
    checkpoint_engine.load = load
    try:
        yield
    finally:
        if before is None:
            del checkpoint_engine.load
        else:
            checkpoint_engine.load = before


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 2  # 0: plain data parallel; 1: optimizer state; 2: + gradients; 3: + parameters
    overlap_comm: bool | None = None  # None: follow comm/overlap
    reduce_bucket_size: int | None = None  # ELEMENTS; None: the comm/bucket policy's, in elements of the grads' dtype
    allgather_bucket_size: int | None = None  # ELEMENTS; None: as reduce_bucket_size
    contiguous_gradients: bool = True  # copy gradients into one contiguous buffer as they are reduced
    reduce_scatter: bool = True  # ZeRO-1/2 reduce gradients by reduce-scatter (False: all-reduce)
    config_json: str | None = None  # a full DeepSpeed JSON used verbatim (relative: to the repo root); the
    #                                 fields above and chuanliu's policies are then ignored, and said so
    json_overrides: dict = field(default_factory=dict)  # deep-merged over config_json; each one is reported
    shm_comm: bool = False  # build DeepSpeed's CPU shared-memory all-reduce op (inference only; ~18 s cold)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage={self.zero_stage} is unknown; use 0, 1, 2 or 3")

    def json_config(self) -> dict:
        """The DeepSpeed JSON named by config_json, as written in the file."""
        path = Path(self.config_json)
        if not path.is_absolute():
            path = Path(__file__).resolve().parents[2] / path
        return json.loads(path.read_text())

    def ds_config(self, inputs: EngineInputs) -> tuple[dict, dict, list[str]]:
        """The dict handed to deepspeed.initialize, the knobs used and the settings it cannot honour."""
        i = inputs
        if i.compute_dtype == "fp16" and i.device.type == "cpu":
            raise ValueError("DeepSpeed refuses fp16 on CPU (its CPU accelerator has no fp16 support); "
                             "use precision=bf16 or precision=fp32")
        if i.compute_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"engine=deepspeed has no {i.compute_dtype} path; use precision=bf16 or fp32, or "
                             "engine=ddp for fp8")
        unhonoured = []
        if i.comm_hook is not None:
            unhonoured.append("comm/algorithm's gradient hook (flat/hierarchical reduce) is a DDP comm hook; "
                              "DeepSpeed reduces gradients with its own ZeRO collectives")
        if i.scaler.is_enabled() and i.compute_dtype != "fp16":
            unhonoured.append("precision.loss_scaling=dynamic: DeepSpeed scales losses only with fp16")
        if self.config_json:
            cfg = deep_merge(self.json_config(), self.json_overrides)
            unhonoured += self._json_conflicts(cfg, i)
        else:
            if self.json_overrides:
                raise ValueError("engine.json_overrides applies to engine.config_json, which is not set")
            cfg = self._from_policies(i)
        zero = cfg.get("zero_optimization", {})
        knobs = {"engine": "deepspeed", "zero_stage": zero.get("stage", 0),
                 "reduce_bucket_size": zero.get("reduce_bucket_size"),
                 "allgather_bucket_size": zero.get("allgather_bucket_size"),
                 "bucket_unit": "elements", "overlap_comm": zero.get("overlap_comm"),
                 "contiguous_gradients": zero.get("contiguous_gradients"),
                 "reduce_scatter": zero.get("reduce_scatter"),
                 "bf16": cfg.get("bf16", {}).get("enabled", False),
                 "gradient_clipping": cfg.get("gradient_clipping", 0.0),
                 "config_json": self.config_json, "json_overrides": deep_merge({}, self.json_overrides) or None}
        return cfg, knobs, unhonoured

    def _from_policies(self, i: EngineInputs) -> dict:
        bucket = self.reduce_bucket_size or i.bucket_elements
        zero: dict[str, Any] = {
            "stage": self.zero_stage,
            "overlap_comm": i.overlap if self.overlap_comm is None else self.overlap_comm,
            "reduce_bucket_size": int(bucket),
            "contiguous_gradients": self.contiguous_gradients,
        }
        if self.zero_stage in (1, 2):
            zero.update(allgather_bucket_size=int(self.allgather_bucket_size or bucket),
                        reduce_scatter=self.reduce_scatter)
        elif self.zero_stage == 3:  # ZeRO-3 gathers parameters by its prefetch bucket instead
            zero.update(stage3_prefetch_bucket_size=int(self.allgather_bucket_size or bucket))
        return {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the loop decides batches (see module doc)
            "gradient_accumulation_steps": 1,
            "gradient_clipping": max(0.0, i.grad_clip),
            "bf16": {"enabled": i.compute_dtype == "bf16"},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch AdamW from systems/optim.py
            "steps_per_print": 2**31 - 1,  # chuanliu's metrics log; DeepSpeed's own step lines would repeat them
            "wall_clock_breakdown": False,
        }

    @staticmethod
    def _json_conflicts(cfg: dict, i: EngineInputs) -> list[str]:
        """Where the verbatim JSON and chuanliu's settings disagree: the JSON wins, and we say so."""
        out = []
        bf16 = cfg.get("bf16", {}).get("enabled", False)
        if bf16 != (i.compute_dtype == "bf16"):
            out.append(f"precision={i.compute_dtype}: the DeepSpeed JSON sets bf16.enabled={bf16}, which wins")
        if cfg.get("gradient_clipping", 0.0) != max(0.0, i.grad_clip):
            out.append(f"optim.grad_clip={i.grad_clip}: the DeepSpeed JSON clips at {cfg.get('gradient_clipping')}")
        out.append("comm/bucket and comm/overlap: the DeepSpeed JSON sets the bucket sizes and overlap_comm")
        if "optimizer" in cfg:
            out.append("the DeepSpeed JSON's optimizer section: the optim group's torch AdamW (and its schedule) "
                       "is passed to DeepSpeed, which then uses it instead")
        if cfg.get("gradient_accumulation_steps", 1) != 1 or cfg.get("train_micro_batch_size_per_gpu", 1) != 1:
            out.append("the DeepSpeed JSON's batch sizes: train.micro_batch_size and train.grad_accum_steps decide")
        return out

    def state_bytes(self, n_params: int, *, dp: int, compute_dtype: str, unit_params: int,
                    bucket_bytes: int) -> StateBytes:
        """ZeRO (Rajbhandari et al. 2020): with bf16 the module's weights are bf16 and the optimizer keeps fp32
        master weights next to AdamW's moments (12 bytes per parameter), divided over dp from stage 1; gradients in
        the weights' dtype, divided from stage 2 (plus the fp32 partition the optimizer steps on); weights divided
        from stage 3. Buffers: the reduce bucket (and its contiguous-gradients copy), ZeRO-3's gathered prefetch."""
        cfg = deep_merge(self.json_config(), self.json_overrides) if self.config_json else {}
        zero = cfg.get("zero_optimization", {})
        stage = zero.get("stage", 0) if self.config_json else self.zero_stage
        bf16 = cfg.get("bf16", {}).get("enabled", False) if self.config_json else compute_dtype == "bf16"
        pb = 2 if bf16 else 4
        bucket = zero.get("reduce_bucket_size") or self.reduce_bucket_size or max(1, bucket_bytes // pb)
        shard = lambda stage_from: dp if stage >= stage_from else 1  # noqa: E731
        optimizer = ((4 if bf16 else 0) + 8) * n_params / shard(1)
        grads = pb * n_params / shard(2) + (4 * n_params / dp if bf16 and stage in (1, 2) else 0)
        buffers = (2 * bucket * pb if stage >= 1 else 0) + (2 * unit_params * pb if stage == 3 else 0)
        return StateBytes(weights=pb * n_params / shard(3), grads=grads, optimizer=optimizer, buffers=buffers,
                          param_bytes=pb, grad_bytes=pb)

    def build(self, inputs: EngineInputs) -> DeepSpeedEngine:
        cfg, knobs, unhonoured = self.ds_config(inputs)
        return DeepSpeedEngine(inputs, ds_config=cfg, knobs=knobs, unhonoured=unhonoured, shm_comm=self.shm_comm)


class DeepSpeedEngine:
    def __init__(self, inputs: EngineInputs, *, ds_config: dict, knobs: dict, unhonoured: list[str],
                 shm_comm: bool = False):
        deepspeed = import_deepspeed(shm_comm)
        self.ds_config = ds_config  # exactly what DeepSpeed was given
        self.knobs, self.unhonoured = knobs, unhonoured
        self.scheduler = inputs.scheduler
        if not dist.is_initialized():  # one process: DeepSpeed needs a group, and would look for MPI to make one
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
                os.environ.setdefault(key, value)  # what a launcher would have set; DeepSpeed reads them
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=inputs.model, optimizer=inputs.optimizer, lr_scheduler=inputs.scheduler,
            config=copy.deepcopy(ds_config), dist_init_required=None)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.bf16 = self.engine.bfloat16_enabled()
        self.rank_losses: list[float] = []
        self._deepspeed = deepspeed

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter whole on every rank: ZeRO-3 gathers its shards (a collective), other stages hold them."""
        params = dict(self.engine.module.named_parameters())
        with self._deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.zero3):
            return {name: p.detach().clone() for name, p in params.items()}

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                         forward_context: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Accumulate over ``n_micro`` micro-batches (reduced at the last one); the mean loss over all ranks."""
        total = torch.zeros((), device=self.engine.device)
        for i, (x, y) in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == n_micro - 1)
            with forward_context():
                loss = self.engine(x, y) / n_micro
            self.engine.backward(loss, scale_wrt_gas=False)
            total += loss.detach().float()
        mean, self.rank_losses = gather_rank_losses(total, dist.is_available() and dist.is_initialized())
        return mean

    def step(self) -> dict[str, float]:
        """DeepSpeed's step: reduce the last buckets, clip, step the optimizer and the schedule."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.engine.step()  # at the boundary set by forward_backward: steps the client lr scheduler too
        norm = self.engine.get_global_grad_norm()
        norm = float(norm.item() if torch.is_tensor(norm) else (norm if norm is not None else float("nan")))
        scale = float(self.optimizer.cur_scale) if hasattr(self.optimizer, "cur_scale") and not self.bf16 else 1.0
        return {"grad_norm": norm, "lr": lr, "loss_scale": scale, "skipped_steps": self.engine.skipped_steps}

    # Checkpoints: DeepSpeed's own format via native_save/native_load; DCP gets a portable copy of the weights.
    def sharded_state(self) -> dict[str, Any]:
        return {"model": self.full_parameters()}

    def load_sharded_state(self, state: dict[str, Any]) -> None:
        """Nothing to do: native_load restored the weights together with the fp32 master weights (the weights in
        DCP are a copy for readers without DeepSpeed; loading them alone would desynchronise the ZeRO master)."""

    @property
    def native(self) -> DeepSpeedEngine:
        """DeepSpeed's own format (Engine.native): native_save, native_load, native_check below."""
        return self

    def native_save(self, path: Path) -> None:
        """Write DeepSpeed's checkpoint into ``path/deepspeed`` (collective: every rank writes its partitions)."""
        self.engine.save_checkpoint(str(Path(path) / NATIVE_DIR), tag=NATIVE_TAG, save_latest=False)

    def native_check(self, path: Path) -> None:
        """Refuse ``path/deepspeed`` if a file in it is a link or special file, or names classes beyond
        DEEPSPEED_SAFE_GLOBALS (ValueError naming the file and the classes)."""
        check_native_files(path)

    def native_load(self, path: Path, trust_pickle: bool = False) -> None:
        """Restore DeepSpeed's checkpoint from ``path/deepspeed`` (collective). Unless ``trust_pickle``, its files
        are checked by native_check and unpickled with ``weights_only=True`` and DEEPSPEED_SAFE_GLOBALS."""
        d = Path(path) / NATIVE_DIR
        if not (d / NATIVE_TAG).is_dir():
            raise ValueError(f"checkpoint {path} holds no DeepSpeed state ({d / NATIVE_TAG} is missing): it was "
                             "written by another engine; resume it with that engine, or start fresh")
        guard = contextlib.nullcontext()
        if not trust_pickle:
            self._check_safe_readers()
            self.native_check(path)  # the clear refusal; the weights_only reads below are what guarantees it
            guard = weights_only_reads(self.engine.checkpoint_engine)
        with guard:
            loaded, _ = self.engine.load_checkpoint(str(d), tag=NATIVE_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if loaded is None:
            raise ValueError(f"DeepSpeed could not load its checkpoint from {d}")

    def _check_safe_readers(self) -> None:
        """Refuse the DeepSpeed settings whose loads bypass the checkpoint engine's reader (which
        weights_only_reads makes safe): they would unpickle with weights_only=False behind our back."""
        from deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine import DecoupledCheckpointEngine
        from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        # Universal checkpoints: ZeRO's _load_universal_checkpoint and deepspeed/checkpoint call torch.load
        # themselves. (ZeRO-3 without optimizer states would too, via zero_to_fp32; native_load always loads them.)
        if self.engine.load_universal_checkpoint():
            raise ValueError("DeepSpeed's checkpoint.load_universal reads files with its own full unpickler, which "
                             f"native_load cannot restrict; turn it off in the DeepSpeed JSON, or {_TRUST_HINT}")
        ce = self.engine.checkpoint_engine
        if not isinstance(ce, (TorchCheckpointEngine, FastCheckpointEngine, DecoupledCheckpointEngine)):
            raise ValueError(f"DeepSpeed's {type(ce).__name__} reads checkpoints its own way, which native_load "
                             f"cannot restrict to weights_only; use DeepSpeed's default checkpoint engine, or "
                             f"{_TRUST_HINT}")

    def local_state(self) -> dict[str, Any]:
        return {}  # the schedule and the step counters travel in DeepSpeed's checkpoint

    def load_local_state(self, state: dict[str, Any]) -> None:
        pass

    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None:
        """Nothing to prime: ZeRO's buckets follow a fixed parameter order, the same before and after a resume."""
