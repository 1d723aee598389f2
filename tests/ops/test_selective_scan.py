"""The chunked selective scan against the step-by-step reference: outputs and every gradient."""

import importlib

import pytest
import torch

from vimdet.ops import (
    ENV_VAR,
    bidirectional_selective_scan,
    column_major_walk,
    cuda_kernel_available,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

# Tolerances relative to the largest magnitude of the compared tensor. Both backends compute in
# fp32 from the same inputs and differ only in summation order; bf16 results are also rounded to
# bf16 (8 bits of mantissa) on the way out.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}

FLAGS = {
    "plain": dict(with_d=False, with_z=False, with_bias=False, softplus=False),
    "mamba": dict(with_d=True, with_z=True, with_bias=True, softplus=True),
    "d_softplus": dict(with_d=True, with_z=False, with_bias=False, softplus=True),
}


def make_inputs(batch, channels, length, state, dtype, with_d, with_z, with_bias, softplus, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    inputs = {
        "u": randn(batch, channels, length),
        # Softplus'd deltas around 0.7, raw ones around 0.5: decays well inside (0, 1).
        "delta": (torch.rand(batch, channels, length, generator=gen) * (0.5 if softplus else 1.0))
        .to(dtype)
        .requires_grad_(),
        "A": (-torch.rand(channels, state, generator=gen) * 2 - 0.1).requires_grad_(),
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": torch.randn(channels, generator=gen).requires_grad_() if with_d else None,
        "z": randn(batch, channels, length) if with_z else None,
        "delta_bias": (torch.randn(channels, generator=gen) * 0.5).requires_grad_()
        if with_bias
        else None,
    }
    return inputs, softplus


def run_with_grads(scan, inputs, softplus):
    for value in inputs.values():
        if value is not None:
            value.grad = None
    out = scan(**inputs, delta_softplus=softplus)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # a non-uniform upstream gradient
    (out.float() * weight).sum().backward()
    grads = {name: value.grad.clone() for name, value in inputs.items() if value is not None}
    return out.detach(), grads


def assert_close(actual, expected, dtype, what):
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 7, 64, 1000])
@pytest.mark.parametrize("flags", list(FLAGS), ids=list(FLAGS))
def test_chunked_matches_reference(length, dtype, flags):
    inputs, softplus = make_inputs(2, 3, length, 4, dtype, **FLAGS[flags])
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, softplus)
    actual, actual_grads = run_with_grads(selective_scan_chunked, inputs, softplus)
    assert actual.dtype == dtype and actual.shape == (2, 3, length)
    assert_close(actual, expected, dtype, "output")
    assert set(actual_grads) == set(expected_grads)
    for name in expected_grads:
        assert actual_grads[name].dtype == inputs[name].dtype
        assert_close(actual_grads[name], expected_grads[name], dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_reference_long_sequence(dtype):
    inputs, softplus = make_inputs(1, 2, 4096, 16, dtype, **FLAGS["mamba"])
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, softplus)
    actual, actual_grads = run_with_grads(selective_scan_chunked, inputs, softplus)
    assert_close(actual, expected, dtype, "output")
    for name in expected_grads:
        assert_close(actual_grads[name], expected_grads[name], dtype, f"grad of {name}")


def test_chunked_is_stable_with_strong_decay():
    # Large deltas times A = -16 give per-step decays near exp(-80): a cumulative-product
    # formulation would overflow; the chunked scan must stay finite and exact.
    inputs, _ = make_inputs(1, 2, 300, 16, torch.float32, **FLAGS["plain"])
    with torch.no_grad():
        inputs["delta"].mul_(0).add_(5.0)
        inputs["A"].copy_(-torch.arange(1, 17, dtype=torch.float32).repeat(2, 1))
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, False)
    actual, actual_grads = run_with_grads(selective_scan_chunked, inputs, False)
    assert torch.isfinite(actual).all()
    assert_close(actual, expected, torch.float32, "output")
    for name in expected_grads:
        assert torch.isfinite(actual_grads[name]).all()
        assert_close(actual_grads[name], expected_grads[name], torch.float32, f"grad of {name}")


def test_recurrence_by_hand():
    # One channel, one state: h = a h + dt*b*u, y = c h, checked without any backend code.
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    a = torch.tensor([[-1.0]])
    b = torch.tensor([[[1.0, 0.5, 2.0]]])
    c = torch.tensor([[[2.0, 1.0, -1.0]]])
    h, expected = 0.0, []
    for t in range(3):
        h = torch.exp(delta[0, 0, t] * a[0, 0]) * h + delta[0, 0, t] * b[0, 0, t] * u[0, 0, t]
        expected.append(c[0, 0, t] * h)
    for scan in (selective_scan_reference, selective_scan_chunked):
        torch.testing.assert_close(scan(u, delta, a, b, c)[0, 0], torch.stack(expected))


def test_auto_uses_chunked_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"  # explicit wins
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fastest'"):
        resolve_backend("auto", torch.device("cpu"))


