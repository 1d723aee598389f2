"""The training loader: data checked when it is loaded, then ViMDet's resumable stream."""

from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader

from vimdet.data.checks import CheckedDatasetMapper, explain_dataset_errors
from vimdet.data.validation import (
    annotation_files,
    check_coco_json,
    check_dataset_dicts,
    check_images,
)

from .exact_resume import build_resumable_train_loader, load_train_records

__all__ = ["build_checked_train_loader"]

logger = logging.getLogger(__name__)


def build_checked_train_loader(cfg: CfgNode) -> torch.utils.data.DataLoader:
    """Check the training data, then build the loader; raises before training on bad data.

    The COCO json of every training dataset is checked (ids, types, boxes, categories against
    ``MODEL.ROI_HEADS.NUM_CLASSES``), then the boxes of the loaded dicts and the header of every
    image (in parallel). With ``DATALOADER.SAMPLER_TRAIN: TrainingSampler`` the loader is
    :class:`~vimdet.engine.exact_resume.ResumableTrainStream`'s (exact ``--resume``); other
    samplers use Detectron2's loader.
    """
    names = list(cfg.DATASETS.TRAIN)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    checked = annotation_files(names)
    for name, path in checked.items():
        check_coco_json(path, num_classes, name)
    mapper = CheckedDatasetMapper(cfg, is_train=True)
    records = explain_dataset_errors(names, lambda: load_train_records(cfg))
    for name, path in annotation_files(names).items():  # generated while loading
        if name not in checked:
            check_coco_json(path, num_classes, name)
    check_dataset_dicts(records, names)
    check_images(records)
    if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
        return build_resumable_train_loader(cfg, mapper, records)
    logger.warning(
        "DATALOADER.SAMPLER_TRAIN %s: using Detectron2's loader, whose data order restarts on "
        "--resume (exact resume needs TrainingSampler)",
        cfg.DATALOADER.SAMPLER_TRAIN,
    )
    return build_detection_train_loader(cfg, mapper=mapper, dataset=records)
