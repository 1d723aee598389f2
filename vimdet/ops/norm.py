"""Vim's pre-norm residual step (add the block's output to the fp32 stream, then RMSNorm), and the
channel LayerNorm of ViTDet's pyramid and box heads.

RMSNorm is Zhang & Sennrich, "Root Mean Square Layer Normalization" (NeurIPS 2019); Vim (Zhu et
al., arXiv 2401.09417) keeps the residual stream in fp32 and applies stochastic depth (Huang et
al. 2016) to the branch before the add. Where the scan runs on the ``triton`` backend
(:func:`vimdet.ops.resolve_backend`) one Triton kernel does the add, the norm and the cast to the
next GEMM's dtype from one read of each input, and its backward recomputes the norm from the
stream; elsewhere the same formula runs as PyTorch ops (the reference).

The channel LayerNorm (Ba et al., arXiv 1607.06450; ViTDet, Li et al., arXiv 2203.16527) normalizes
each pixel of a (B, C, H, W) map over C. Both paths compute in fp32 and return the map's dtype,
channels-last in memory; on ``triton`` one kernel reads the map once and writes once (no fp32
copies under autocast), and its backward recomputes the statistics from the map.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .norm_triton import add_rms_norm_triton, layer_norm_rows_triton
from .selective_scan import resolve_backend

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "channel_layer_norm",
    "channel_layer_norm_reference",
]


def add_rms_norm_reference(
    hidden: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    drop_scale: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """:func:`add_rms_norm` as PyTorch ops: the CPU path and the reference of the kernel."""
    stream = hidden.float()
    if drop_scale is not None:
        stream = stream * drop_scale.view(-1, *(1,) * (hidden.dim() - 1))
    if residual is not None:
        stream = residual + stream
    normed = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(out_dtype), stream


def add_rms_norm(
    hidden: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    drop_scale: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """The residual stream's update and its RMSNorm.

    Args:
        hidden: (batch, L, D), the previous block's output, any float dtype.
        residual: (batch, L, D) fp32 stream before this block, or None for the first block.
        weight: (D,) the norm's scale.
        eps: added to the mean square.
        drop_scale: (batch,) fp32 stochastic-depth factor per sample (0 or 1 / keep), or None.
        out_dtype: dtype of the normed output (the next GEMM's input dtype).
        backend: the scan backend; ``triton`` runs the fused kernel.

    Returns:
        (normed, stream): stream = residual + drop_scale * hidden in fp32 (drop_scale * hidden
        without a residual), normed = stream * rsqrt(mean(stream^2) + eps) * weight in
        ``out_dtype``; both (batch, L, D).
    """
    if resolve_backend(backend, hidden.device) == "triton":
        return add_rms_norm_triton(hidden, residual, weight, drop_scale, eps, out_dtype)
    return add_rms_norm_reference(hidden, residual, weight, eps, drop_scale, out_dtype)


def channel_layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """:func:`channel_layer_norm` as PyTorch's ``layer_norm``: the CPU path and the reference."""
    pixels = x.permute(0, 2, 3, 1)
    normed = F.layer_norm(pixels.float(), weight.shape, weight.float(), bias.float(), eps)
    return normed.to(x.dtype).permute(0, 3, 1, 2)


def channel_layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, backend: str = "auto"
) -> Tensor:
    """LayerNorm over the channels of each pixel.

    Args:
        x: (B, C, H, W) map, any float dtype and memory format.
        weight: (C,) scale.
        bias: (C,) shift.
        eps: added to the variance.
        backend: the scan backend; ``triton`` runs the fused kernel.

    Returns:
        (B, C, H, W) in x's dtype, channels-last in memory: (x - mean) / sqrt(var + eps) * weight
        + bias over C, computed in fp32.
    """
    if x.dim() != 4 or weight.shape != (x.shape[1],) or bias.shape != weight.shape:
        raise ValueError(
            f"channel_layer_norm: expected a (B, C, H, W) map and (C,) weight and bias, got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}; build the "
            "norm with the map's channel count"
        )
    if resolve_backend(backend, x.device) == "triton":
        pixels = layer_norm_rows_triton(x.permute(0, 2, 3, 1), weight, bias, eps)
        return pixels.permute(0, 3, 1, 2)
    return channel_layer_norm_reference(x, weight, bias, eps)
