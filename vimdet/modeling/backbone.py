"""A multi-level simple feature pyramid over the Vim trunk, registered with Detectron2.

ViTDet (Li et al., arXiv 2203.16527) builds its pyramid from the last block alone; ViMDet feeds
each level from its own block (by default blocks 6/12/18/24 -> strides 4/8/16/32), each resampled
from the trunk's stride (its patch size, 16 by default) with ViTDet's up/down-sampling and
LayerNorm'd 1x1 and 3x3 convs, plus a max-pooled p6.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import Tensor, nn

from vimdet.ops import channel_layer_norm

from .cuda_graphs import CudaGraphs
from .vim import VIM_SIZES, VisionMamba, _no_weight_decay, _tracing

__all__ = ["ChannelLayerNorm", "VimFeaturePyramid", "build_vim_fpn_backbone", "vim_trunk_kwargs"]

logger = logging.getLogger(__name__)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ViTDet's pyramid norm, Li et al.,
    arXiv 2203.16527), with Detectron2's ``LayerNorm`` parameters (``weight``, ``bias``) and eps.

    Detectron2's version is five element-wise passes in Python; this is
    :func:`vimdet.ops.channel_layer_norm`: on the ``triton`` backend one kernel over the
    channels-last map that reads it once and writes it once in its own dtype (bf16 under autocast,
    where ``layer_norm`` would cast to fp32 and back), elsewhere PyTorch's fused ``layer_norm``
    (2.4x faster than Detectron2's on the CPU at (4, 64, 80, 80)). The output is channels-last in
    memory, which convolutions read as such.

    Args:
        channels: C.
        eps: added to the variance.
        backend: the scan backend (:func:`vimdet.ops.resolve_backend`), which picks the kernel.
    """

    def __init__(self, channels: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.weight = _no_weight_decay(nn.Parameter(torch.ones(channels)))
        self.bias = _no_weight_decay(nn.Parameter(torch.zeros(channels)))
        self.eps = eps
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return channel_layer_norm(x, self.weight, self.bias, self.eps, self.backend)


def _norm(norm: str, channels: int, backend: str) -> nn.Module | None:
    """The pyramid's norm layer: ``ChannelLayerNorm`` for "LN", else Detectron2's ``get_norm``."""
    return ChannelLayerNorm(channels, backend=backend) if norm == "LN" else get_norm(norm, channels)


def _resampler(dim: int, patch_size: int, scale: float, norm: str, backend: str) -> tuple:
    """Layers taking the trunk's stride-``patch_size`` map to stride patch_size / scale; returns
    (modules, out channels)."""
    if scale == 4.0:
        return [
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            *([_norm(norm, dim // 2, backend)] if norm else []),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        ], dim // 4
    if scale == 2.0:
        return [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    if scale == 1.0:
        return [], dim
    if scale in (0.5, 0.25):  # 0.25: stride 32 from a patch-8 trunk
        return [nn.MaxPool2d(round(1 / scale), round(1 / scale))], dim
    raise ValueError(
        f"VimFeaturePyramid: stride {patch_size / scale:g} is not supported; use strides of "
        f"1/4, 1/2, 1, 2 or 4 times the trunk's stride {patch_size} (MODEL.VIM.PATCH_SIZE)"
    )


class VimFeaturePyramid(Backbone):
    """Vim trunk + one pyramid level per tapped block; outputs ``p{log2(stride)}``.

    Args:
        net: the trunk; its ``out_blocks`` must contain ``in_blocks``, and its ``scan_backend``
            picks the levels' LayerNorm kernel too.
        in_blocks: 1-based blocks feeding the levels, fine to coarse.
        strides: output stride of each level (4, 8, 16 or 32).
        out_channels: channels of every level.
        norm: norm of the 1x1/3x3 convs ("LN", "GN", "" ...).
        top_block: add a max-pooled level at twice the coarsest stride.
        square_pad: pad batches to this square size (0: only to ``size_divisibility``).
        cuda_graphs: on a GPU, replay the forward and backward as CUDA graphs, holding at most this
            many (one per input shape and mode, :class:`CudaGraphs`); 0 runs eagerly.
    """

    def __init__(
        self,
        net: VisionMamba,
        in_blocks: Sequence[int] = (6, 12, 18, 24),
        strides: Sequence[int] = (4, 8, 16, 32),
        out_channels: int = 256,
        norm: str = "LN",
        top_block: bool = True,
        square_pad: int = 0,
        cuda_graphs: int = 0,
    ):
        super().__init__()
        if len(in_blocks) != len(strides):
            raise ValueError(
                f"VimFeaturePyramid: {len(in_blocks)} in_blocks {tuple(in_blocks)} "
                f"but {len(strides)} strides {tuple(strides)}; give one stride per "
                "block"
            )
        missing = set(in_blocks) - set(net.out_blocks)
        if missing:
            raise ValueError(
                f"VimFeaturePyramid: the trunk does not return blocks "
                f"{sorted(missing)}; build it with out_blocks={tuple(in_blocks)}"
            )
        if any(fine >= coarse for fine, coarse in zip(strides, strides[1:])):
            raise ValueError(
                f"VimFeaturePyramid: strides {tuple(strides)} must strictly increase, fine to "
                "coarse"
            )
        self.net = net
        self.in_blocks = tuple(in_blocks)
        self.square_pad = square_pad
        if cuda_graphs < 0:
            raise ValueError(
                f"VimFeaturePyramid: cuda_graphs {cuda_graphs} must be 0 (eager) or the number of "
                "CUDA graphs to hold"
            )
        if cuda_graphs and net.use_checkpoint:
            raise ValueError(
                "VimFeaturePyramid: cuda_graphs with a trunk that checkpoints its blocks "
                "(MODEL.VIM.USE_CHECKPOINT): a checkpoint restores the random state to recompute a "
                "block, which a CUDA graph cannot replay. Use one or the other"
            )
        self.graphs = CudaGraphs(cuda_graphs) if cuda_graphs else None
        dim = net.embed_dim
        use_bias = norm == ""
        self.stages = nn.ModuleList()
        self._out_features = []
        for stride in strides:
            layers, channels = _resampler(
                dim, net.patch_size, net.patch_size / stride, norm, net.scan_backend
            )
            layers += [
                Conv2d(
                    channels,
                    out_channels,
                    1,
                    bias=use_bias,
                    norm=_norm(norm, out_channels, net.scan_backend),
                ),
                Conv2d(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    bias=use_bias,
                    norm=_norm(norm, out_channels, net.scan_backend),
                ),
            ]
            self.stages.append(nn.Sequential(*layers))
            self._out_features.append(f"p{int(math.log2(stride))}")
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self.top_block = LastLevelMaxPool() if top_block else None
        if self.top_block is not None:
            name = f"p{int(math.log2(strides[-1])) + 1}"
            self._out_features.append(name)
            self._out_feature_strides[name] = strides[-1] * 2
        self._out_feature_channels = dict.fromkeys(self._out_features, out_channels)
        # Every level's grid must be whole: pad inputs to the coarsest stride.
        self._size_divisibility = max(self._out_feature_strides.values())
        if square_pad % self._size_divisibility:
            raise ValueError(
                f"VimFeaturePyramid: square_pad {square_pad} must be 0 or a multiple of the "
                f"coarsest stride {self._size_divisibility}"
            )

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # The key is spelled as ImageList.from_tensors reads it. Detectron2's own
        # SimpleFeaturePyramid misspells it ("size_divisiblity"), so a caller that passes only
        # padding_constraints gets no divisibility padding from it.
        return {"size_divisibility": self._size_divisibility, "square_size": self.square_pad}

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """images: (B, 3, H, W), H and W multiples of ``size_divisibility`` -> {p2..p6}."""
        if self.graphs is not None and images.is_cuda and not _tracing():
            return self.graphs(self, self._levels, images)
        return self._levels(images)

    def _levels(self, images: Tensor) -> Dict[str, Tensor]:
        blocks = self.net(images)
        outputs = {}
        for name, block, stage in zip(self._out_features, self.in_blocks, self.stages):
            outputs[name] = stage(blocks[f"block{block}"])
        if self.top_block is not None:
            coarsest = outputs[self._out_features[len(self.in_blocks) - 1]]
            outputs[self._out_features[-1]] = self.top_block(coarsest)[0]
        return outputs


def vim_trunk_kwargs(cfg: CfgNode) -> dict:
    """Keyword arguments of :class:`VisionMamba` from ``cfg.MODEL.VIM`` and ``MODEL.VIM_FPN``.

    The width and depth come from ``MODEL.VIM.SIZE`` (a published size) or, with SIZE "custom",
    from ``EMBED_DIM`` and ``DEPTH``; the trunk returns exactly the blocks that
    ``MODEL.VIM_FPN.IN_BLOCKS`` taps.
    """
    vim = cfg.MODEL.VIM
    if vim.PRETRAINED:
        raise ValueError(
            f"MODEL.VIM.PRETRAINED {vim.PRETRAINED!r}: models no longer load weights when built. "
            f"Load the released file through the checkpointer instead: MODEL.WEIGHTS "
            f"{vim.PRETRAINED} (and leave MODEL.VIM.PRETRAINED empty)"
        )
    if vim.SIZE == "custom":
        if vim.EMBED_DIM <= 0 or vim.DEPTH <= 0:
            raise ValueError(
                f"MODEL.VIM.SIZE 'custom' needs MODEL.VIM.EMBED_DIM and MODEL.VIM.DEPTH > 0, got "
                f"{vim.EMBED_DIM} and {vim.DEPTH}; set both, or pick one of {sorted(VIM_SIZES)}"
            )
        embed_dim, depth = vim.EMBED_DIM, vim.DEPTH
    elif vim.SIZE in VIM_SIZES:
        if vim.EMBED_DIM or vim.DEPTH:
            raise ValueError(
                f"MODEL.VIM.SIZE {vim.SIZE!r} fixes the width and depth, but MODEL.VIM.EMBED_DIM "
                f"{vim.EMBED_DIM} / DEPTH {vim.DEPTH} are set too; set SIZE to 'custom' to use "
                "them, or reset them to 0"
            )
        embed_dim, depth = VIM_SIZES[vim.SIZE]["embed_dim"], VIM_SIZES[vim.SIZE]["depth"]
    else:
        raise ValueError(
            f"MODEL.VIM.SIZE {vim.SIZE!r} is unknown; use one of {sorted(VIM_SIZES)}, or "
            "'custom' with MODEL.VIM.EMBED_DIM and MODEL.VIM.DEPTH"
        )
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        patch_size=vim.PATCH_SIZE,
        pretrain_img_size=vim.PRETRAIN_IMG_SIZE,
        d_state=vim.D_STATE,
        d_conv=vim.D_CONV,
        expand=vim.EXPAND,
        dt_rank=vim.DT_RANK or None,
        drop_path_rate=vim.DROP_PATH_RATE,
        out_blocks=tuple(cfg.MODEL.VIM_FPN.IN_BLOCKS),
        scan_backend=vim.SCAN_BACKEND,
        use_checkpoint=vim.USE_CHECKPOINT,
        scan_routes=vim.SCAN_ROUTES,
        attention_blocks=tuple(vim.ATTENTION_BLOCKS),
        attention_heads=vim.ATTENTION_HEADS,
    )


@BACKBONE_REGISTRY.register()
def build_vim_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec | None = None) -> Backbone:
    """Detectron2 builder: ``MODEL.BACKBONE.NAME: build_vim_fpn_backbone``.

    Builds the model only; weights come from ``MODEL.WEIGHTS`` through the checkpointer.
    """
    net = VisionMamba(**vim_trunk_kwargs(cfg))
    fpn = cfg.MODEL.VIM_FPN
    largest_input = max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
    if 0 < fpn.SQUARE_PAD < largest_input:
        raise ValueError(
            f"MODEL.VIM_FPN.SQUARE_PAD {fpn.SQUARE_PAD} is smaller than the largest input side "
            f"{largest_input} (INPUT.MAX_SIZE_TRAIN/TEST); images would be cropped. Raise it or "
            "set it to 0"
        )
    if fpn.CUDA_GRAPHS and not fpn.SQUARE_PAD:
        logger.warning(
            "MODEL.VIM_FPN.CUDA_GRAPHS %d without MODEL.VIM_FPN.SQUARE_PAD: multi-scale batches "
            "come in many shapes, and only the first %d get a CUDA graph (the rest run eagerly). "
            "Set SQUARE_PAD (e.g. 1344) for one shape to train and one to test.",
            fpn.CUDA_GRAPHS,
            fpn.CUDA_GRAPHS,
        )
    return VimFeaturePyramid(
        net,
        in_blocks=fpn.IN_BLOCKS,
        strides=fpn.STRIDES,
        out_channels=fpn.OUT_CHANNELS,
        norm=fpn.NORM,
        top_block=fpn.TOP_BLOCK,
        square_pad=fpn.SQUARE_PAD,
        cuda_graphs=fpn.CUDA_GRAPHS,
    )
