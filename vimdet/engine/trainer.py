"""Detectron2's DefaultTrainer with ViMDet's optimizer, checkpointer, evaluator, AMP dtype,
checked training data and exact resume."""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, defaults
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from vimdet.checkpoint import VimDetCheckpointer
from vimdet.data.checks import CheckedDatasetMapper, explain_dataset_errors
from vimdet.solver import build_vimdet_optimizer

from .exact_resume import ExactResumeHook, ResumableTrainStream
from .train_data import build_checked_train_loader

__all__ = ["VimDetTrainer"]


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def _ddp_without_device_ids(enabled: bool) -> Iterator[None]:
    """Make Detectron2's trainer wrap a CPU model in DDP (gloo) without ``device_ids``.

    Detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which torch refuses for
    CPU modules; ``launch`` with ``MODEL.DEVICE cpu`` (as ``--num-gpus 2`` on a CPU) needs None.
    """
    if not enabled:
        yield
        return
    create_ddp_model = defaults.create_ddp_model
    defaults.create_ddp_model = partial(create_ddp_model, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = create_ddp_model


class VimDetTrainer(DefaultTrainer):
    """DefaultTrainer + layer-decayed AdamW, COCO evaluation, strict trunk loading, bf16 AMP.

    Args:
        cfg: a config from :func:`vimdet.config.build_cfg`.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer builds model, optimizer, loader, scheduler and hooks; ViMDet differs in
        # three places: DDP of CPU models, the AMP dtype and the checkpointer (put in by
        # build_hooks, which DefaultTrainer.__init__ calls).
        with _ddp_without_device_ids(cfg.MODEL.DEVICE == "cpu"):
            super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:  # Detectron2's AMPTrainer defaults to float16
            dtype = _AMP_DTYPES[cfg.SOLVER.AMP.DTYPE]
            self._trainer = AMPTrainer(
                self._trainer.model,
                self._trainer.data_loader,
                self._trainer.optimizer,
                grad_scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),
                precision=dtype,
            )

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_vimdet_optimizer(cfg, model)

    def build_hooks(self) -> list:
        # DefaultTrainer.__init__ builds a plain DetectionCheckpointer just before calling this,
        # and the PeriodicCheckpointer hook built below saves through self.checkpointer: replace
        # it first, so that loading (resume_or_load) and every periodic save go through ViMDet's
        # checkpointer (strict trunk, files read safely, atomic saves, --resume fallback).
        if not isinstance(self.checkpointer, VimDetCheckpointer):
            self.checkpointer = VimDetCheckpointer(
                self.model,
                self.cfg.OUTPUT_DIR,
                trainer=weakref.proxy(self),
                allow_partial_trunk=self.cfg.MODEL.VIM.ALLOW_PARTIAL_WEIGHTS,
            )
        # ExactResumeHook first, so that every later hook and the iteration see the iteration's
        # seeded RNGs.
        stream = getattr(self.data_loader, "dataset", None)
        seed = stream.seed if isinstance(stream, ResumableTrainStream) else max(self.cfg.SEED, 0)
        hook = ExactResumeHook(seed, ims_per_batch=self.cfg.SOLVER.IMS_PER_BATCH)
        return [hook] + super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_checked_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = CheckedDatasetMapper(cfg, is_train=False)
        return explain_dataset_errors(
            [dataset_name], lambda: build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        )

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
