#!/usr/bin/env python3
"""Draw a ViMDet model's detections on images with Detectron2's Visualizer.

    python tools/demo.py --config-file configs/shapes/cascade_vim_mini_shapes.yaml \\
        --input datasets/vimdet_shapes_demo/val --output output/demo_pictures \\
        MODEL.WEIGHTS output/demo_shapes/model_final.pth

``--input`` takes image files and folders (their .jpg/.jpeg/.png/.bmp files); one PNG per image is
written to ``--output``. Class names come from the config's first test (or train) dataset.
"""

import argparse
import logging
import os
import sys

import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import vimdet  # noqa: F401  (registers the backbone and the built-in datasets)
from vimdet.checkpoint import VimDetCheckpointer
from vimdet.engine import build_cfg, draw_predictions, predict_image, to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_SUFFIXES)
            )
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {inputs}")
    return paths


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
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: drawing the detections of an untrained model")
    model = build_model(cfg)
    VimDetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    dataset = (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN or ("__unused",))[0]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(args.output, exist_ok=True)
    for path in list_images(args.input):
        image = read_image(path, format=cfg.INPUT.FORMAT)
        instances = predict_image(model, image, cfg)
        picture = draw_predictions(
            to_rgb(image, cfg.INPUT.FORMAT), instances, metadata, args.confidence_threshold
        )
        target = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        cv2.imwrite(target, picture[:, :, ::-1])
        kept = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(
            "%s: %d detections above %.2f -> %s", path, kept, args.confidence_threshold, target
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
