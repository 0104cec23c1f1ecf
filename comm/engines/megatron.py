"""The megatron-core engine: ``megatron.core.distributed.DistributedDataParallel`` behind the one engine interface
(comm/engines/engine.py).

Megatron's DDP keeps every gradient in one contiguous buffer per (param dtype, grad dtype), cut into buckets of
``bucket_size`` *elements* (it counts elements, not bytes); a backward hook adds each ``param.grad`` into
``param.main_grad`` (a view of that buffer) and drops ``param.grad``. With ``overlap_grad_reduce`` a bucket's
all-reduce starts asynchronously as soon as its last gradient of the last micro-batch is ready; without it
megatron makes a single bucket and reduces it synchronously in ``finish_grad_sync()``.

One optimizer step, as megatron's own training loop drives it (``megatron/training/training.py``):
``no_sync()`` on every micro-batch but the last -> ``finish_grad_sync()`` (waits for, or issues, the reductions;
each bucket is pre-scaled by 1/world and summed, so ``main_grad`` is the mean over ranks, as DDP's) -> the
optimizer steps on ``param.grad = param.main_grad`` (an alias, exactly what megatron's ``FP32Optimizer.
prepare_grads`` does) -> ``zero_grad_buffer()`` (which also records the first batch's per-bucket gradient
counts that later batches use to launch each bucket's all-reduce from the backward hook).

Mapping chuanliu's communication policies onto megatron-core:
- bucket size: ``bucket_size = comm/bucket bytes // bytes per gradient element`` unless set here. Without
  overlap megatron always uses one bucket (said at start-up when the two disagree).
- overlap: ``overlap_grad_reduce`` follows comm/overlap unless set here.
- comm hooks (flat/hierarchical all-reduce) are torch DDP's mechanism: not applied (said at start-up).
- precision: bf16 runs as in DDP (autocast over fp32 parameters, fp32 gradient buffer and all-reduce); fp16
  uses the run's GradScaler on the aliased gradients, as DDP does.
- megatron's own (distributed) optimizer assumes CUDA tensors: ``use_distributed_optimizer`` is refused on CPU
  and not wired on GPU either; the run's torch AdamW steps instead. comm/engines/megatron_cpu.py is the one place that
  bridges megatron-core to a CPU-only torch.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from comm.engines.engine import EngineInputs, StateBytes, TorchOptimizerEngine
from comm.engines.megatron_cpu import cpu_bridges


@dataclass(kw_only=True)
class MegatronConfig:
    bucket_size: int | None = None  # elements per bucket; None: comm/bucket's bytes // bytes per grad element
    overlap_grad_reduce: bool | None = None  # async per-bucket all-reduce during backward; None: comm/overlap
    grad_reduce_in_fp32: bool = True  # accumulate and all-reduce gradients in fp32 (bf16/fp16 parameters)
    average_in_collective: bool = False  # ReduceOp.AVG instead of pre-scaling by 1/world + SUM (NCCL only)
    use_distributed_optimizer: bool = False  # megatron's ZeRO-1 optimizer: needs CUDA and megatron's optimizer

    def state_bytes(self, n_params: int, *, dp: int, compute_dtype: str, unit_params: int,
                    bucket_bytes: int) -> StateBytes:
        """fp32 weights and AdamW moments; the contiguous main_grad buffer (fp32 with grad_reduce_in_fp32) whose
        buckets are views of it."""
        grad = 4 if self.grad_reduce_in_fp32 or compute_dtype == "fp32" else 2
        return StateBytes(weights=4 * n_params, grads=grad * n_params, optimizer=8 * n_params, grad_bytes=grad)

    def build(self, inputs: EngineInputs) -> MegatronEngine:
        return MegatronEngine(inputs, self)


def import_megatron():
    """megatron-core's DDP classes, or one clear sentence when it is not installed."""
    try:
        with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not used here
            warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
            from megatron.core import parallel_state
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError as e:
        raise RuntimeError(f"engine=megatron needs megatron-core ({e}); install megatron-core==0.16.1 or use "
                           "engine=ddp") from None
    return parallel_state, DistributedDataParallel, DistributedDataParallelConfig, TransformerConfig


def _transformer_config(model: nn.Module, TransformerConfig):
    """The few fields megatron's DDP reads (``calculate_per_token_loss``, ``cuda_graph_impl``, the config logger)
    sit on a TransformerConfig, which wants a model shape; the shape itself is not used by DDP."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    layers = getattr(cfg, "n_layers", 1)
    dim = getattr(cfg, "dim", 8)
    heads = getattr(cfg, "n_heads", 1)
    return TransformerConfig(num_layers=layers, hidden_size=dim, num_attention_heads=heads,
                             cuda_graph_scope=[], calculate_per_token_loss=False)


def _init_parallel_state(parallel_state) -> None:
    """TP = PP = CP = EP = 1: every rank is data-parallel, on groups of the default (gloo or NCCL) backend."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 create_gloo_process_groups=False)


