"""``project_sharing_input`` and ``project_in_parts`` against the plain compositions (x used twice
and ``torch.bmm``; a linear map and ``split``): outputs and every gradient, with and without a
gradient through each output."""

import pytest
import torch

from vimdet.ops import project_in_parts, project_sharing_input


def plain(x, weight):
    return x, torch.bmm(x, weight.transpose(1, 2))


@pytest.mark.parametrize("use_x, use_projection", [(True, True), (True, False), (False, True)])
def test_gradients_equal_the_plain_composition(use_x, use_projection):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    upstream = (torch.randn(2, 13, 7, generator=gen, dtype=torch.float64),
                torch.randn(2, 13, 5, generator=gen, dtype=torch.float64))  # fmt: skip
    results = []
    for function in (project_sharing_input, plain):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        shared, projected = function(*leaves)
        loss = (shared * upstream[0]).sum() * use_x + (
            projected * upstream[1]
        ).sum() * use_projection
        results.append((shared, projected, torch.autograd.grad(loss, leaves, allow_unused=True)))
    (shared, projected, grads), (shared_ref, projected_ref, grads_ref) = results
    torch.testing.assert_close(shared, shared_ref, rtol=0, atol=0)
    torch.testing.assert_close(projected, projected_ref, rtol=1e-12, atol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_bf16_gradient_is_added_in_the_gemm_in_fp32():
    # Under bf16 the two gradients of x meet in fp32 inside baddbmm: closer to the fp64 sum than
    # the plain composition's bf16 add of two rounded gradients can be, never farther than it.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 48, generator=gen)
    weight = torch.randn(2, 40, 48, generator=gen)
    weight = weight.to(torch.bfloat16)
    upstream = (torch.randn(2, 64, 48, generator=gen), torch.randn(2, 64, 40, generator=gen))
    upstream = [u.to(torch.bfloat16) for u in upstream]
    exact = upstream[0].double() + torch.bmm(upstream[1].double(), weight.double())
    errors = []
    for function in (project_sharing_input, plain):
        leaf = x.to(torch.bfloat16).requires_grad_()
        shared, projected = function(leaf, weight)
        # Clones: the first gradient is accumulated into in place.
        grad = torch.autograd.grad([shared, projected], leaf, [u.clone() for u in upstream])[0]
        assert grad.dtype == torch.bfloat16
        errors.append((grad.double() - exact).abs().max().item())
    assert errors[0] <= errors[1]


def test_no_autograd_node_without_a_gradient():
    x, weight = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    shared, projected = project_sharing_input(x, weight)
    assert shared is x and projected.grad_fn is None
    torch.testing.assert_close(projected, torch.bmm(x, weight.transpose(1, 2)))


@pytest.mark.parametrize("used", [(True, True), (True, False), (False, True)])
def test_parts_equal_the_linear_map_split(used):
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(6, 9, bias=False).double()
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    upstream = (torch.randn(2, 5, 4, generator=gen, dtype=torch.float64),
                torch.randn(2, 5, 5, generator=gen, dtype=torch.float64))  # fmt: skip
    results = []
    for function in (project_in_parts, lambda lin, x, sizes: lin(x).split(sizes, dim=-1)):
        leaf = x.clone().requires_grad_()
        linear.zero_grad()
        parts = function(linear, leaf, [4, 5])
        loss = sum((p * u).sum() * w for p, u, w in zip(parts, upstream, used))
        (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        loss.backward()
        results.append((parts, grad, linear.weight.grad.clone()))
    (parts, grad, weight_grad), (parts_ref, grad_ref, weight_grad_ref) = results
    assert [p.shape for p in parts] == [(2, 5, 4), (2, 5, 5)]
    for part, part_ref in zip(parts, parts_ref):
        torch.testing.assert_close(part, part_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight_grad, weight_grad_ref, rtol=1e-12, atol=1e-12)


def test_parts_refuse_a_bias_and_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match="no bias"):
        project_in_parts(torch.nn.Linear(3, 4), torch.randn(2, 3), [2, 2])
    with pytest.raises(ValueError, match="do not add up"):
        project_in_parts(torch.nn.Linear(3, 4, bias=False), torch.randn(2, 3), [2, 1])


def test_fp32_input_under_autocast_keeps_the_direct_gradient_exact():
    # x in fp32 while autocast runs the GEMM in bf16: the gradient reaching the first output is
    # added in fp32, not rounded to bf16 with the GEMM's (as the plain composition does it).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, generator=gen).requires_grad_()
    weight = torch.randn(2, 4, 8, generator=gen)
    direct = torch.randn(2, 16, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared, projected = project_sharing_input(x, weight)
    assert projected.dtype == torch.bfloat16
    grad = torch.autograd.grad([shared, projected], x, [direct, torch.zeros_like(projected)])[0]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, direct, rtol=0, atol=0)


@pytest.mark.parametrize("used", [(True, True), (False, True)])
def test_parts_under_autocast_equal_the_linear_map_split(used):
    # fp32 x and weight while autocast runs the GEMM in bf16 (the weight cast once, in the
    # function): parts, and gradients in the leaves' dtype, as autocast's own linear map gives
    # them; rows of an unused part's weight gradient are zero.
    gen = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(16, 24, bias=False)
    x = torch.randn(3, 7, 16, generator=gen)
    upstream = (torch.randn(3, 7, 8, generator=gen), torch.randn(3, 7, 16, generator=gen))
    results = []
    for function in (project_in_parts, lambda lin, x, sizes: lin(x).split(sizes, dim=-1)):
        leaf = x.clone().requires_grad_()
        linear.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = function(linear, leaf, [8, 16])
        loss = sum((p.float() * u).sum() for p, u, w in zip(parts, upstream, used) if w)
        loss.backward()
        results.append((parts, leaf.grad, linear.weight.grad.clone()))
    (parts, grad, weight_grad), (parts_ref, grad_ref, weight_grad_ref) = results
    for part, part_ref in zip(parts, parts_ref):
        assert part.dtype == torch.bfloat16
        torch.testing.assert_close(part, part_ref, rtol=0, atol=0)
    assert grad.dtype == weight_grad.dtype == torch.float32
    torch.testing.assert_close(grad, grad_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight_grad, weight_grad_ref, rtol=1e-2, atol=1e-2)
    if not used[0]:
        assert weight_grad[:8].abs().max() == 0
