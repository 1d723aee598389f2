"""Projections whose backward passes add gradients inside their GEMMs instead of in separate
full-size copies or adds, for Vim's mixer (Zhu et al., arXiv 2401.09417):

- :func:`project_sharing_input`: a batched projection whose input also feeds another op. The
  conv's output u (2, batch * L, E) feeds both the selective scan and x_proj; autograd added the
  two bf16 gradients of u in a kernel of its own (Vim-B: 50 µs a block on an H100).
- :func:`project_in_parts`: a linear map whose output is used in parts. in_proj's output splits
  into x and z; autograd concatenated their gradients before the backward GEMMs (Vim-B: 100 MB
  moved a block).

Both fall back to the plain ops under ``torch.compile`` and ``torch.jit.trace``, and where no
gradient is wanted.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["project_in_parts", "project_sharing_input"]


class _ProjectionSharingInput(torch.autograd.Function):
    """(x, x @ weight^T) for x (n, M, K) and weight (n, N, K); see :func:`project_sharing_input`.
    The backward pass adds into the gradient that reaches the first output, in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
        ctx.dtypes = (x.dtype, weight.dtype)
        # The GEMM's operands in the dtype it runs in, cast once and kept for a backward pass
        # without autocast (as in _ProjectionInParts).
        x_operand, weight = _autocast_operands(x, weight)
        ctx.save_for_backward(x_operand, weight)
        return x.view_as(x), torch.bmm(x_operand, weight.transpose(1, 2))

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
                grad_input = torch.bmm(grad_projected, weight).to(x_dtype)
            elif grad_x.dtype == x.dtype and grad_x.is_contiguous():
                # Accumulated in place: a fresh output would cost a copy of grad_x first.
                grad_input = grad_x.baddbmm_(grad_projected, weight).to(x_dtype)
            else:
                # grad_x in another dtype than the GEMM's (fp32 x under autocast) or strided: a
                # plain add, which keeps grad_x's precision.
                projected_grad = torch.bmm(grad_projected, weight).to(grad_x.dtype)
                grad_input = (grad_x + projected_grad).to(x_dtype)
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
    if _differentiated(x) and not _traced():
        return _ProjectionSharingInput.apply(x, weight)
    return x, torch.bmm(x, weight.transpose(1, 2))


def _autocast_operands(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """``tensors`` in the dtype autocast gives a GEMM on their device (as they are without
    autocast)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # As autocast: fp64 is left alone.
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def _differentiated(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _traced() -> bool:
    """Whether a compiler or tracer records the call: it then gets the plain ops."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class _ProjectionInParts(torch.autograd.Function):
    """x @ weight^T for x (..., K) and weight (N, K), returned as views of its last dimension in
    parts of ``sizes``; see :func:`project_in_parts`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, sizes: Tuple[int, ...]) -> Tuple[Tensor, ...]:
        ctx.dtypes, ctx.sizes = (x.dtype, weight.dtype), sizes
        # The GEMM's operands in the dtype it runs in, cast once (autocast's own cast of the
        # weight would be a second copy where its cache is off, as in a CUDA graph's capture),
        # and kept for a backward pass without autocast.
        x, weight = _autocast_operands(x, weight)
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t()).split(sizes, dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        # (index of the part, its gradient as rows) for the parts that have one.
        parts = [
            (i, grad.reshape(-1, grad.shape[-1]))
            for i, grad in enumerate(grads)
            if grad is not None
        ]
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0] and parts:
            weight_parts = weight.split(ctx.sizes)
            (first, grad), *rest = parts
            grad_input = torch.mm(grad, weight_parts[first])
            for i, grad in rest:
                grad_input.addmm_(grad, weight_parts[i])  # the sum in the GEMM's fp32 epilogue
            grad_input = grad_input.view(x.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # Rows of parts without a gradient stay zero.
            every_part = len(parts) == len(ctx.sizes)
            grad_weight = torch.empty_like(weight) if every_part else torch.zeros_like(weight)
            grad_weight_parts = grad_weight.split(ctx.sizes)
            rows = x.reshape(-1, x.shape[-1])
            for i, grad in parts:
                torch.mm(grad.t(), rows, out=grad_weight_parts[i])
            grad_weight = grad_weight.to(weight_dtype)
        return grad_input, grad_weight, None


def project_in_parts(linear: nn.Linear, x: Tensor, sizes: Sequence[int]) -> Tuple[Tensor, ...]:
    """``linear(x).split(sizes, dim=-1)`` for a ``linear`` without bias: x (..., K) -> parts
    (..., sizes[i]).

    In the backward pass the parts' gradients are not concatenated: each goes into its own
    GEMMs, the input gradient summed in place (``addmm_``), the weight gradient written into its
    rows. Under ``torch.compile`` or ``torch.jit.trace``, or when no gradient is wanted, this is
    ``linear(x).split(...)`` itself (module hooks then run as usual).
    """
    if linear.bias is not None:
        raise ValueError("project_in_parts: the linear map must have no bias")
    if sum(sizes) != linear.out_features:
        raise ValueError(
            f"project_in_parts: parts {list(sizes)} do not add up to the {linear.out_features} "
            "outputs of the linear map"
        )
    if _differentiated(x, linear.weight) and not _traced():
        return _ProjectionInParts.apply(x, linear.weight, tuple(sizes))
    return linear(x).split(list(sizes), dim=-1)
