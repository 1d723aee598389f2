#!/usr/bin/env python3
"""Export a ViMDet detector (or its backbone) at a fixed input size and check it on real images.

    python tools/export_model.py --config-file configs/cascade_vim_t.yaml --size 832 1344 \\
        --output export/vim_t MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file ... --part backbone --format torch onnx ...

``--part detector`` exports the whole detector through Detectron2's ``TracingAdapter``
(:mod:`vimdet.export`): it takes one (3, H, W) image in the model's input format and returns
boxes, classes, scores and the image size. ``--method export`` uses ``torch.export`` of
Detectron2's inference written without data-dependent Python branches
(:mod:`vimdet.export.inference`); ``--method trace`` uses ``torch.jit.trace``, Detectron2's own
tracing export. Both hold for every image of the size. ``--part backbone`` exports the
trunk and pyramid: a normalised (1, 3, H, W) tensor in, p2..p6 out. ``--format onnx`` also writes
an ONNX model (``torch.onnx.export`` of the torch.export program, the chunked scan only; for the
detector ``--method export``) and runs it in onnxruntime on the CPU.

Every exported program is compared with the eager model on ``--num-images`` images of the
config's first test set (the built-in dataset, generated on first use), each resized to fit
H x W and padded with zeros at the bottom and right. The tolerances are the ``--*-atol``
arguments; the tool exits with status 1 if any is exceeded (or the program raises), and then
writes no ``.pt2``/``.ts`` (an ``.onnx`` file is written before onnxruntime can check it, and
stays for inspection). Files written: ``<output>.pt2`` (torch.export), ``<output>.ts`` (trace),
``<output>.onnx``; an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterator, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import vimdet  # noqa: F401  (registers the backbone and the built-in datasets)
from vimdet.checkpoint import VimDetCheckpointer
from vimdet.config import build_cfg
from vimdet.export import (
    check_export_backend,
    check_export_size,
    export_backbone,
    export_detector,
    instances_from_outputs,
    onnx_translations,
    trace_detector,
)

logger = logging.getLogger("vimdet.export_model")


def fixed_size_images(cfg, height: int, width: int, count: int) -> Iterator[torch.Tensor]:
    """``count`` images of the config's first test set as (3, height, width) uint8 tensors in
    the model's input format: resized to fit (aspect kept), padded with zeros after."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the exported model is checked on its images")
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:count]
    for record in records:
        image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        scale = min(height / image.shape[0], width / image.shape[1])
        size = (max(1, int(image.shape[0] * scale)), max(1, int(image.shape[1] * scale)))
        resized = T.ResizeTransform(image.shape[0], image.shape[1], *size).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        yield F.pad(tensor, (0, width - size[1], 0, height - size[0]))


def output_path(prefix: str, suffix: str) -> str:
    path = prefix + suffix
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose another --output (files are never replaced)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def compare_detections(expected, actual, atol: dict) -> List[str]:
    """Differences between two Instances beyond the tolerances, as messages (empty: equal)."""
    if len(expected) != len(actual):
        return [f"{len(actual)} detections instead of {len(expected)}"]
    problems = []
    if not torch.equal(expected.pred_classes, actual.pred_classes):
        problems.append("classes differ")
    for name, a, b in (
        ("boxes", expected.pred_boxes.tensor, actual.pred_boxes.tensor),
        ("scores", expected.scores, actual.scores),
    ):
        error = (a.float() - b.float()).abs().max().item() if len(a) else 0.0
        if error > atol[name]:
            problems.append(f"{name} differ by {error:.3g} > {atol[name]}")
    return problems


def compare_tensors(expected: Sequence[torch.Tensor], actual: Sequence, atol: float) -> List[str]:
    errors = [
        (e.float() - torch.as_tensor(a).float()).abs().max().item()
        for e, a in zip(expected, actual)
    ]
    return [f"features differ by {max(errors):.3g} > {atol}"] if max(errors) > atol else []


