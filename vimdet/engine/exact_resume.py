"""Exact resume: a training run continued with ``--resume`` repeats the uninterrupted run.

Detectron2 restores the model, optimizer, scheduler and iteration, but its data stream
(``TrainingSampler``, an infinite generator seeded once) restarts from the beginning, and the
random number generators restart from ``SEED``: the resumed run sees other images, other
augmentations and other random draws than the uninterrupted run would have.

ViMDet makes every random choice of an iteration a function of (seed, rank, iteration):

- :class:`ResumableTrainStream` plans the sample order (an epoch-wise permutation seeded by
  (seed, epoch), sharded over ranks like ``TrainingSampler``) and the aspect-ratio batches
  (like ``AspectRatioGroupedDataset``) from the annotations alone, so it can start at any batch
  by replaying the plan without decoding an image. Each sample is mapped (read and augmented)
  under RNGs seeded by (seed, rank, sample position), with the process's own RNG states put
  back afterwards. Data-loading workers share the batches round-robin, so the order does not
  depend on ``DATALOADER.NUM_WORKERS``.
- :class:`ExactResumeHook` seeds torch, numpy and Python's RNGs before every iteration from
  (seed, rank, iteration), stores the seed in the checkpoint (so a run with ``SEED -1`` resumes
  with the seed it drew) and starts the stream at the resumed iteration's batch.

An image that fails to decode mid-run is skipped with a warning naming it and counted per
data-loading process; past ``DATALOADER.MAX_BAD_IMAGES`` the run stops with an error listing it.
A batch whose images all fail is skipped (the only case where a resumed run can shift by one
batch from the uninterrupted one).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "ExactResumeHook",
    "ResumableTrainStream",
    "build_resumable_train_loader",
    "load_train_records",
    "seed_all",
]

logger = logging.getLogger(__name__)


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters), the same on every platform."""
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's global RNGs from one 63-bit seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _SeededRNG:
    """Context: the global RNGs seeded with ``seed`` inside, their states restored after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        seed_all(self.seed)

    def __exit__(self, *exc_info: Any) -> None:
        torch.set_rng_state(self.saved[0])
        np.random.set_state(self.saved[1])
        random.setstate(self.saved[2])


class ResumableTrainStream(torch.utils.data.IterableDataset):
    """Infinite training batches; batch ``j`` depends only on (seed, rank, j) and the data.

    Args:
        records: the training dataset dicts (each with ``width`` and ``height``).
        mapper: the dataset mapper (reads and augments one record).
        batch_size: images per batch on this rank.
        seed: the run's seed (the same on every rank).
        rank, world_size: this process's place among the training processes.
        aspect_ratio_grouping: batch wide images (w > h) and tall ones separately.
        max_bad_images: images that may fail to decode before the run stops.
    """

    def __init__(
        self,
        records: Sequence[Dict[str, Any]],
        mapper: Callable[[Dict[str, Any]], Dict[str, Any]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        aspect_ratio_grouping: bool = True,
        max_bad_images: int = 10,
    ) -> None:
        unsized = [r.get("file_name") for r in records if "width" not in r or "height" not in r]
        if aspect_ratio_grouping and unsized:
            raise ValueError(
                f"DATALOADER.ASPECT_RATIO_GROUPING needs every image's width and height; "
                f"{len(unsized)} dataset records lack them (e.g. {unsized[:3]}). Add them to the "
                "dataset dicts, or set DATALOADER.ASPECT_RATIO_GROUPING False"
            )
        self.wide = np.array(
            [aspect_ratio_grouping and r["width"] > r["height"] for r in records], dtype=bool
        )
        self.records = DatasetFromList(list(records), copy=False)
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_bad_images = max_bad_images
        self.start_batch = 0
        self.bad_images: List[str] = []

    def _samples(self) -> Iterator[Tuple[int, int]]:
        """(position on this rank, dataset index), forever."""
        size = len(self.wide)
        position, global_position = 0, self.rank
        epoch, order = -1, None
        while True:
            if global_position // size != epoch:
                epoch = global_position // size
                generator = torch.Generator().manual_seed(_derived_seed(self.seed, epoch))
                order = torch.randperm(size, generator=generator).tolist()
            yield position, order[global_position % size]
            position += 1
            global_position += self.world_size

    def planned_batches(self) -> Iterator[List[Tuple[int, int]]]:
        """The batches as (position, index) lists, from batch 0, forever; reads no image."""
        buckets: List[List[Tuple[int, int]]] = [[], []]
        for sample in self._samples():
            bucket = buckets[0 if self.wide[sample[1]] else 1]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                yield batch

    def _map(self, position: int, index: int) -> Dict[str, Any] | None:
        record = self.records[index]
        with _SeededRNG(_derived_seed(self.seed, self.rank, position, 1)):
            try:
                return self.mapper(record)
            except OSError as error:
                self.bad_images.append(f"{record['file_name']}: {error}")
                if len(self.bad_images) > self.max_bad_images:
                    listing = "\n  ".join(self.bad_images[-10:])
                    raise OSError(
                        f"{len(self.bad_images)} training images failed to decode, more than "
                        f"DATALOADER.MAX_BAD_IMAGES ({self.max_bad_images}):\n  {listing}\n"
                        "Replace or remove these images, or raise DATALOADER.MAX_BAD_IMAGES"
                    ) from error
                logger.warning(
                    "Skipping training image %s (%s); %d of at most %d skipped "
                    "(DATALOADER.MAX_BAD_IMAGES)",
                    record["file_name"],
                    error,
                    len(self.bad_images),
                    self.max_bad_images,
                )
                return None

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for number, batch in enumerate(self.planned_batches()):
            if number < self.start_batch or (number - self.start_batch) % workers != worker_id:
                continue
            mapped = [self._map(position, index) for position, index in batch]
            mapped = [sample for sample in mapped if sample is not None]
            if mapped:
                yield mapped


def _no_collation(batch: Any) -> Any:
    return batch


def load_train_records(cfg: CfgNode) -> List[Dict[str, Any]]:
    """The training dataset dicts, filtered as Detectron2's ``build_detection_train_loader``."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def build_resumable_train_loader(
    cfg: CfgNode,
    mapper: Callable[[Dict[str, Any]], Dict[str, Any]],
    records: Sequence[Dict[str, Any]],
) -> torch.utils.data.DataLoader:
    """A training loader over :class:`ResumableTrainStream` (``TrainingSampler`` semantics)."""
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be a multiple of the "
            f"number of processes ({world_size})"
        )
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    stream = ResumableTrainStream(
        records,
        mapper,
        batch_size=cfg.SOLVER.IMS_PER_BATCH // world_size,
        seed=seed,
        rank=comm.get_rank(),
        world_size=world_size,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        max_bad_images=cfg.DATALOADER.MAX_BAD_IMAGES,
    )
    logger.info("Training data: %d images, seed %d (resumable stream)", len(records), seed)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_no_collation,
        # A generator of its own: creating the iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(seed),
    )


