"""``project_sharing_input`` against the plain composition (x used twice, ``torch.bmm``): outputs
and both gradients, with and without a gradient through each output."""

import pytest
import torch

from vimdet.ops import project_sharing_input


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
