#!/usr/bin/env python3
"""Draw a ViMDet model's detections on images with Detectron2's Visualizer.

    python tools/demo.py --config-file configs/shapes/cascade_vim_mini_shapes.yaml \\
        --input datasets/vimdet_shapes_demo/val --output output/demo_pictures \\
        MODEL.WEIGHTS output/demo_shapes/model_final.pth

``--input`` takes image files and folders (their .jpg/.jpeg/.png/.bmp files); one PNG per image is
written to ``--output``. Class names come from the config's first test (or train) dataset.

Nothing is overwritten that the user gave: ``--output`` may not be (or lie inside) an input
folder, no output may be an input file, and inputs that share a name (``a/photo.jpg``,
``b/photo.jpg``, ``photo.png``) get distinct outputs (``a__photo_jpg.png``, ...). An image that
cannot be read is reported by name and skipped; the exit status is then 1.
"""

import argparse
import logging
import os
import sys
from collections import Counter
from typing import Dict, List, Sequence

import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from PIL import Image

import vimdet  # noqa: F401  (registers the backbone and the built-in datasets)
from vimdet.checkpoint import VimDetCheckpointer
from vimdet.config import build_cfg
from vimdet.data.validation import image_mode_problem
from vimdet.engine import draw_predictions, predict_image, to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(inputs: Sequence[str]) -> List[str]:
    """The image files named by ``inputs`` (files, and the images directly in folders), once."""
    paths, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f"--input {item!r} is neither an image file nor a folder")
        for path in found:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {inputs}")
    return paths


def check_output_folder(output: str, inputs: Sequence[str]) -> None:
    """Refuse an ``--output`` folder that is, or lies inside, an input folder."""
    target = os.path.realpath(output)
    for item in inputs:
        folder = os.path.realpath(item)
        if os.path.isdir(item) and (target == folder or target.startswith(folder + os.sep)):
            raise ValueError(
                f"--output {output!r} is inside the input folder {item!r}: the pictures would "
                "be written among your images. Choose an --output folder outside the inputs"
            )


def output_names(paths: Sequence[str]) -> Dict[str, str]:
    """A distinct PNG name per input: ``stem.png``, or (for a shared stem) a name that also
    holds the folder and extension, e.g. ``a__photo_jpg.png``."""
    stems = Counter(os.path.splitext(os.path.basename(p))[0] for p in paths)
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    names: Dict[str, str] = {}
    for path in paths:
        stem, suffix = os.path.splitext(os.path.basename(path))
        name = stem
        if stems[stem] > 1:
            folder = os.path.relpath(os.path.dirname(os.path.abspath(path)), base)
            parts = [] if folder == "." else folder.split(os.sep)
            name = "__".join(parts + [f"{stem}_{suffix.lstrip('.')}"])
        unique, number = name, 2
        while f"{unique}.png" in names.values():
            unique, number = f"{name}-{number}", number + 1
        names[path] = f"{unique}.png"
    return names


def plan_outputs(paths: Sequence[str], output: str) -> Dict[str, str]:
    """Input path -> output path; raises ValueError if an output would replace an input."""
    targets = {path: os.path.join(output, name) for path, name in output_names(paths).items()}
    inputs = {os.path.realpath(path): path for path in paths}
    for path, target in targets.items():
        if os.path.realpath(target) in inputs:
            raise ValueError(
                f"the picture of {path!r} would be written to {target!r}, which is the input "
                f"{inputs[os.path.realpath(target)]!r}. Choose an --output folder without inputs"
            )
    return targets


def read_input(path: str, image_format: str):
    """Read an image for the model, refusing pixel modes that would decode wrongly."""
    with Image.open(path) as image:
        problem = image_mode_problem(image.mode)
    if problem:
        raise OSError(problem)
    return read_image(path, format=image_format)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="vimdet")
    logger = logging.getLogger("vimdet")

    cfg = build_cfg(args.config_file, args.opts)
    check_output_folder(args.output, args.input)
    targets = plan_outputs(list_images(args.input), args.output)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: the demo would draw an untrained model's detections. Add "
            "MODEL.WEIGHTS path/to/model_final.pth"
        )
    model = build_model(cfg)
    VimDetCheckpointer(model, allow_partial_trunk=cfg.MODEL.VIM.ALLOW_PARTIAL_WEIGHTS).load(
        cfg.MODEL.WEIGHTS
    )
    dataset = (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN or ("__unused",))[0]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(args.output, exist_ok=True)
    failed = []
    for path, target in targets.items():
        try:
            image = read_input(path, cfg.INPUT.FORMAT)
        except OSError as error:
            logger.error("%s: cannot read this image (%s); skipped", path, error)
            failed.append(path)
            continue
        instances = predict_image(model, image, cfg)
        picture = draw_predictions(
            to_rgb(image, cfg.INPUT.FORMAT), instances, metadata, args.confidence_threshold
        )
        if not cv2.imwrite(target, picture[:, :, ::-1]):
            raise OSError(f"could not write {target!r}; is --output writable and not full?")
        kept = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(
            "%s: %d detections above %.2f -> %s", path, kept, args.confidence_threshold, target
        )
    if failed:
        logger.error("%d of %d images could not be read: %s", len(failed), len(targets), failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
