"""The one place that fixes the order in which techniques are applied to a built model.

    model = build_model(cfg.model)
    apply_fusion      swap operator functions (attention, norm, SwiGLU, rope, loss) for the chosen kernels.
                      First: splitting wraps whatever function fusion chose (a chunked loss of a compiled loss).
    precision.apply   fp8 swaps nn.Linear modules for torchao Float8Linear. Before splitting, so recomputation
                      re-runs the fp8 layers, and before compile, so the compiled graph sees the fp8 casts.
    apply_splitting   chunking and recomputation (checkpoint boundaries). Before compile: torch.compile must
                      trace the checkpoint boundaries, not have them wrapped around already-compiled code.
    apply_compile     torch.compile of whole decoder layers and of the (possibly chunked) loss, last.
The engine (DDP, ...) wraps the result afterwards.
"""
from __future__ import annotations

import torch.nn as nn

from systems.fusion import FusionConfig, apply_compile, apply_fusion
from systems.precision import Precision
from systems.splitting import SplittingConfig, apply_splitting


def transform_model(model: nn.Module, *, fusion: FusionConfig, splitting: SplittingConfig, precision: Precision,
                    device_type: str) -> dict[str, str]:
    """Apply every technique in order; returns the operator implementations chosen (``auto`` resolved)."""
    chosen = apply_fusion(model, fusion, device=device_type, compute_dtype=precision.compute_dtype,
                          refused=splitting.refused_kernels())  # auto passes over what splitting cannot wrap
    precision.apply(model)
    apply_splitting(model, splitting)
    apply_compile(model, fusion, chosen)
    return chosen