def run_onnx(path: str, inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    return session.run(None, {n: t.cpu().numpy() for n, t in zip(names, inputs)})


def export_and_check(args, cfg, model) -> List[str]:
    height, width = args.size
    check_export_size(height, width, model.backbone.size_divisibility)
    device = model.device
    if "onnx" in args.format:
        if args.part == "detector" and args.method == "trace":
            raise ValueError(
                "export: ONNX of the detector is made from its torch.export program; use "
                "--method export with --format onnx"
            )
        check_export_backend(model, device, onnx=True)
    images = [image.to(device) for image in fixed_size_images(cfg, height, width, args.num_images)]
    atol = {"boxes": args.box_atol, "scores": args.score_atol}
    problems = []
    if args.part == "backbone":
        tensors = [model.preprocess_image([{"image": image}]).tensor for image in images]
        module, program = export_backbone(model, tensors[0])
        run = program.module()
        onnx_path = None
        if "onnx" in args.format:
            onnx_path = output_path(args.output, ".onnx")
            torch.onnx.export(module, (tensors[0],), onnx_path, dynamo=True)
            logger.info("Wrote %s", onnx_path)
        with torch.no_grad():
            for index, tensor in enumerate(tensors):
                expected = module(tensor)
                found = compare_tensors(expected, run(tensor), args.feature_atol)
                if onnx_path:
                    found += [
                        f"onnx: {p}"
                        for p in compare_tensors(
                            expected, run_onnx(onnx_path, [tensor]), args.feature_atol
                        )
                    ]
                problems += [f"image {index}: {p}" for p in found]
    else:
        if args.method == "trace":
            adapter, program = trace_detector(model, images[0])
            run = program
        else:
            adapter, program = export_detector(model, images[0])
            run = program.module()
        with torch.no_grad():
            for index, image in enumerate(images):
                expected = instances_from_outputs(adapter, adapter(image))
                try:
                    actual = instances_from_outputs(adapter, run(image))
                    found = compare_detections(expected, actual, atol)
                except RuntimeError as error:  # e.g. an op the program cannot run on this input
                    found = [f"the exported program raised: {error}"]
                problems += [f"image {index}: {p}" for p in found]
                logger.info("image %d: %d detections, %s", index, len(expected), found or "equal")
        if "onnx" in args.format:
            onnx_path = output_path(args.output, ".onnx")
            torch.onnx.export(
                program,
                (images[0],),
                onnx_path,
                dynamo=True,
                custom_translation_table=onnx_translations(),
            )
            logger.info("Wrote %s", onnx_path)
            for index, image in enumerate(images):
                expected = instances_from_outputs(adapter, adapter(image))
                outputs = [torch.as_tensor(o) for o in run_onnx(onnx_path, [image])]
                actual = instances_from_outputs(adapter, outputs)
                found = compare_detections(expected, actual, atol)
                problems += [f"onnx image {index}: {p}" for p in found]
                logger.info(
                    "onnx image %d: %d detections, %s", index, len(actual), found or "equal"
                )
    if problems:  # a program that differs from the model is not written
        return problems
    if "torch" in args.format and isinstance(program, torch.jit.ScriptModule):
        path = output_path(args.output, ".ts")
        torch.jit.save(program, path)
        logger.info("Wrote %s (load it with `import vimdet; torch.jit.load(path)`)", path)
    elif "torch" in args.format:
        path = output_path(args.output, ".pt2")
        torch.export.save(program, path)
        logger.info("Wrote %s", path)
    return problems


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a ViMDet yaml config")
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"))
    parser.add_argument("--output", required=True, help="path prefix of the files written")
    parser.add_argument("--part", choices=("detector", "backbone"), default="detector")
    parser.add_argument("--format", nargs="+", choices=("torch", "onnx"), default=["torch"])
    parser.add_argument(
        "--method",
        choices=("export", "trace"),
        default="export",
        help="detector: torch.export (vimdet.export.inference: Detectron2's inference without "
        "data-dependent branches) or torch.jit.trace (Detectron2's tracing export)",
    )
    parser.add_argument("--num-images", type=int, default=4, help="test images to compare on")
    parser.add_argument("--box-atol", type=float, default=1e-2, help="pixels")
    parser.add_argument("--score-atol", type=float, default=1e-4)
    parser.add_argument("--feature-atol", type=float, default=1e-4)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="vimdet")
    cfg = build_cfg(args.config_file, args.opts)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        VimDetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    problems = export_and_check(args, cfg, model)
    for problem in problems:
        logger.error("exported model differs from the eager one: %s", problem)
    if not problems:
        logger.info("The exported model equals the eager one on %d image(s)", args.num_images)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
