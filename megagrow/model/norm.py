"""The norm of megagrow's local (non-TE) layers: torch's LayerNorm/RMSNorm, usable with sequence parallelism.

megatron-core's local spec falls back to `WrappedTorchNorm` without NVIDIA Apex, and that refuses
`--sequence-parallel`: with the sequence split across TP ranks each rank sees only its part of the tokens,
so a norm's weight gradient must be summed over the TP group. megatron-core does that sum for every
parameter marked `sequence_parallel` (finalize_model_grads), which is what Apex's and TE's norms mark;
this norm marks its parameters the same way. Same class and parameter names as torch's norms, so the
same checkpoint keys and the same numbers. It also honours --apply-layernorm-1p (zero-centred weights),
which WrappedTorchNorm refuses too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """--apply-layernorm-1p (TransformerConfig.layernorm_zero_centered_gamma): scales by 1 + weight, as TE's
    zero_centered_gamma does, so weights start at 0 (and weight decay pulls the scale towards 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm scaling by 1 + weight (--apply-layernorm-1p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class TorchNorm:
    """Factory with the signature megatron-core's specs call norms with (like WrappedTorchNorm)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = ({"LayerNorm": ZeroCenteredLayerNorm, "RMSNorm": ZeroCenteredRMSNorm}
                    if config.layernorm_zero_centered_gamma else
                    {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm})[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
