"""The Detectron2 backbone: registry, config, pyramid shapes, padding and gradients."""

import copy
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.structures import ImageList

import vimdet  # noqa: F401
from vimdet import add_vimdet_config
from vimdet.modeling import ChannelLayerNorm


def tiny_cfg(**overrides):
    cfg = get_cfg()
    add_vimdet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_vim_fpn_backbone"
    cfg.MODEL.VIM.SIZE = "custom"
    cfg.MODEL.VIM.EMBED_DIM = 32
    cfg.MODEL.VIM.DEPTH = 4
    cfg.MODEL.VIM_FPN.IN_BLOCKS = [1, 2, 3, 4]
    cfg.MODEL.VIM_FPN.OUT_CHANNELS = 16
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def test_registered_under_its_name():
    assert "build_vim_fpn_backbone" in BACKBONE_REGISTRY


def test_patch8_trunk_gives_strides_4_to_64():
    # A patch-8 trunk: p2 is one 2x up-sampling, p3 the trunk's own grid, p5 a 4x max-pool.
    backbone = build_backbone(tiny_cfg(**{"MODEL.VIM.PATCH_SIZE": "8"}))
    outputs = backbone(torch.randn(1, 3, 64, 128))
    strides = {name: spec.stride for name, spec in backbone.output_shape().items()}
    assert strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    for name, feature in outputs.items():
        assert feature.shape[-2:] == (64 // strides[name], 128 // strides[name]), name
    assert isinstance(backbone.stages[3][0], torch.nn.MaxPool2d)
    assert backbone.stages[3][0].kernel_size == 4


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (101, 77)], ids=["square", "wide", "odd"])
def test_pyramid_shapes_after_padding(size):
    backbone = build_backbone(tiny_cfg())
    assert backbone.size_divisibility == 64
    images = ImageList.from_tensors(
        [torch.randn(3, *size)],
        backbone.size_divisibility,
        padding_constraints=backbone.padding_constraints,
    )
    height, width = images.tensor.shape[-2:]
    assert height % 64 == 0 and width % 64 == 0
    outputs = backbone(images.tensor)
    specs = backbone.output_shape()
    assert list(outputs) == ["p2", "p3", "p4", "p5", "p6"]
    for name, feature in outputs.items():
        stride = specs[name].stride
        assert feature.shape == (1, specs[name].channels, height // stride, width // stride), name
    assert [specs[n].stride for n in outputs] == [4, 8, 16, 32, 64]


def test_padding_constraints_use_the_key_imagelist_reads():
    backbone = build_backbone(tiny_cfg())
    assert backbone.padding_constraints["size_divisibility"] == 64
    square = build_backbone(
        tiny_cfg(
            **{
                "MODEL.VIM_FPN.SQUARE_PAD": "256",
                "INPUT.MAX_SIZE_TRAIN": "256",
                "INPUT.MAX_SIZE_TEST": "256",
            }
        )
    )
    images = ImageList.from_tensors(
        [torch.randn(3, 100, 70)], padding_constraints=square.padding_constraints
    )
    assert images.tensor.shape[-2:] == (256, 256)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg())
    outputs = backbone(torch.randn(2, 3, 64, 128))
    sum(feature.square().mean() for feature in outputs.values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_levels_feed_from_their_blocks():
    cfg = tiny_cfg(
        **{
            "MODEL.VIM_FPN.IN_BLOCKS": "[2, 4]",
            "MODEL.VIM_FPN.STRIDES": "[8, 16]",
            "MODEL.VIM_FPN.TOP_BLOCK": "False",
        }
    )
    backbone = build_backbone(cfg)
    assert backbone.net.out_blocks == (2, 4)
    assert list(backbone.output_shape()) == ["p3", "p4"]
    assert backbone.size_divisibility == 16


def test_pyramid_without_norm():
    backbone = build_backbone(tiny_cfg(**{"MODEL.VIM_FPN.NORM": ""}))
    assert backbone(torch.randn(1, 3, 64, 64))["p2"].shape == (1, 16, 16, 16)


def test_named_sizes():
    cfg = tiny_cfg(
        **{
            "MODEL.VIM.SIZE": "small",
            "MODEL.VIM.EMBED_DIM": "0",
            "MODEL.VIM.DEPTH": "0",
            "MODEL.VIM_FPN.IN_BLOCKS": "[6, 12, 18, 24]",
        }
    )
    backbone = build_backbone(cfg)
    assert backbone.net.embed_dim == 384 and len(backbone.net.layers) == 24


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"MODEL.VIM.SIZE": "huge"}, "MODEL.VIM.SIZE 'huge' is unknown"),
        ({"MODEL.VIM.SIZE": "tiny"}, r"MODEL.VIM.SIZE 'tiny' fixes the width.*'custom'"),
        ({"MODEL.VIM.DEPTH": "0"}, "'custom' needs MODEL.VIM.EMBED_DIM and MODEL.VIM.DEPTH > 0"),
        ({"MODEL.VIM_FPN.STRIDES": "[4, 8, 16]"}, "give one stride per block"),
        ({"MODEL.VIM_FPN.STRIDES": "[2, 8, 16, 32]"}, "stride 2 is not supported"),
        (
            {"MODEL.VIM.PATCH_SIZE": "8", "MODEL.VIM_FPN.STRIDES": "[4, 8, 16, 64]"},
            "stride 64 is not supported; use strides of .* the trunk's stride 8",
        ),
        ({"MODEL.VIM_FPN.IN_BLOCKS": "[1, 2, 3, 9]"}, r"1-based block numbers in \[1, depth=4\]"),
        ({"MODEL.VIM_FPN.STRIDES": "[4, 8, 8, 32]"}, "must strictly increase"),
        ({"MODEL.VIM.SCAN_ROUTES": "diagonal"}, "MODEL.VIM.SCAN_ROUTES.*is unknown"),
        ({"MODEL.VIM.ATTENTION_BLOCKS": "[4, 5]"}, r"ATTENTION_BLOCKS\) must be 1-based"),
        (
            {"MODEL.VIM.ATTENTION_BLOCKS": "[4]", "MODEL.VIM.ATTENTION_HEADS": "3"},
            r"3 heads \(MODEL.VIM.ATTENTION_HEADS\) do not divide the width 32",
        ),
        ({"MODEL.VIM_FPN.SQUARE_PAD": "1024"}, "smaller than the largest input side 1333"),
        ({"MODEL.VIM_FPN.CUDA_GRAPHS": "-1"}, "cuda_graphs -1 must be 0 .eager. or the number"),
        (
            {"MODEL.VIM_FPN.CUDA_GRAPHS": "2", "MODEL.VIM.USE_CHECKPOINT": "True"},
            r"cuda_graphs with a trunk that checkpoints its blocks \(MODEL.VIM.USE_CHECKPOINT\)",
        ),
        (
            {"MODEL.VIM_FPN.SQUARE_PAD": "1400", "INPUT.MAX_SIZE_TEST": "1400"},
            "must be 0 or a multiple of the coarsest stride 64",
        ),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(tiny_cfg(**overrides))


