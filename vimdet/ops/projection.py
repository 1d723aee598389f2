"""A batched projection whose input also feeds another op: in the backward pass the other op's
gradient of the input is added inside the projection's input-gradient GEMM (``torch.baddbmm``),
instead of by autograd's separate add of two full-size gradients.

In Vim's mixer (Zhu et al., arXiv 2401.09417) the conv's output u (2, batch * L, E) feeds both
the selective scan and x_proj; at Vim-B's width autograd's add of the two bf16 gradients of u
was a 50 µs kernel a block on an H100 (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["project_sharing_input"]


class _ProjectionSharingInput(torch.autograd.Function):
    """(x, x @ weight^T) for x (n, M, K) and weight (n, N, K); see :func:`project_sharing_input`.
    The backward pass adds into the gradient that reaches the first output, in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
        projected = torch.bmm(x, weight.transpose(1, 2))  # under the caller's autocast
        # The GEMM's operands in the dtype it ran in, for a backward pass without autocast.
        ctx.save_for_backward(x.to(projected.dtype), weight.to(projected.dtype))
        ctx.dtypes = (x.dtype, weight.dtype)
        return x.view_as(x), projected

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor | None, grad_projected: Tensor | None):
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        if grad_projected is None:
            return grad_x, None
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            if grad_x is None:
                grad_input = torch.bmm(grad_projected, weight)
            elif grad_x.dtype == x.dtype and grad_x.is_contiguous():
                # Accumulated in place: a fresh output would cost a copy of grad_x first.
                grad_input = grad_x.baddbmm_(grad_projected, weight)
            else:
                grad_input = torch.baddbmm(grad_x.to(x.dtype), grad_projected, weight)
            grad_input = grad_input.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad_projected.transpose(1, 2), x).to(weight_dtype)
        return grad_input, grad_weight


def project_sharing_input(x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(x, x @ weight^T), batched: x (n, M, K), weight (n, N, K) -> (n, M, K), (n, M, N).

    Use the first output (a view of x) wherever x is used besides the projection: its gradient
    then reaches x through the projection's backward GEMM, which adds it in its epilogue. That
    gradient's memory is overwritten with the sum: pass the first output only to ops whose
    backward gives it a tensor of its own (in the Vim mixer, the scan's backward). Under
    ``torch.compile`` or ``torch.jit.trace``, or when no gradient reaches x, this is a plain
    ``torch.bmm`` (the compiler fuses the add itself).
    """
    if (
        torch.is_grad_enabled()
        and x.requires_grad
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    ):
        return _ProjectionSharingInput.apply(x, weight)
    return x, torch.bmm(x, weight.transpose(1, 2))
