#!/usr/bin/env python3
"""FLOPs, parameters, activations and structure of a ViMDet model (Detectron2's analyze_model).

    python tools/analyze_model.py --config-file configs/cascade_vim_b.yaml \\
        --tasks flop parameter activation structure MODEL.DEVICE cpu
    python tools/analyze_model.py --config-file configs/cascade_vim_t.yaml --tasks flop \\
        --input-size 1024 1024 --backbone-only MODEL.DEVICE cpu
    python tools/analyze_model.py --config-file configs/cascade_vim_b.yaml --tasks flop \\
        --backbone vitdet_b --input-size 800 1333 MODEL.DEVICE cpu     # Detectron2's ViTDet-B

FLOPs and activations are fvcore's (one fused multiply-add is one flop; element-wise ops are not
counted), by tracing the model with ``torch.jit.trace``. ViMDet's selective scan and its
convolutions are counted by the handles in :mod:`vimdet.ops.flops` (formula in
docs/analysis.md), the same on every scan backend. The ops fvcore could not count are printed:
none of them is ViMDet's own. Counts are averaged over ``--num-inputs`` images of the config's
first test set, resized as at test time, or over random images of ``--input-size H W`` (resized
the same way, then padded to the backbone's size divisibility). ``--backbone-only`` counts the
trunk and pyramid on the padded tensor; ``--backbone vitdet_b`` puts Detectron2's ViTDet-B
backbone (``ViT`` + ``SimpleFeaturePyramid`` from its model zoo, without the square padding to
1024) into the config's detector in place of the Vim one.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from typing import Dict, Iterator, List

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.analysis import _IGNORED_OPS, FlopCountAnalysis, activation_count_operators
from detectron2.utils.logger import setup_logger
from fvcore.nn import FlopCountAnalysis as ModuleFlopCountAnalysis
from fvcore.nn import activation_count, flop_count_table, parameter_count_table

import vimdet  # noqa: F401  (registers the backbone and the built-in datasets)
from vimdet.checkpoint import VimDetCheckpointer
from vimdet.config import build_cfg
from vimdet.ops.flops import VIMDET_ACTIVATION_HANDLES, VIMDET_FLOP_HANDLES

logger = logging.getLogger("vimdet.analyze_model")
TASKS = ("flop", "parameter", "activation", "structure")


def vitdet_b_backbone() -> torch.nn.Module:
    """Detectron2's ViTDet-B backbone from its model zoo (``common/models/mask_rcnn_vitdet.py``),
    with ``square_pad`` 0 so that inputs of any size keep their shape."""
    from detectron2 import model_zoo

    backbone = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model.backbone
    backbone.square_pad = 0
    return instantiate(backbone)


def build_analyzed_model(cfg, backbone: str) -> torch.nn.Module:
    """The config's detector in eval mode, with ``MODEL.WEIGHTS`` loaded when given."""
    model = build_model(cfg)
    if backbone == "vitdet_b":
        model.backbone = vitdet_b_backbone().to(model.device)
    elif cfg.MODEL.WEIGHTS:
        VimDetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def detector_inputs(cfg, num_inputs: int, input_size: List[int] | None) -> Iterator[list]:
    """``num_inputs`` single-image batches in Detectron2's format: test-set images, or random
    uint8 images of ``input_size`` (H, W) resized as the config resizes test images."""
    if input_size is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: give --input-size H W or a test set")
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        for _, batch in zip(range(num_inputs), loader):
            yield batch
        return
    height, width = input_size
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    generator = np.random.default_rng(0)
    for _ in range(num_inputs):
        image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        yield [{"image": tensor, "height": height, "width": width}]


def padded_batch(model: torch.nn.Module, batch: list) -> torch.Tensor:
    """The (1, 3, H, W) normalised tensor the backbone sees: padded to its size divisibility."""
    return model.preprocess_image(batch).tensor


