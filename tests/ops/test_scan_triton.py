"""The Triton scan kernels through Triton's CPU interpreter, against the step-by-step reference.

Tiny shapes, chunks of 8 positions and 8 channels a program, chained 4 chunks a step, so that
every case crosses chunk, channel-block and chaining-step boundaries. The same kernels run compiled
at real shapes in tests/gpu.
"""

import os
import subprocess
import sys
import weakref

import pytest
import torch

from vimdet.ops import (
    bidirectional_selective_scan,
    bidirectional_selective_scan_recomputing,
    column_major_walk,
    resolve_backend,
    scan_triton,
    selective_scan,
    selective_scan_reference,
    triton_available,
)

pytestmark = pytest.mark.skipif(
    not (triton_available() and scan_triton.interpreting()),
    reason="runs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)",
)

# Relative to the largest magnitude of the compared tensor: both sides compute in fp32 and differ
# in summation order only; bf16 outputs and gradients are also rounded to bf16 on the way out.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
# (D, z, delta_bias, softplus)
FLAGS = {
    "plain": (False, False, False, False),
    "mamba": (True, True, True, True),
    "gate_only": (False, True, False, True),
    "skip_bias": (True, False, True, False),
    "bias_only": (False, True, True, True),
}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(scan_triton, "CHUNK", 8)
    monkeypatch.setattr(scan_triton, "FORWARD_BLOCK", (8, 1))
    monkeypatch.setattr(scan_triton, "BACKWARD_BLOCK", (8, 1))
    monkeypatch.setattr(scan_triton, "CARRY_CHUNKS", 4)  # chains of over 4 chunks take steps
    monkeypatch.setattr(scan_triton, "CARRY_BLOCK", 16)


def make_inputs(dirs, batch, length, channels, state, flags, dtype=torch.float32, seed=0):
    """Direction-stacked, token-major inputs (see bidirectional_selective_scan)."""
    with_d, with_z, with_bias, softplus = FLAGS[flags]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    delta = torch.rand(dirs, batch, length, channels, generator=gen)
    return {
        "u": randn(dirs, batch, length, channels),
        # Raw deltas in [0, 1); softplus'd ones around 0.7: decays well inside (0, 1).
        "delta": (delta * (0.5 if softplus else 1.0)).to(dtype),
        "A": -torch.rand(dirs, channels, state, generator=gen) * 2 - 0.1,
        "B": randn(dirs, batch, length, state),
        "C": randn(dirs, batch, length, state),
        "D": torch.randn(dirs, channels, generator=gen) if with_d else None,
        "z": randn(batch, length, channels) if with_z else None,
        "delta_bias": torch.randn(dirs, channels, generator=gen) * 0.5 if with_bias else None,
    }, softplus


def gathered(tensor, tokens):
    """(batch, L, C) -> (batch, C, L) with the tokens in ``tokens`` order."""
    return tensor[:, tokens].transpose(1, 2)


def reference_walk(inputs, softplus, order=None):
    """Each direction by the reference backend on copies gathered in walk order (the backward
    direction's order reversed), scattered back to token order and averaged."""
    u = inputs["u"]
    dirs, length = u.shape[0], u.shape[2]
    order = torch.arange(length) if order is None else order
    total = 0
    for d in range(dirs):
        tokens = order if d == 0 else order.flip(0)
        y = selective_scan_reference(
            gathered(u[d], tokens),
            gathered(inputs["delta"][d], tokens),
            inputs["A"][d],
            gathered(inputs["B"][d], tokens),
            gathered(inputs["C"][d], tokens),
            None if inputs["D"] is None else inputs["D"][d],
            None if inputs["z"] is None else gathered(inputs["z"], tokens),
            None if inputs["delta_bias"] is None else inputs["delta_bias"][d],
            softplus,
        ).transpose(1, 2)
        total = total + torch.empty_like(y).index_copy_(1, tokens, y).float()
    return (total / dirs).to(u.dtype)


def output_and_grads(function, inputs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = function({**dict.fromkeys(inputs), **leaves})
    upstream = torch.linspace(-1, 1, out.numel()).view_as(out)  # a non-uniform gradient
    grads = torch.autograd.grad((out.float() * upstream).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads))


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]}"


