"""Detectron2's DefaultTrainer with ViMDet's optimizer, checkpointer, evaluator, AMP dtype,
checked training data and exact resume."""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from vimdet.checkpoint import VimDetCheckpointer
from vimdet.data.checks import CheckedDatasetMapper, explain_dataset_errors
from vimdet.solver import build_vimdet_optimizer

from .exact_resume import ExactResumeHook, ResumableTrainStream
from .train_data import build_checked_train_loader

__all__ = ["VimDetTrainer"]


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class VimDetTrainer(DefaultTrainer):
    """DefaultTrainer + layer-decayed AdamW, COCO evaluation, strict trunk loading, bf16 AMP."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, with three changes: the AMP dtype comes from
        # SOLVER.AMP.DTYPE, DDP also wraps CPU models (device_ids=None, for gloo runs), and the
        # checkpointer refuses trunk tensors of the wrong shape.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = cfg.MODEL.DEVICE == "cpu"
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        if cfg.SOLVER.AMP.ENABLED:
            dtype = _AMP_DTYPES[cfg.SOLVER.AMP.DTYPE]
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            self._trainer = AMPTrainer(
                model, data_loader, optimizer, grad_scaler=scaler, precision=dtype
            )
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = VimDetCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            trainer=weakref.proxy(self),
            allow_partial_trunk=cfg.MODEL.VIM.ALLOW_PARTIAL_WEIGHTS,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_vimdet_optimizer(cfg, model)

    def build_hooks(self) -> list:
        # First, so that every later hook and the iteration see the iteration's seeded RNGs.
        stream = getattr(self.data_loader, "dataset", None)
        seed = stream.seed if isinstance(stream, ResumableTrainStream) else max(self.cfg.SEED, 0)
        return [ExactResumeHook(seed)] + super().build_hooks()

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