class MegatronEngine(TorchOptimizerEngine):
    def __init__(self, inputs: EngineInputs, cfg: MegatronConfig):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.raw = inputs.model
        self.model: nn.Module = inputs.model
        self.ddp = None
        self.optimizer, self.scheduler, self.grad_clip = inputs.optimizer, inputs.scheduler, inputs.grad_clip
        self.scaler = inputs.scaler  # a disabled GradScaler passes everything through
        self.device = inputs.device
        self.skipped_steps = 0
        self.rank_losses: list[float] = []
        self.unhonoured: list[str] = []
        overlap = inputs.overlap if cfg.overlap_grad_reduce is None else cfg.overlap_grad_reduce
        bucket_size = cfg.bucket_size if cfg.bucket_size is not None else inputs.bucket_elements
        self.knobs: dict[str, Any] = {"engine": "megatron", "bucket_size": bucket_size, "overlap_grad_reduce": overlap,
                                      "grad_reduce_in_fp32": cfg.grad_reduce_in_fp32,
                                      "average_in_collective": cfg.average_in_collective,
                                      "use_distributed_optimizer": False}
        if not self.distributed:
            self.unhonoured.append("one process: megatron-core's DDP needs torch.distributed; the plain module "
                                   "trains without gradient buckets")
            self.knobs.update(wrapped=False, n_buckets=0)
            return
        self._check(cfg, inputs)
        self.ddp = self._wrap(cfg, bucket_size, overlap)
        self.model = self.ddp
        # Megatron makes one bucket when overlap is off (its bucket_size becomes None).
        n_buckets = sum(len(buffer.buckets) for buffer in self.ddp.buffers)
        self.knobs.update(wrapped=True, n_buckets=n_buckets, megatron_bucket_size=self.ddp.bucket_size,
                          cpu_bridge=self.cpu_bridged)
        if not overlap:
            self.unhonoured.append(f"comm/bucket ({bucket_size:,} elements): with overlap_grad_reduce off "
                                   "megatron-core reduces all gradients as one bucket")
        if inputs.comm_hook is not None:
            self.unhonoured.append("comm/algorithm (chuanliu's all-reduce hooks) is a torch DDP mechanism; "
                                   "megatron-core all-reduces each bucket with its own collective")

    def _check(self, cfg: MegatronConfig, inputs: EngineInputs) -> None:
        if cfg.use_distributed_optimizer:
            raise ValueError("engine.use_distributed_optimizer=true needs megatron-core's own optimizer, which "
                             "chuanliu does not wire (and which assumes CUDA); set it to false (the torch AdamW "
                             "steps on megatron's gradient buffer) or use engine=deepspeed / engine=fsdp2 for "
                             "sharded optimizer state")
        if cfg.average_in_collective and dist.get_backend() != "nccl":
            raise ValueError(f"engine.average_in_collective=true needs ReduceOp.AVG, which the "
                             f"{dist.get_backend()} backend lacks; set it to false (megatron pre-scales by "
                             "1/world and sums, the same mean)")
        if inputs.compute_dtype == "fp8":
            raise ValueError("engine=megatron with precision=fp8 is not wired (megatron's fp8 needs Transformer "
                             "Engine); use precision=bf16 or engine=ddp")

    def _wrap(self, cfg: MegatronConfig, bucket_size: int, overlap: bool):
        parallel_state, DistributedDataParallel, DistributedDataParallelConfig, TransformerConfig = import_megatron()
        _init_parallel_state(parallel_state)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.grad_reduce_in_fp32, overlap_grad_reduce=overlap, bucket_size=bucket_size,
            average_in_collective=cfg.average_in_collective, use_distributed_optimizer=False)
        with cpu_bridges() as self.cpu_bridged:
            ddp = DistributedDataParallel(_transformer_config(self.raw, TransformerConfig), ddp_config, self.raw)
        ddp.broadcast_params()  # as torch DDP does at construction: every replica starts from rank 0's weights
        return ddp

    @property
    def module(self) -> nn.Module:
        return self.raw

    def full_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.raw.named_parameters()}  # replicated

    def _accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Accumulate into ``main_grad``; only the last micro-batch reduces (megatron launches each bucket's
        all-reduce from the backward hook once the bucket is complete, with overlap)."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def _ready_grads(self) -> None:
        """Finish the reductions, then hand the optimizer the reduced buffer (megatron's FP32Optimizer.
        prepare_grads: ``param.grad = param.main_grad``, an alias, no copy)."""
        self.ddp.finish_grad_sync()
        for p in self.raw.parameters():
            if p.requires_grad:
                p.grad = p.main_grad if p.main_grad.dtype == p.dtype else p.main_grad.to(p.dtype)

    def step(self) -> dict[str, float]:
        if self.ddp is not None:
            self._ready_grads()
        stats = self._optimizer_step()
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        return stats

    # Checkpoint state: TorchOptimizerEngine (comm/engines/engine.py); the gradient buffer is empty between steps and is
    # not saved.
    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None:
        """Nothing to prime: megatron's buckets follow parameter order, fixed at construction, so a resumed run
        reduces exactly as one that never stopped (its first batch only launches the all-reduces from
        ``finish_grad_sync`` instead of the hooks: same collectives, same data)."""
