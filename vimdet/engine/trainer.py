"""Detectron2's DefaultTrainer with ViMDet's optimizer, checkpointer, evaluator and AMP dtype."""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from vimdet.checkpoint import VimDetCheckpointer
from vimdet.solver import build_vimdet_optimizer

__all__ = ["VimDetTrainer"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class VimDetTrainer(DefaultTrainer):
    """DefaultTrainer + layer-decayed AdamW, COCO evaluation, strict trunk loading, bf16 AMP."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        self.checkpointer = VimDetCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        if cfg.SOLVER.AMP.ENABLED:
            dtype = _AMP_DTYPES[cfg.SOLVER.AMP.DTYPE]
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            self._trainer = AMPTrainer(
                self._trainer.model,
                self._trainer.data_loader,
                self._trainer.optimizer,
                grad_scaler=scaler,
                precision=dtype,
            )

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_vimdet_optimizer(cfg, model)

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