def assert_matches_reference(inputs, softplus, dtype, walk=None, order=None):
    def triton_scan(tensors):
        return bidirectional_selective_scan(
            **tensors, delta_softplus=softplus, walk=walk, backend="triton"
        )

    actual, actual_grads = output_and_grads(triton_scan, inputs)
    expected, expected_grads = output_and_grads(
        lambda tensors: reference_walk(tensors, softplus, order), inputs
    )
    assert actual.dtype == dtype
    assert_close(actual, expected, dtype, "output")
    assert set(actual_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        assert actual_grads[name].dtype == inputs[name].dtype, name
        assert_close(actual_grads[name], grad, dtype, f"grad of {name}")


@pytest.mark.parametrize(
    "length, channels, state, flags",
    [
        (1, 8, 4, "mamba"),
        (7, 12, 4, "plain"),
        (33, 12, 16, "mamba"),
        (130, 9, 4, "gate_only"),
        (33, 17, 4, "skip_bias"),
        (21, 12, 4, "bias_only"),
    ],
)
def test_both_directions_match_reference(length, channels, state, flags):
    inputs, softplus = make_inputs(2, 2, length, channels, state, flags)
    assert_matches_reference(inputs, softplus, torch.float32)


@pytest.mark.parametrize("flags", ["plain", "mamba"])
def test_one_direction_matches_reference(flags):
    inputs, softplus = make_inputs(1, 2, 33, 12, 4, flags)
    assert_matches_reference(inputs, softplus, torch.float32)


def test_bf16_inputs_match_reference():
    inputs, softplus = make_inputs(2, 1, 19, 12, 4, "mamba", dtype=torch.bfloat16)
    assert_matches_reference(inputs, softplus, torch.bfloat16)


@pytest.mark.parametrize(
    "length, channels, walk_grid",
    [(21, 19, None), (21, 16, (3, 7)), (1, 8, None)],
)
def test_butterfly_channel_sums_match_reference(monkeypatch, length, channels, walk_grid):
    # 16 channels a backward program, twice the chunk: dB and dC are summed over channels by the
    # butterfly of scan_backward_kernel (BLOCK_E = 2 BLOCK_L), as at the GPU's 32 and 16, with
    # partial channel blocks, a partial last chunk and a column walk.
    monkeypatch.setattr(scan_triton, "BACKWARD_BLOCK", (16, 1))
    inputs, softplus = make_inputs(2, 1, length, channels, 4, "mamba")
    kwargs = {}
    if walk_grid is not None:
        height, width = walk_grid
        kwargs["walk"] = column_major_walk(height, width)
        kwargs["order"] = torch.arange(length).view(height, width).t().reshape(-1)
    assert_matches_reference(inputs, softplus, torch.float32, **kwargs)


def test_column_major_walk_matches_transposed_grid():
    # An odd, non-square 5 x 7 grid: the column walk must equal scanning the transposed grid.
    height, width = 5, 7
    inputs, softplus = make_inputs(2, 1, height * width, 8, 4, "mamba")
    order = torch.arange(height * width).view(height, width).t().reshape(-1)
    assert_matches_reference(
        inputs, softplus, torch.float32, walk=column_major_walk(height, width), order=order
    )


def test_strided_inputs_are_read_in_place():
    # Views as the mixer passes them: B and C slices of one projection, z half of another; and A
    # with its channels adjacent, which the op lays out as (E, N) first.
    inputs, softplus = make_inputs(2, 1, 20, 8, 4, "mamba")
    projected = torch.randn(2, 1, 20, 3 + 2 * 4)
    inputs["B"], inputs["C"] = projected[..., 3:7], projected[..., 7:]
    inputs["z"] = torch.randn(1, 20, 16)[..., 8:]
    inputs["u"] = inputs["u"].transpose(2, 3).contiguous().transpose(2, 3)
    inputs["A"] = inputs["A"].transpose(1, 2).contiguous().transpose(1, 2)  # channels adjacent
    assert not any(inputs[name].is_contiguous() for name in ("B", "u", "A"))
    assert_matches_reference(inputs, softplus, torch.float32)


def test_selective_scan_triton_backend_has_mamba_layout():
    # The single-direction entry point: (B, E, L) tensors, the same numbers as the reference.
    gen = torch.Generator().manual_seed(1)
    u, delta, z = (torch.randn(2, 12, 21, generator=gen) for _ in range(3))
    a = -torch.rand(12, 4, generator=gen) - 0.1
    b, c = (torch.randn(2, 4, 21, generator=gen) for _ in range(2))
    d, bias = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    args = (u, delta.abs(), a, b, c, d, z, bias, True)
    actual = selective_scan(*args, backend="triton")
    expected = selective_scan_reference(*args)
    assert actual.shape == (2, 12, 21)
    assert_close(actual, expected, torch.float32, "output")


def test_strong_decay_stays_finite():
    # Per-step decays near exp(-80): nothing may be divided by a cumulative decay.
    inputs, _ = make_inputs(2, 1, 40, 8, 16, "plain")
    inputs["delta"] = torch.full_like(inputs["delta"], 5.0)
    inputs["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(2, 8, 1)
    assert_matches_reference(inputs, False, torch.float32)


def test_backend_choice(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # the interpreter
    if hasattr(scan_triton.triton, "knobs"):  # Triton 3.4 and later read it as a boolean
        for spelling in ("true", "On"):
            monkeypatch.setenv("TRITON_INTERPRET", spelling)
            assert resolve_backend("triton", torch.device("cpu")) == "triton", spelling
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs tensors on a CUDA device"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(scan_triton, "triton", None)
    with pytest.raises(RuntimeError, match="needs Triton"):
        resolve_backend("triton", torch.device("cpu"))


def test_bad_shapes_name_the_argument():
    inputs, softplus = make_inputs(2, 1, 8, 4, 4, "mamba")
    inputs["B"] = inputs["B"][..., :3]
    with pytest.raises(ValueError, match="B must have shape"):
        bidirectional_selective_scan(**inputs, delta_softplus=softplus, backend="triton")
    with pytest.raises(ValueError, match="dirs=1 or 2"):
        bidirectional_selective_scan(
            torch.zeros(3, 1, 8, 4), *list(inputs.values())[1:], backend="triton"
        )


@pytest.mark.parametrize("walk", [[0, 8, 1, 1], [0, 0, 1, 0], [3, 9, 1, 0]])
def test_walk_that_is_not_a_permutation_is_refused(walk):
    # Overlapping, empty and out-of-range walks would make the kernels read and write
    # the wrong tokens: the dispatcher refuses them before any backend runs.
    inputs, softplus = make_inputs(2, 1, 9, 4, 4, "mamba")
    with pytest.raises(ValueError, match="does not visit each of the 9 tokens once"):
        bidirectional_selective_scan(**inputs, delta_softplus=softplus, walk=walk, backend="triton")


def test_registered_op_passes_opcheck():
    # torch.library's checks of the schema, the fake (meta) kernel and the autograd registration.
    inputs, _ = make_inputs(2, 1, 9, 8, 4, "mamba")
    args = [inputs[name] for name in NAMES] + [True, scan_triton.row_major_walk(9)]
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        inputs[name].requires_grad_()
    torch.library.opcheck(
        torch.ops.vimdet.scan_walk.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    # The backward op's fake promises contiguous gradients; torch.compile asserts the real strides.
    dout = torch.randn_like(inputs["u"][0])
    torch.library.opcheck(
        torch.ops.vimdet.scan_walk_backward.default,
        [dout] + [arg.detach() if torch.is_tensor(arg) else arg for arg in args],
        test_utils=("test_schema", "test_faketensor"),
    )


def recomputed_and_kept(autocast):
    """Outputs and gradients of a scan whose inputs are made from (x, w_u, w_delta, b_c) both ways:
    recomputed in the backward pass, and kept by autograd (the plain composition)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 6, generator=gen)
    leaves = {
        "x": x,
        "w_u": torch.randn(2, 6, 8, generator=gen) * 0.5,
        "w_delta": torch.randn(2, 6, 8, generator=gen) * 0.2,
        "w_bc": torch.randn(2, 6, 8, generator=gen) * 0.5,
        "a_log": torch.randn(2, 8, 4, generator=gen) * 0.3,
        "z": torch.randn(2, 13, 8, generator=gen),
    }

    def make_inputs(x, w_u, w_delta, w_bc, a_log):
        u = torch.tanh(torch.matmul(x, w_u[:, None]))
        delta = torch.matmul(x, w_delta[:, None])
        bc = torch.matmul(x, w_bc[:, None])  # B and C as views of one projection
        return u, delta, -torch.exp(a_log.float()), bc[..., :4], bc[..., 4:], None, None

    results = []
    for recompute in (True, False):
        tensors = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        ordered = [tensors[k] for k in ("x", "w_u", "w_delta", "w_bc", "a_log")]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if recompute:
                out = scan_triton.scan_walk_recomputing_inputs(
                    make_inputs, ordered, z=tensors["z"], delta_softplus=True
                )
            else:
                out = scan_triton.scan_walk(
                    *make_inputs(*ordered)[:5], z=tensors["z"], delta_softplus=True
                )
        out.float().square().sum().backward()
        results.append((out, {k: v.grad for k, v in tensors.items()}))
    return results


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_recomputed_inputs_give_the_kept_inputs_gradients(autocast):
    # The same ops on the same values: equal up to the order of float additions. Under autocast the
    # backward pass must recompute in bf16 as the forward did, or the gradients would differ.
    (out, grads), (kept_out, kept_grads) = recomputed_and_kept(autocast)
    assert out.dtype == kept_out.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, kept_out, rtol=0, atol=0)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        scale = kept_grads[name].abs().max().item()
        torch.testing.assert_close(grad, kept_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


def _made_anew(*tensors):
    """A scan's ``make_inputs``: new tensors from the leaves, as the mixer's conv and projections
    make them."""
    return tuple(t * 1.0 for t in tensors)


def recomputing_arguments(length: int):
    """Leaves (u, delta, A, B, C, D, delta_bias) that require gradients, z, and softplus."""
    inputs, softplus = make_inputs(2, 1, length, 4, 4, "mamba")
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    return [inputs[name].requires_grad_() for name in names], inputs["z"], softplus


def test_recomputing_scan_checks_the_inputs_it_makes():
    # The inputs exist only inside the op: it checks them there, as the dispatcher checks others.
    leaves, z, softplus = recomputing_arguments(9)
    bad = leaves[:3] + [leaves[3][..., :3]] + leaves[4:]
    with pytest.raises(ValueError, match="B must have shape"):
        bidirectional_selective_scan_recomputing(
            _made_anew, bad, z=z, delta_softplus=softplus, backend="triton"
        )
    with pytest.raises(ValueError, match="does not visit each of the 9 tokens once"):
        bidirectional_selective_scan_recomputing(
            _made_anew, leaves, z=z, delta_softplus=softplus, walk=[0, 8, 1, 1], backend="triton"
        )


def test_recomputing_scan_lets_go_of_z_after_its_backward_pass():
    # Autograd's graph may outlive its backward pass (a caller holding the outputs, as the CUDA
    # graphs' warm-up did): the op must not hold z, a (batch, L, E) activation, meanwhile. A
    # closure over z in its make_inputs held a ViMDet-B training step's in_proj outputs, 1.1 GiB
    # at 1024² batch 2, through the next step.
    leaves, z, softplus = recomputing_arguments(9)
    activation = z.requires_grad_() * 1.0
    held = weakref.ref(activation)
    out = bidirectional_selective_scan_recomputing(
        _made_anew, leaves, z=activation, delta_softplus=softplus, backend="triton"
    )
    del activation
    assert held() is not None  # kept for the backward pass
    out.float().square().sum().backward()
    assert out.grad_fn is not None and held() is None
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.skipif(
    not hasattr(scan_triton.triton, "knobs"), reason="Triton before 3.4 reads only '1'"
)
def test_softplus_scan_runs_when_the_interpreter_is_switched_on_as_true():
    # Triton reads TRITON_INTERPRET=true as on; the kernels must then leave out libdevice's fast
    # log2, which the interpreter cannot run (a fresh process: the choice is made at import).
    code = (
        "import torch\n"
        "from vimdet.ops import bidirectional_selective_scan as scan, scan_triton\n"
        "assert scan_triton.interpreting()\n"
        "u = torch.randn(2, 1, 9, 8)\n"
        "A = -torch.rand(2, 8, 4) - 0.5\n"
        "B, C = torch.randn(2, 1, 9, 4), torch.randn(2, 1, 9, 4)\n"
        "out = scan(u, u.clone(), A, B, C, delta_softplus=True, backend='triton')\n"
        "ref = scan(u, u.clone(), A, B, C, delta_softplus=True, backend='reference')\n"
        "torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="true")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