def test_backend_argument_is_dispatched(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    inputs, softplus = make_inputs(1, 2, 5, 3, torch.float32, **FLAGS["mamba"])
    for backend in ("auto", "chunked", "reference"):
        out = selective_scan(**inputs, delta_softplus=softplus, backend=backend)
        expected = selective_scan_reference(**inputs, delta_softplus=softplus)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(cuda_kernel_available(), reason="mamba-ssm is installed here")
def test_cuda_backend_without_mamba_names_the_install_command():
    inputs, _ = make_inputs(1, 2, 5, 3, torch.float32, **FLAGS["plain"])
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[cuda\]"):
        selective_scan(**inputs, backend="cuda")


def test_unknown_backend_is_rejected():
    inputs, _ = make_inputs(1, 2, 5, 3, torch.float32, **FLAGS["plain"])
    with pytest.raises(ValueError, match="choose one of"):
        selective_scan(**inputs, backend="triton-magic")


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("u", torch.zeros(2, 3), r"u must be \(batch, channels, length\)"),
        ("A", torch.zeros(5, 3), r"A must be \(channels=2, state\)"),
        ("B", torch.zeros(1, 3, 4), r"B must have shape \(1, 3, 5\)"),
        ("D", torch.zeros(3), r"D must have shape \(2,\)"),
        ("z", torch.zeros(1, 2, 5, dtype=torch.int64), "real floating-point"),
        ("C", torch.zeros(1, 3, 5, device="meta"), "put every input on the same device"),
    ],
)
def test_bad_inputs_raise_clear_errors(name, bad, message):
    inputs, _ = make_inputs(1, 2, 5, 3, torch.float32, **FLAGS["mamba"])
    inputs[name] = bad
    for scan in (selective_scan_reference, selective_scan_chunked):
        with pytest.raises((ValueError, TypeError), match=message):
            scan(**inputs)


def test_chunked_stays_fp32_under_autocast():
    # Autocast would run the scan's contractions in bf16; the op must compute in fp32 anyway.
    inputs, softplus = make_inputs(2, 3, 50, 4, torch.float32, **FLAGS["mamba"])
    expected, expected_grads = run_with_grads(selective_scan_chunked, inputs, softplus)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, actual_grads = run_with_grads(selective_scan_chunked, inputs, softplus)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for name in expected_grads:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-6, atol=1e-6)


def test_chunked_channel_groups_match_reference(monkeypatch):
    # On the CPU the chunked scan runs channel groups of a bounded size; force several groups
    # (here 2 channels each, the last one smaller) and check output and gradients.
    module = importlib.import_module("vimdet.ops.scan_chunked")
    monkeypatch.setattr(module, "_CPU_GROUP_ELEMENTS", 2 * 2 * 30 * 4)
    inputs, softplus = make_inputs(2, 5, 30, 4, torch.float32, **FLAGS["mamba"])
    expected, expected_grads = run_with_grads(selective_scan_reference, inputs, softplus)
    actual, actual_grads = run_with_grads(selective_scan_chunked, inputs, softplus)
    assert_close(actual, expected, torch.float32, "output")
    for name in expected_grads:
        assert_close(actual_grads[name], expected_grads[name], torch.float32, f"grad of {name}")


def transposed_grid(tensor, height, width):
    """(batch, H*W, C) row-major -> (batch, W*H, C) row-major over the transposed W x H grid."""
    return tensor.reshape(tensor.shape[0], height, width, -1).transpose(1, 2).reshape(tensor.shape)


@pytest.mark.parametrize("height, width", [(3, 5), (4, 7), (5, 1)])
def test_column_walk_of_the_fallback_equals_reference_on_the_transposed_grid(height, width):
    # The gathering backends along the column-major walk against the reference scan of an
    # explicitly transposed grid: direction 0 down the columns, direction 1 up them.
    gen = torch.Generator().manual_seed(height * width)
    batch, length, channels, state = 2, height * width, 6, 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    u, z = randn(2, batch, length, channels), randn(batch, length, channels)
    delta = torch.rand(2, batch, length, channels, generator=gen) * 0.5
    a = -torch.rand(2, channels, state, generator=gen) * 2 - 0.1
    b, c = randn(2, batch, length, state), randn(2, batch, length, state)
    d, bias = randn(2, channels), randn(2, channels) * 0.5
    actual = bidirectional_selective_scan(
        u, delta, a, b, c, d, z, bias, True, walk=column_major_walk(height, width),
        backend="chunked",
    )  # fmt: skip

    def columns(tensor, flip):
        """Channel-major (batch, C, L) copy of ``tensor`` along the columns (flipped: up)."""
        seq = transposed_grid(tensor, height, width).transpose(1, 2)
        return seq.flip(-1) if flip else seq

    total = 0
    for direction in range(2):
        flip = direction == 1
        y = selective_scan_reference(
            columns(u[direction], flip), columns(delta[direction], flip), a[direction],
            columns(b[direction], flip), columns(c[direction], flip), d[direction],
            columns(z, flip), bias[direction], True,
        )  # fmt: skip
        y = (y.flip(-1) if flip else y).transpose(1, 2)  # (batch, W*H, C) over the transposed grid
        total = total + transposed_grid(y, width, height)
    assert_close(actual, total / 2, torch.float32, "column walk")
