"""The end-of-run summary of a training job, and the untrained baseline it is compared with."""

from __future__ import annotations

import logging
import math
import os
import shlex
from typing import Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator

__all__ = ["bbox_metrics", "evaluate_untrained", "format_summary"]

logger = logging.getLogger(__name__)


def bbox_metrics(results: Mapping | None, dataset_name: str) -> Mapping[str, float] | None:
    """The box metrics (``AP``, ``AP50``, ...) of ``dataset_name`` in ``DefaultTrainer.test``'s
    results, which are nested by dataset name for several test sets and flat for one; None if
    absent."""
    if not results:
        return None
    per_dataset = results.get(dataset_name, results)
    return per_dataset.get("bbox")


def evaluate_untrained(cfg: CfgNode, trainer_cls, model: torch.nn.Module) -> Mapping | None:
    """COCO-evaluate ``model`` as built, before any training, on the first test set.

    Writes to ``OUTPUT_DIR/inference_untrained`` so that the trained model's evaluation does not
    overwrite it. Returns the box metrics, or None (with a log line) when there is no test set.
    """
    if not cfg.DATASETS.TEST:
        logger.info("TEST.EVAL_UNTRAINED: no test set, nothing to evaluate")
        return None
    dataset_name = cfg.DATASETS.TEST[0]
    logger.info("Evaluating the untrained model on %s (the baseline) ...", dataset_name)
    output_dir = os.path.join(cfg.OUTPUT_DIR, "inference_untrained", dataset_name)
    # COCOEvaluator opens the dataset's json when built: load the dataset first (which generates
    # the built-in shapes splits on first use).
    DatasetCatalog.get(dataset_name)
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_dir)
    single_test = cfg.clone()
    single_test.defrost()
    single_test.DATASETS.TEST = (dataset_name,)
    results = trainer_cls.test(single_test, model, evaluators=[evaluator])
    return results.get("bbox")


def _display(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it, else as given."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _ap_text(metrics: Mapping[str, float] | None) -> str:
    if not metrics:
        return "not evaluated"
    if math.isnan(metrics["AP"]):  # COCOEvaluator's answer when the model detects nothing
        return "no detections (AP 0)"
    return f"AP {metrics['AP']:.1f}, AP50 {metrics['AP50']:.1f}"


def format_summary(
    *,
    dataset_name: str,
    num_images: int,
    trained: Mapping[str, float] | None,
    untrained: Mapping[str, float] | None,
    weights: str,
    start_weights: str = "",
    pictures: Sequence[str],
    python: str,
    config_file: str,
    minutes: float,
) -> str:
    """A few lines a person reads at a glance: box AP before and after training, where the
    weights and pictures are, and the command that runs the trained model on one's own images."""
    weights_shown = _display(weights)
    command = [
        _display(python),
        "tools/demo.py",
        "--config-file",
        config_file,
        "--input",
        "path/to/your/images",
        "--output",
        "output/my_predictions",
        "MODEL.WEIGHTS",
        weights_shown,
    ]
    lines = [
        "=" * 72,
        f"ViMDet summary ({minutes:.1f} min)",
        f"  box AP on {dataset_name} ({num_images} images): {_ap_text(trained)}",
        (
            f"  before training (from {start_weights}): {_ap_text(untrained)}"
            if start_weights
            else f"  the same model untrained:  {_ap_text(untrained)}"
        ),
        f"  trained weights: {weights_shown}",
    ]
    if pictures:
        folder = _display(os.path.dirname(pictures[0]))
        lines.append(f"  pictures (ground truth | predictions): {folder}/ ({len(pictures)} PNGs)")
    lines += [
        "  detect objects in your own images (files or folders; PNGs go to --output):",
        "    " + shlex.join(command),
        "=" * 72,
    ]
    return "\n".join(lines)
