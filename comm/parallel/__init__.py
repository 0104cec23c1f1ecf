"""Model parallelism on a (dp, pp, tp) device mesh: ``mesh`` builds the mesh, ``tensor`` applies tensor parallelism.

This package never imports ``systems/``: the tensor-parallel plan is written against the module attribute names of
the Baichuan model (``model.layers.N.self_attn.W_pack`` ...).
"""
from comm.parallel.mesh import ParallelConfig, build_mesh, describe_groups
from comm.parallel.tensor import (apply_tensor_parallel, clip_grad_norm_, full_grads, full_state_dict,
                                  load_full_state_dict, vocab_parallel_cross_entropy)

__all__ = ["ParallelConfig", "build_mesh", "describe_groups", "apply_tensor_parallel", "full_state_dict",
           "full_grads", "load_full_state_dict", "clip_grad_norm_", "vocab_parallel_cross_entropy"]