def test_cuda_graphs_leave_cpu_inputs_eager_and_copies_capture_afresh():
    torch.manual_seed(0)
    graphed = build_backbone(tiny_cfg(**{"MODEL.VIM_FPN.CUDA_GRAPHS": "2"})).eval()
    eager = build_backbone(tiny_cfg()).eval()  # no drop path
    eager.load_state_dict(graphed.state_dict())
    images = torch.randn(2, 3, 64, 96)
    for name, level in graphed(images).items():
        torch.testing.assert_close(level, eager(images)[name], rtol=0, atol=0)
    assert graphed.graphs.max_graphs == 2 and len(graphed.graphs) == 0
    graphed.graphs._captures["stand-in"] = object()
    copied = copy.deepcopy(graphed)
    assert copied.graphs.max_graphs == 2 and len(copied.graphs) == 0
    assert eager.graphs is None


def test_cuda_graphs_without_square_pad_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="vimdet.modeling.backbone"):
        build_backbone(tiny_cfg(**{"MODEL.VIM_FPN.CUDA_GRAPHS": "2"}))
        build_backbone(
            tiny_cfg(**{"MODEL.VIM_FPN.CUDA_GRAPHS": "2", "MODEL.VIM_FPN.SQUARE_PAD": "1344"})
        )
    warnings = [r.getMessage() for r in caplog.records if "CUDA_GRAPHS" in r.getMessage()]
    assert len(warnings) == 1 and "Set SQUARE_PAD" in warnings[0]


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.double(),  # new storage under the same Parameter objects
        lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
        lambda m: m.net.pos_embed.requires_grad_(False),  # freezing changes the backward
        lambda m: setattr(m.net.layers, "0", copy.deepcopy(m.net.layers[0])),  # a new submodule
    ],
)
def test_cuda_graphs_are_dropped_when_the_weights_move(change):
    model = build_backbone(tiny_cfg(**{"MODEL.VIM_FPN.CUDA_GRAPHS": "2"}))
    graphs = model.graphs
    graphs.forget_stale_captures(model)
    graphs._captures["stand-in"] = object()
    graphs.forget_stale_captures(model)  # nothing changed: kept
    assert len(graphs) == 1
    change(model)
    graphs.forget_stale_captures(model)
    assert len(graphs) == 0


def test_the_graphs_find_every_parameter_and_buffer_once():
    # The walk that replaces module.parameters() and module.buffers() at every call: same tensors,
    # tied parameters and shared submodules once.
    from vimdet.modeling.cuda_graphs import _parameters_and_buffers

    model = build_backbone(tiny_cfg())
    model.net.register_buffer("scale", torch.ones(3))
    model.extra = model.net.layers[1]  # a submodule reached twice
    model.net.layers[2].norm.weight = model.net.layers[3].norm.weight  # a tied parameter
    params, buffers = _parameters_and_buffers(model)
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert [id(b) for b in buffers] == [id(b) for b in model.buffers()]
    assert [id(p) for p in params] == [id(p) for p in _parameters_and_buffers(model)[0]]


def test_channel_layer_norm_equals_detectron2s():
    # Same parameters and numbers as Detectron2's LayerNorm, which it replaces in the pyramid.
    from detectron2.layers.batch_norm import LayerNorm

    torch.manual_seed(0)
    reference, fused = LayerNorm(6), ChannelLayerNorm(6)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    fused.load_state_dict(reference.state_dict())  # same names, strict
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    weight = torch.randn(2, 6, 5, 7)
    outputs, grads = [], []
    for norm in (fused, reference):
        out = norm(x)
        outputs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), [x, norm.weight, norm.bias]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for fused_grad, reference_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-5)


def test_channel_layer_norm_rejects_a_map_of_other_channels():
    # The Triton kernel would read the weight out of bounds; the check comes before any backend.
    norm = ChannelLayerNorm(6)
    with pytest.raises(ValueError, match=r"x \(2, 8, 5, 7\), weight \(6,\)"):
        norm(torch.randn(2, 8, 5, 7))
    with pytest.raises(ValueError, match="B, C, H, W"):
        norm(torch.randn(2, 6, 5))
