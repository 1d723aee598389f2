"""Trunk options (docs/trunk_options.md): column and cross scan routes against Vim's released
computation on an explicitly transposed grid, attention blocks against plain softmax attention,
and both through the trunk, the pyramid, the optimizer's groups and a detector step on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import vimdet  # noqa: F401
from vimdet import add_vimdet_config
from vimdet.modeling import AttentionMixer, BiMambaMixer, VisionMamba
from vimdet.ops import scan_triton, selective_scan_reference, triton_available
from vimdet.solver import vim_param_groups

HEIGHT, WIDTH = 3, 5  # an odd, non-square token grid


def transposed_grid(tensor, height, width):
    """(B, H*W, C) row-major -> (B, W*H, C) row-major over the transposed W x H grid."""
    return tensor.reshape(tensor.shape[0], height, width, -1).transpose(1, 2).reshape(tensor.shape)


def released_branches(mixer, x, z, suffixes):
    """Vim's released computation of one pair of directions, written out independently of the
    mixer: (y_fwd + y_bwd) / 2 with the backward branch on the flipped sequence. x, z (B, L, E)."""
    x, z = x.transpose(1, 2), z.transpose(1, 2)
    outputs = []
    for suffix, flip in zip(suffixes, (False, True)):
        conv = getattr(mixer, "conv1d" + suffix)
        x_proj, dt_proj = getattr(mixer, "x_proj" + suffix), getattr(mixer, "dt_proj" + suffix)
        xs, zs = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        u = F.silu(conv(xs)[..., : xs.shape[-1]])
        dt, b, c = x_proj(u.transpose(1, 2)).split(
            [mixer.dt_rank, mixer.d_state, mixer.d_state], -1
        )
        y = selective_scan_reference(
            u,
            (dt @ dt_proj.weight.t()).transpose(1, 2),
            -torch.exp(getattr(mixer, f"A{suffix}_log")),
            b.transpose(1, 2),
            c.transpose(1, 2),
            getattr(mixer, "D" + suffix),
            zs,
            dt_proj.bias,
            True,
        )
        outputs.append(y.flip(-1) if flip else y)
    return ((outputs[0] + outputs[1]) / 2).transpose(1, 2)


def along_columns(mixer, hidden, suffixes):
    """The released computation run on the explicitly transposed grid, read back in row order."""
    x, z = mixer.in_proj(transposed_grid(hidden, HEIGHT, WIDTH)).chunk(2, dim=-1)
    return transposed_grid(released_branches(mixer, x, z, suffixes), WIDTH, HEIGHT)


def trained_like(mixer):
    """Weights of a trained model's size (the init's std 0.02 barely mixes), asymmetric taps."""
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            if name.startswith(("in_proj", "x_proj", "out_proj")):
                torch.nn.init.normal_(param, std=0.3)
            elif name.startswith("conv1d") and name.endswith("weight"):
                torch.nn.init.normal_(param, std=0.5)
    return mixer


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_column_route_is_vims_mixer_on_the_transposed_grid(backend):
    torch.manual_seed(0)
    mixer = trained_like(BiMambaMixer(8, d_state=4, scan_backend=backend, route="column"))
    hidden = torch.randn(2, HEIGHT * WIDTH, 8)
    expected = mixer.out_proj(along_columns(mixer, hidden, ("", "_b")))
    torch.testing.assert_close(mixer(hidden, (HEIGHT, WIDTH)), expected, rtol=1e-4, atol=1e-5)
    # and it is not the row route (the grid is not symmetric)
    assert not torch.allclose(mixer(hidden, (HEIGHT, WIDTH)), mixer.out_proj(
        released_branches(mixer, *mixer.in_proj(hidden).chunk(2, -1), ("", "_b"))
    ), atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_cross_route_averages_four_routes_with_its_own_column_parameters(backend):
    # On triton (its interpreter here) the column walks read the token-major tensors in place.
    if backend == "triton" and not (triton_available() and scan_triton.interpreting()):
        pytest.skip("the triton backend runs on a GPU (tests/gpu) or under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    mixer = trained_like(BiMambaMixer(8, d_state=4, scan_backend=backend, route="cross"))
    hidden = torch.randn(2, HEIGHT * WIDTH, 8)
    rows = released_branches(mixer, *mixer.in_proj(hidden).chunk(2, dim=-1), ("", "_b"))
    columns = along_columns(mixer, hidden, ("_c", "_cb"))
    expected = mixer.out_proj((rows + columns) / 2)
    torch.testing.assert_close(mixer(hidden, (HEIGHT, WIDTH)), expected, rtol=1e-4, atol=1e-5)
    extra = {n for n, _ in mixer.named_parameters()} - {
        n for n, _ in BiMambaMixer(8, d_state=4).named_parameters()
    }
    assert extra == {
        f"{module}{s}.{p}" for module in ("conv1d", "x_proj", "dt_proj") for s in ("_c", "_cb")
        for p in (("weight", "bias") if module != "x_proj" else ("weight",))
    } | {"A_c_log", "A_cb_log", "D_c", "D_cb"}  # fmt: skip
    flagged = {n for n, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "A_b_log", "D", "D_b", "A_c_log", "A_cb_log", "D_c", "D_cb"}


def test_routes_need_the_grid():
    mixer = BiMambaMixer(8, d_state=4, route="cross")
    with pytest.raises(ValueError, match=r"route 'cross' needs the \(height, width\) token grid"):
        mixer(torch.randn(1, 15, 8), (4, 4))


def test_attention_mixer_is_softmax_attention():
    torch.manual_seed(0)
    mixer = AttentionMixer(12, num_heads=3)
    hidden = torch.randn(2, 7, 12)
    q, k, v = mixer.qkv(hidden).chunk(3, dim=-1)
    heads = [slice(4 * h, 4 * h + 4) for h in range(3)]
    out = torch.cat(
        [torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, -1) @ v[..., s] for s in heads],
        dim=-1,
    )
    torch.testing.assert_close(mixer(hidden), mixer.proj(out), rtol=1e-5, atol=1e-6)


def test_trunk_routes_and_attention_blocks():
    net = VisionMamba(
        embed_dim=16, depth=4, out_blocks=(2, 4), scan_routes="row_column", attention_blocks=[4]
    )
    kinds = [(type(b.mixer).__name__, getattr(b.mixer, "route", None)) for b in net.layers]
    assert kinds == [
        ("BiMambaMixer", "row"),
        ("BiMambaMixer", "column"),
        ("BiMambaMixer", "row"),
        ("AttentionMixer", None),
    ]
    # row_column has exactly Vim's parameters (released checkpoints load strictly)
    assert set(VisionMamba(embed_dim=16, depth=4, out_blocks=(4,)).state_dict()) == set(
        VisionMamba(embed_dim=16, depth=4, out_blocks=(4,), scan_routes="row_column").state_dict()
    )
    features = net(torch.randn(1, 3, 48, 80))  # a 3 x 5 token grid
    assert features["block4"].shape == (1, 16, 3, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scan_routes="diagonal"), r"scan_routes 'diagonal' \(MODEL.VIM.SCAN_ROUTES\)"),
        (dict(attention_blocks=[0]), r"attention_blocks \(0,\).*in \[1, depth=4\]"),
        (dict(attention_blocks=[5]), r"attention_blocks \(5,\).*in \[1, depth=4\]"),
        (dict(attention_blocks=[4], attention_heads=5), "5 heads .* do not divide the width 16"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionMamba(embed_dim=16, depth=4, out_blocks=(4,), **kwargs)


def tiny_cfg(*overrides):
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.merge_from_file("configs/shapes/Base-Shapes.yaml")
    cfg.merge_from_list(
        [
            "MODEL.VIM.SIZE", "custom", "MODEL.VIM.EMBED_DIM", "16", "MODEL.VIM.DEPTH", "4",
            "MODEL.VIM.D_STATE", "4", "MODEL.VIM_FPN.IN_BLOCKS", "[1, 2, 3, 4]",
            "MODEL.VIM_FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", *overrides,
        ]
    )  # fmt: skip
    return cfg


OPTIONS = {
    "cross": ["MODEL.VIM.SCAN_ROUTES", "cross"],
    "row_column": ["MODEL.VIM.SCAN_ROUTES", "row_column"],
    "attention": ["MODEL.VIM.ATTENTION_BLOCKS", "[3, 4]", "MODEL.VIM.ATTENTION_HEADS", "2"],
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_pyramid_and_detector_step_on_the_cpu(option):
    # A non-square input, padded to 64: every level's shape, then one training step of the whole
    # detector in which every parameter gets a gradient (as DDP requires).
    torch.manual_seed(0)
    cfg = tiny_cfg(*OPTIONS[option])
    backbone = build_backbone(cfg)
    levels = backbone(torch.randn(1, 3, 128, 192))
    assert {k: tuple(v.shape[-2:]) for k, v in levels.items()} == {
        "p2": (32, 48), "p3": (16, 24), "p4": (8, 12), "p5": (4, 6), "p6": (2, 3),
    }  # fmt: skip
    model = build_model(cfg)
    model.train()
    image = torch.rand(3, 96, 160) * 255
    boxes = torch.tensor([[10.0, 10.0, 60.0, 40.0], [80.0, 20.0, 100.0, 90.0]])
    instances = Instances((96, 160), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 3]))
    with EventStorage():
        losses = model([{"image": image, "instances": instances, "height": 96, "width": 160}])
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_new_parameters_get_their_blocks_layer_id_and_no_decay_flags():
    cfg = tiny_cfg(*OPTIONS["cross"], *OPTIONS["attention"])
    model = build_model(cfg)
    groups = vim_param_groups(model, base_lr=1.0, weight_decay=0.1, layer_decay=0.5, depth=4)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    net = "backbone.net.layers."
    # block i (0-based) of 4: lr 0.5 ** (4 - i)
    assert lr_of[id(params[net + "0.mixer.x_proj_c.weight"])] == 0.5**4
    assert lr_of[id(params[net + "1.mixer.A_cb_log"])] == 0.5**3
    assert lr_of[id(params[net + "3.mixer.qkv.weight"])] == 0.5**1
    for name in ("0.mixer.A_c_log", "0.mixer.D_cb", "3.mixer.qkv.bias", "3.mixer.proj.bias"):
        assert decay_of[id(params[net + name])] == 0.0, name
    for name in ("0.mixer.x_proj_cb.weight", "3.mixer.qkv.weight", "3.mixer.proj.weight"):
        assert decay_of[id(params[net + name])] == 0.1, name


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depth=3, out_blocks=(3,), scan_routes="cross")
    net = VisionMamba(**kwargs, attention_blocks=[3], scan_backend="chunked")
    checkpointed = VisionMamba(**kwargs, attention_blocks=[3], scan_backend="chunked",
                               use_checkpoint=True)  # fmt: skip
    checkpointed.load_state_dict(net.state_dict())
    image = torch.randn(1, 3, 48, 80)
    grads = []
    for model in (net, checkpointed):
        model.train()
        model(image)["block3"].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
