"""The one CPU compatibility layer for megatron-core 0.16.1 (used by comm/engines/megatron.py, nowhere else).

megatron-core's ``DistributedDataParallel`` runs unchanged on CPU under gloo (buckets, ``no_sync``, the
asynchronous per-bucket all-reduce of ``overlap_grad_reduce``) except for one thing: when it builds its
contiguous gradient buffer it asks CUDA for the device, unconditionally, and a CPU build of torch raises
"Torch not compiled with CUDA enabled". ``cpu_bridges()`` answers that one question with "cpu" while the engine
wraps the model, and only then; every other line of megatron-core runs as released.

What is bridged, and what is not (megatron-core 0.16.1, ``megatron/core/distributed/``):

- bridged: ``param_and_grad_buffer.py`` ``_ParamAndGradBuffer.__init__`` allocates ``self.grad_data``
  (line 806; also ``param_data`` at 800 and ``shared_buffer`` at 783, reached only with the distributed
  optimizer) with ``device=torch.cuda.current_device()``. Inside the scope that module's global ``torch`` is a
  proxy whose ``torch.cuda.current_device()`` returns ``"cpu"``; every other attribute is the real torch.
- not bridged, because the CPU path never reaches it: the communication streams
  (``distributed_data_parallel.py:230`` ``torch.cuda.Stream``; ``param_and_grad_buffer.py:417-422, 529``
  ``torch.cuda.stream``/``default_stream``) exist only with ``num_distributed_optimizer_instances > 1``,
  which needs the distributed optimizer; ``param_and_grad_buffer.py:768`` only with ``nccl_ub``;
  ``offload_grad_buffers``/``restore_grad_buffers`` are never called. ``overlap_grad_reduce`` itself issues
  gloo ``all_reduce(async_op=True)`` inside ``torch.distributed._coalescing_manager``: no CUDA involved.
- not bridgeable: megatron's own optimizers (``megatron.core.optimizer``, including the distributed optimizer)
  assume CUDA tensors throughout; the engine steps a torch optimizer on ``param.main_grad`` instead.

With CUDA available ``cpu_bridges()`` does nothing at all.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as megatron's buffer code sees it on CPU: ``current_device()`` is ``"cpu"``."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    @staticmethod
    def current_device() -> str:
        return "cpu"

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchWithCudaOnCpu(types.ModuleType):
    """The ``torch`` module with ``.cuda`` replaced by ``_CudaOnCpu``; everything else is the real torch."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def cpu_bridges() -> Iterator[bool]:
    """Within the scope, megatron-core's gradient buffers are allocated on the CPU (see the module docstring).

    Yields whether a bridge is in place (False with CUDA: nothing is patched). Not thread-safe (it swaps a
    module global); the engine enters it once, around ``DistributedDataParallel(...)``.
    """
    if torch.cuda.is_available():
        yield False
        return
    from megatron.core.distributed import param_and_grad_buffer

    saved = param_and_grad_buffer.torch
    param_and_grad_buffer.torch = _TorchWithCudaOnCpu()
    try:
        yield True
    finally:
        param_and_grad_buffer.torch = saved