class _BackboneOutputs(torch.nn.Module):
    """The backbone with its outputs as a tuple (fvcore traces modules returning tensors)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        return tuple(self.backbone(images).values())


def count_flops(model, batches, backbone_only: bool) -> None:
    """Log fvcore's table of the first input, the mean GFLOPs per operator and the total."""
    totals, by_operator, unsupported = [], Counter(), Counter()
    first = None
    for batch in batches:
        if backbone_only:
            wrapper = _BackboneOutputs(model.backbone)
            analysis = fvcore_flops(wrapper, (padded_batch(model, batch),))
        else:
            analysis = FlopCountAnalysis(model, batch)
        analysis.set_op_handle(**VIMDET_FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        totals.append(analysis.total())
        by_operator.update(analysis.by_operator())
        unsupported.update(analysis.unsupported_ops())
        if first is None:
            first = analysis
    count = len(totals)
    logger.info("FLOP table of the first input:\n%s", flop_count_table(first, max_depth=3))
    logger.info(
        "Mean GFLOPs per operator over %d input(s): %s",
        count,
        {name: round(value / count / 1e9, 3) for name, value in sorted(by_operator.items())},
    )
    own = sorted(name for name in unsupported if name.startswith("vimdet::"))
    logger.info(
        "Ops fvcore did not count (element-wise and data-movement ops, by fvcore's convention; "
        "none may be ViMDet's own): %s",
        dict(sorted(unsupported.items())) or "none",
    )
    if own:
        raise RuntimeError(f"ViMDet ops without a FLOP handle: {own}; add them to vimdet.ops.flops")
    logger.info(
        "Total GFLOPs: %.2f +- %.2f over %d input(s)",
        np.mean(totals) / 1e9,
        np.std(totals) / 1e9,
        count,
    )


def fvcore_flops(module: torch.nn.Module, inputs: tuple):
    """fvcore's analysis of a module taking tensors, ignoring the element-wise ops that
    Detectron2's analysis ignores."""
    return ModuleFlopCountAnalysis(module, inputs).set_op_handle(**dict.fromkeys(_IGNORED_OPS))


def count_activations(model, batches, backbone_only: bool) -> None:
    """Log the mean millions of activations per operator and their total."""
    totals: Dict[str, float] = Counter()
    count = 0
    for batch in batches:
        if backbone_only:
            result = activation_count(
                _BackboneOutputs(model.backbone),
                (padded_batch(model, batch),),
                supported_ops=VIMDET_ACTIVATION_HANDLES,
            )[0]
        else:
            result = activation_count_operators(
                model, batch, supported_ops=VIMDET_ACTIVATION_HANDLES
            )
        totals.update(result)
        count += 1
    logger.info(
        "Mean M activations per operator over %d input(s): %s",
        count,
        {name: round(value / count, 3) for name, value in sorted(totals.items())},
    )
    logger.info("Total M activations: %.2f", sum(totals.values()) / count)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a ViMDet yaml config")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, required=True)
    parser.add_argument("-n", "--num-inputs", type=int, default=10, help="images to average over")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="random images of this size instead of the test set (resized as test images)",
    )
    parser.add_argument(
        "--backbone-only", action="store_true", help="count the trunk and pyramid only"
    )
    parser.add_argument(
        "--backbone",
        choices=("config", "vitdet_b"),
        default="config",
        help="the config's backbone, or Detectron2's ViTDet-B in its place",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if args.num_inputs < 1:
        parser.error("--num-inputs must be at least 1")
    setup_logger(name="fvcore")
    setup_logger(name="vimdet")
    cfg = build_cfg(args.config_file, args.opts)
    model = build_analyzed_model(cfg, args.backbone)
    batches = list(detector_inputs(cfg, args.num_inputs, args.input_size))
    with torch.no_grad():
        if "flop" in args.tasks:
            count_flops(model, batches, args.backbone_only)
        if "activation" in args.tasks:
            count_activations(model, batches, args.backbone_only)
    analyzed = model.backbone if args.backbone_only else model
    if "parameter" in args.tasks:
        logger.info("Parameters:\n%s", parameter_count_table(analyzed, max_depth=3))
    if "structure" in args.tasks:
        logger.info("Structure:\n%s", analyzed)


if __name__ == "__main__":
    main()
