"""The Vim trunk: released parameter layout, block semantics, bidirectionality, position grid."""

import math

import pytest
import torch

from vimdet.modeling import BiMambaMixer, VimBlock, VisionMamba, resize_pos_embed
from vimdet.ops import scan_triton, selective_scan_reference, triton_available


def released_trunk_shapes(dim: int, depth: int, state: int = 16) -> dict:
    """Trunk tensor shapes of a released Vim checkpoint, written out from the published layout."""
    inner, rank = 2 * dim, math.ceil(dim / 16)
    shapes = {
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "pos_embed": (1, 196, dim),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (dim,)
        shapes[p + "mixer.in_proj.weight"] = (2 * inner, dim)
        shapes[p + "mixer.out_proj.weight"] = (dim, inner)
        for s in ("", "_b"):
            shapes[p + f"mixer.conv1d{s}.weight"] = (inner, 1, 4)
            shapes[p + f"mixer.conv1d{s}.bias"] = (inner,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (rank + 2 * state, inner)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (inner, rank)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (inner,)
            shapes[p + f"mixer.D{s}"] = (inner,)
        shapes[p + "mixer.A_log"] = (inner, state)
        shapes[p + "mixer.A_b_log"] = (inner, state)
    return shapes


def test_vim_tiny_has_the_released_names_and_shapes():
    net = VisionMamba(embed_dim=192, depth=24)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == released_trunk_shapes(192, 24)
    # 415 tensors in a released file = the trunk + cls_token, norm_f.weight, head.{weight,bias}.
    assert len(own) + 4 == 415


def test_mamba_initialisation():
    mixer = BiMambaMixer(32, d_state=16)
    expected_a = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(64, 16)
    torch.testing.assert_close(mixer.A_log.data, expected_a)
    torch.testing.assert_close(mixer.A_b_log.data, expected_a)
    assert torch.all(mixer.D.data == 1) and torch.all(mixer.D_b.data == 1)
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.data)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    for linear in (mixer.in_proj, mixer.out_proj, mixer.x_proj, mixer.x_proj_b):
        assert linear.weight.std() < 0.03  # Vim's trunc-normal init, std 0.02
    assert mixer.dt_proj.weight.abs().max() > 0.2  # Mamba's U(+-rank^-0.5), rank 2
    flagged = {name for name, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", 0)}
    assert flagged == {"A_log", "A_b_log", "D", "D_b"}


def influence(mixer, source: int, target: int) -> float:
    """|d out[target] / d x[source]|: how much token ``source`` moves token ``target``'s output."""
    torch.manual_seed(1)
    x = torch.randn(1, 12, 8, requires_grad=True)
    mixer(x)[0, target].sum().backward()
    return x.grad[0, source].abs().sum().item()


def test_mixer_looks_both_ways():
    torch.manual_seed(0)
    mixer = BiMambaMixer(8, d_state=4)
    with torch.no_grad():  # weights of a trained model's size (the init's std 0.02 barely mixes)
        for linear in (mixer.in_proj, mixer.x_proj, mixer.x_proj_b, mixer.out_proj):
            torch.nn.init.normal_(linear.weight, std=0.3)
    assert influence(mixer, source=11, target=0) > 1e-6  # the last token reaches the first
    assert influence(mixer, source=0, target=11) > 1e-6  # and the first reaches the last
    # Without the backward direction's state (B = C = 0) nothing flows from the future.
    with torch.no_grad():
        mixer.x_proj_b.weight.zero_()
    assert influence(mixer, source=11, target=0) == 0.0
    assert influence(mixer, source=0, target=11) > 1e-6


def released_mixer(mixer, hidden):
    """Vim's released computation, written out independently of the mixer's code: the backward
    branch runs the same layers on the flipped sequence and its output is flipped back."""
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    outputs = []
    for suffix, flip in (("", False), ("_b", True)):
        conv = getattr(mixer, "conv1d" + suffix)
        x_proj, dt_proj = getattr(mixer, "x_proj" + suffix), getattr(mixer, "dt_proj" + suffix)
        a_log = getattr(mixer, "A_log" if not suffix else "A_b_log")
        xs, zs = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        u = torch.nn.functional.silu(conv(xs)[..., : xs.shape[-1]])
        sizes = [mixer.dt_rank, mixer.d_state, mixer.d_state]
        dt, b, c = x_proj(u.transpose(1, 2)).split(sizes, -1)
        y = selective_scan_reference(
            u,
            (dt @ dt_proj.weight.t()).transpose(1, 2),
            -torch.exp(a_log),
            b.transpose(1, 2),
            c.transpose(1, 2),
            getattr(mixer, "D" + suffix),
            zs,
            dt_proj.bias,
            True,
        )
        outputs.append(y.flip(-1) if flip else y)
    return mixer.out_proj(((outputs[0] + outputs[1]) / 2).transpose(1, 2))


@pytest.mark.parametrize("backend", ["chunked", "reference", "triton"])
def test_mixer_computes_released_vim(backend):
    # Every backend through the mixer's flip-free computation equals the released definition.
    if backend == "triton" and not (triton_available() and scan_triton.interpreting()):
        pytest.skip("the triton backend runs on a GPU (tests/gpu) or under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    mixer = BiMambaMixer(8, d_state=4, scan_backend=backend)
    with torch.no_grad():
        for linear in (mixer.in_proj, mixer.x_proj, mixer.x_proj_b, mixer.out_proj):
            torch.nn.init.normal_(linear.weight, std=0.3)
        for conv in (mixer.conv1d, mixer.conv1d_b):
            torch.nn.init.normal_(conv.weight, std=0.5)  # asymmetric taps: a flip would show
    x = torch.randn(2, 13, 8)
    torch.testing.assert_close(mixer(x), released_mixer(mixer, x), rtol=1e-4, atol=1e-5)


def test_block_stream_semantics():
    torch.manual_seed(0)
    block = VimBlock(8, d_state=4).eval()
    x = torch.randn(2, 5, 8)
    hidden, residual = block(x, None)
    torch.testing.assert_close(residual, x)  # block 1 starts with residual = x
    torch.testing.assert_close(hidden, block.mixer(block.norm(x)))
    hidden2, residual2 = block(hidden, residual)
    torch.testing.assert_close(residual2, residual + hidden)
    assert residual2.dtype == torch.float32


def test_trunk_returns_the_stream_after_each_requested_block():
    torch.manual_seed(0)
    net = VisionMamba(embed_dim=16, depth=3, out_blocks=(1, 3)).eval()
    image = torch.randn(1, 3, 32, 48)
    outputs = net(image)
    assert set(outputs) == {"block1", "block3"}
    assert outputs["block3"].shape == (1, 16, 2, 3)
    tokens, grid = net.patch_embed(image)
    hidden, residual = tokens + net.position_embedding(grid), None
    streams = []
    for layer in net.layers:
        hidden, residual = layer(hidden, residual)
        streams.append(residual + hidden)
    expected = streams[2].transpose(1, 2).reshape(1, 16, 2, 3)
    torch.testing.assert_close(outputs["block3"], expected)


def test_drop_path_schedule():
    net = VisionMamba(embed_dim=8, depth=4, drop_path_rate=0.3, out_blocks=(4,))
    rates = [layer.drop_path.rate for layer in net.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.2])


def test_position_grid_resize():
    pos = torch.randn(1, 14 * 14, 8)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    resized = resize_pos_embed(pos, (14, 14), (20, 31))
    assert resized.shape == (1, 20 * 31, 8)
    # The separable matrix form equals PyTorch's bicubic upsampling, values and gradients.
    pos.requires_grad_()
    grid = pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = (
        torch.nn.functional.interpolate(grid, size=(20, 31), mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(1, 20 * 31, 8)
    )
    resized = resize_pos_embed(pos, (14, 14), (20, 31))
    torch.testing.assert_close(resized, expected, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(resized)
    (grad,) = torch.autograd.grad((resized * weight).sum(), pos)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), pos)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)  # fp32 sums of 620
    # Up then down by an integer factor of a constant grid stays constant.
    constant = torch.full((1, 16, 8), 0.5)
    torch.testing.assert_close(
        resize_pos_embed(constant, (4, 4), (9, 5)), torch.full((1, 45, 8), 0.5)
    )


def test_position_grid_cache_follows_parameter_updates():
    net = VisionMamba(embed_dim=8, depth=1, out_blocks=(1,), pretrain_img_size=64)
    with torch.no_grad():
        first = net.position_embedding((3, 5))
        assert net.position_embedding((3, 5)) is first  # cached
        net.pos_embed.add_(1.0)  # what an optimizer step does
        second = net.position_embedding((3, 5))
    torch.testing.assert_close(second, first + 1.0)
    assert net.position_embedding((3, 5)).requires_grad  # training path: no stale cache


def test_nothing_is_cached_while_a_cuda_graph_is_captured(monkeypatch):
    # A capture would keep reading a cached tensor: stale after an optimizer step, freed once the
    # cache lets it go. The capture query is stubbed: this machine has no GPU.
    from vimdet.modeling import vim

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert vim._cacheable(torch.device("cpu")) and not vim._cacheable(torch.device("cuda"))
    monkeypatch.setattr(vim, "_cacheable", lambda device: False)
    vim._cached_bicubic_weights.cache_clear()
    net = VisionMamba(embed_dim=8, depth=1, out_blocks=(1,), pretrain_img_size=64)
    with torch.no_grad():
        net.position_embedding((3, 5))
    assert net._pos_cache == {} and vim._cached_bicubic_weights.cache_info().currsize == 0


def test_input_not_multiple_of_patch_is_an_error():
    net = VisionMamba(embed_dim=8, depth=1, out_blocks=(1,))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        net(torch.randn(1, 3, 40, 32))


def test_bad_out_blocks():
    with pytest.raises(ValueError, match="1-based block numbers"):
        VisionMamba(embed_dim=8, depth=4, out_blocks=(0, 4))
    with pytest.raises(ValueError, match=r"tap block 4 or set the depth \(MODEL.VIM.DEPTH\) to 3"):
        VisionMamba(embed_dim=8, depth=4, out_blocks=(1, 3))


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_training_block_keeps_the_scan_inputs_only_where_it_cannot_recompute(backend):
    # The activations autograd keeps for one block's backward pass, by storage. (2, B, L, 2E)-sized
    # ones: in_proj's output xz (x and z) on every backend; on the others, the scan's inputs u and
    # delta, (2, B, L, E) per direction pair, too. The triton backend recomputes those instead
    # (half the block's activations).
    if backend == "triton" and not (triton_available() and scan_triton.interpreting()):
        pytest.skip("the triton backend runs through Triton's interpreter on the CPU")
    torch.manual_seed(0)
    block = VimBlock(16, scan_backend=backend)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out, residual = block(hidden, None)
    activation_bytes = 2 * 12 * 2 * 32 * 4  # (B, L, 2E) fp32, the size of xz, or of u or delta
    kept = sum(nbytes == activation_bytes for nbytes in storages.values())
    assert kept == 1 if backend == "triton" else kept >= 3
    (out.sum() + residual.sum()).backward()
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