class ExactResumeHook(HookBase):
    """Seeds every iteration from (seed, rank, iteration); starts the data at the right batch.

    Its state (the seed, the total batch and the number of processes) is saved in every
    checkpoint with the trainer's. A checkpoint resumes on any number of processes as long as
    the total batch ``SOLVER.IMS_PER_BATCH`` is the same (each process then takes its share, and
    the iteration, learning rate and schedule continue); another total batch is refused, since
    the checkpoint's iteration counts batches of its own size.

    Args:
        seed: the run's seed (the same on every rank).
        ims_per_batch: images per iteration over all processes (``SOLVER.IMS_PER_BATCH`` after
            Detectron2's ``auto_scale_workers``).
    """

    def __init__(self, seed: int, ims_per_batch: int) -> None:
        self.seed = seed
        self.ims_per_batch = ims_per_batch

    def _stream(self) -> ResumableTrainStream | None:
        dataset = getattr(self.trainer.data_loader, "dataset", None)
        return dataset if isinstance(dataset, ResumableTrainStream) else None

    def before_train(self) -> None:
        stream = self._stream()
        if stream is not None:
            stream.seed = self.seed
            stream.start_batch = self.trainer.start_iter
        elif self.trainer.start_iter:
            logger.warning(
                "The training loader is not ViMDet's resumable stream: the data order restarts "
                "on resume, so the losses will differ from an uninterrupted run"
            )

    def before_step(self) -> None:
        seed_all(_derived_seed(self.seed, comm.get_rank(), self.trainer.iter, 2))

    def state_dict(self) -> Dict[str, int]:
        return {
            "seed": self.seed,
            "ims_per_batch": self.ims_per_batch,
            "world_size": comm.get_world_size(),
        }

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        saved_batch = state_dict.get("ims_per_batch", self.ims_per_batch)  # older checkpoints
        saved_world = state_dict.get("world_size", comm.get_world_size())
        if saved_batch != self.ims_per_batch:
            raise ValueError(
                f"--resume: the checkpoint was trained with SOLVER.IMS_PER_BATCH {saved_batch} "
                f"(all {saved_world} processes together) and this run has {self.ims_per_batch} "
                "(after SOLVER.REFERENCE_WORLD_SIZE's scaling, if set). Its iteration counts "
                f"batches of {saved_batch} images, so it is no place in this run's schedule. "
                f"Resume with SOLVER.IMS_PER_BATCH {saved_batch} SOLVER.REFERENCE_WORLD_SIZE 0 "
                "(each process takes its share; learning rate and schedule continue), or start "
                "a new run without --resume (docs/distributed.md)"
            )
        if saved_world != comm.get_world_size():
            logger.info(
                "Resuming a checkpoint of %d processes on %d: the same %d images per iteration, "
                "%d per process instead of %d; the iteration, learning rate and schedule "
                "continue, while the data order and random draws differ from an uninterrupted "
                "run (they depend on the rank)",
                saved_world,
                comm.get_world_size(),
                saved_batch,
                saved_batch // comm.get_world_size(),
                saved_batch // saved_world,
            )
        if state_dict["seed"] != self.seed:
            logger.info("Resuming with the checkpoint's seed %d", state_dict["seed"])
        self.seed = state_dict["seed"]
