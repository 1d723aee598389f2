"""vimdet.ops.flops: the scan's FLOP formula against a hand count of its recurrence, and fvcore's
count of a tiny trunk against the layer-by-layer formula, the same on every scan backend."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.analysis import _IGNORED_OPS
from fvcore.nn import FlopCountAnalysis

from vimdet.modeling.vim import VisionMamba
from vimdet.ops import bidirectional_selective_scan, triton_available
from vimdet.ops.flops import VIMDET_FLOP_HANDLES, scan_flops


class Tally:
    """Counts the multiplies and multiply-adds it performs (fvcore's flops)."""

    def __init__(self):
        self.count = 0

    def mul(self, a, b):
        self.count += 1
        return a * b

    def fma(self, a, b, c):  # a * b + c, one fused multiply-add
        self.count += 1
        return a * b + c


def counted_scan(u, delta, A, B, C, D, z, delta_bias, tally):
    """Vim's two-direction scan, one scalar at a time, every counted operation through ``tally``.
    Shapes as bidirectional_selective_scan's (dirs, batch, L, E) layout; returns (batch, L, E)."""
    dirs, batch, length, channels = u.shape
    state = A.shape[-1]
    out = torch.zeros(batch, length, channels, dtype=torch.float64)
    for d in range(dirs):
        steps = range(length) if d == 0 else range(length - 1, -1, -1)
        for b in range(batch):
            for e in range(channels):
                h = [0.0] * state
                for t in steps:
                    dt = F.softplus(delta[d, b, t, e] + delta_bias[d, e]).item()  # not counted
                    du = tally.mul(dt, u[d, b, t, e].item())
                    y = 0.0
                    for n in range(state):
                        decay = math.exp(tally.mul(dt, A[d, e, n].item()))  # exp not counted
                        drive = tally.mul(du, B[d, b, t, n].item())
                        h[n] = tally.fma(decay, h[n], drive)
                        y = tally.fma(C[d, b, t, n].item(), h[n], y)
                    y = tally.fma(D[d, e].item(), u[d, b, t, e].item(), y)
                    gate = F.silu(z[b, t, e]).item()  # not counted
                    out[b, t, e] += tally.mul(y, gate) / dirs  # the mean: element-wise
    return out


def test_scan_formula_equals_hand_count_of_the_recurrence():
    torch.manual_seed(0)
    dirs, batch, length, channels, state = 2, 2, 5, 3, 4
    u = torch.randn(dirs, batch, length, channels, dtype=torch.float64)
    delta = torch.randn_like(u)
    A = -torch.rand(dirs, channels, state, dtype=torch.float64) - 0.5
    B = torch.randn(dirs, batch, length, state, dtype=torch.float64)
    C = torch.randn_like(B)
    D = torch.randn(dirs, channels, dtype=torch.float64)
    z = torch.randn(batch, length, channels, dtype=torch.float64)
    bias = torch.randn(dirs, channels, dtype=torch.float64)
    tally = Tally()
    counted = counted_scan(u, delta, A, B, C, D, z, bias, tally)
    # The hand-counted loop is the scan: it equals the reference backend.
    reference = bidirectional_selective_scan(
        u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="reference"
    )
    torch.testing.assert_close(counted, reference, rtol=1e-6, atol=1e-6)
    assert tally.count == scan_flops(dirs, batch, length, channels, state)
    assert tally.count == dirs * batch * length * channels * (4 * state + 3)


def trunk_flops(backend, dim, depth, state, height, width):
    """fvcore's analysis of a tiny trunk, ViMDet's handles set, Detectron2's ignored ops."""
    trunk = VisionMamba(
        embed_dim=dim, depth=depth, d_state=state, out_blocks=(depth,), scan_backend=backend
    ).eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(trunk, torch.randn(1, 3, height, width))
        analysis.set_op_handle(**VIMDET_FLOP_HANDLES, **dict.fromkeys(_IGNORED_OPS))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.total()
    return analysis


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_fvcore_counts_every_op_of_the_trunk(backend):
    """224 x 224 keeps the 14 x 14 position grid (no resize): the count is the patch conv plus,
    per block, in_proj, both convs, x_proj, dt_proj, the scan and out_proj."""
    dim, depth, state, taps = 16, 2, 4, 4
    analysis = trunk_flops(backend, dim, depth, state, 224, 224)
    total, by_operator = analysis.total(), analysis.by_operator()
    length, inner, rank = 14 * 14, 2 * dim, math.ceil(dim / 16)
    block = (
        length * dim * 2 * inner  # in_proj
        + 2 * length * inner * taps  # both directions' depthwise convs
        + 2 * length * inner * (rank + 2 * state)  # x_proj of both directions
        + 2 * length * rank * inner  # dt_proj of both directions
        + scan_flops(2, 1, length, inner, state)
        + length * inner * dim  # out_proj
    )
    assert total == length * dim * 3 * 16 * 16 + depth * block
    assert by_operator["bidirectional_scan"] == depth * scan_flops(2, 1, length, inner, state)
    assert not [op for op in analysis.unsupported_ops() if op.startswith("vimdet::")]


@pytest.mark.slow  # Triton's interpreter: ~10 s of CPU, 40 s on the shared CI machine
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_ops_count_as_the_chunked_path():
    """vimdet::scan_walk and vimdet::conv_both_directions (run by Triton's interpreter on the
    CPU) count what the chunked scan and F.conv1d count; 32 x 48 keeps the interpreter quick."""
    chunked = trunk_flops("chunked", 16, 2, 4, 32, 48)
    triton = trunk_flops("triton", 16, 2, 4, 32, 48)
    assert triton.total() == chunked.total()
    ops = triton.by_operator()
    assert ops["scan_walk"] == chunked.by_operator()["bidirectional_scan"] > 0
    assert ops["conv_both_directions"] == 2 * 2 * 6 * 32 * 4  # blocks * dirs * L * E * taps
    assert not [op for op in triton.unsupported_ops() if op.startswith("vimdet::")]
