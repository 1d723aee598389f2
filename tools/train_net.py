#!/usr/bin/env python3
"""Train or evaluate a ViMDet detector with Detectron2's trainer and launcher.

    python tools/train_net.py --config-file configs/cascade_vim_b.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/cascade_vim_b.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume      # continue from the last checkpoint

Multi-node: add ``--num-machines M --machine-rank R --dist-url tcp://HOST:PORT`` on every node.
The launch is checked before any process starts, and a training process that dies or hangs
stops the others within ``--rank-timeout`` seconds (docs/distributed.md).
"""

import argparse
import logging
import os
import sys
import time

import torch.distributed as dist
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import vimdet  # noqa: F401  (registers the backbone and the built-in datasets)
from vimdet.checkpoint import VimDetCheckpointer
from vimdet.config import build_cfg
from vimdet.engine import VimDetTrainer, write_prediction_pngs
from vimdet.engine.launch import RankWatchdog, launch_training
from vimdet.engine.summary import bbox_metrics, evaluate_untrained, format_summary

logger = logging.getLogger("vimdet")


def setup(args):
    cfg = build_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    # default_setup configures the detectron2 and fvcore loggers; ViMDet's own go to the same log.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vimdet")
    return cfg


def draw_test_predictions(cfg, model):
    """PNGs of the first test set's predictions beside its ground truth (main process only);
    returns their paths."""
    if cfg.TEST.VIS_NUM_IMAGES <= 0 or not cfg.DATASETS.TEST or not comm.is_main_process():
        return []
    model = model.module if hasattr(model, "module") else model
    output_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    paths = write_prediction_pngs(
        cfg,
        model,
        cfg.DATASETS.TEST[0],
        output_dir,
        cfg.TEST.VIS_NUM_IMAGES,
        cfg.TEST.VIS_SCORE_THRESH,
    )
    logger.info(
        "Wrote %d prediction PNGs (ground truth | prediction) to %s", len(paths), output_dir
    )
    return paths


def print_summary(args, cfg, results, untrained, pictures, started):
    """The end-of-run summary of the first test set (main process only)."""
    if not cfg.DATASETS.TEST or not comm.is_main_process():
        return
    name = cfg.DATASETS.TEST[0]
    summary = format_summary(
        dataset_name=name,
        num_images=len(DatasetCatalog.get(name)),
        trained=bbox_metrics(results, name),
        untrained=untrained,
        weights=os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
        start_weights=cfg.MODEL.WEIGHTS,
        pictures=pictures,
        python=sys.executable,
        config_file=args.config_file,
        minutes=(time.perf_counter() - started) / 60,
    )
    print(summary, flush=True)


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's arguments, and ViMDet's --rank-timeout."""
    parser = default_argument_parser()
    parser.add_argument(
        "--rank-timeout",
        type=float,
        default=180.0,
        help="seconds after which the training processes stop, with a message naming the rank, "
        "when one of them died or hangs (default 180)",
    )
    return parser


def main(args):
    # A thread that notices a lost training process (on another machine, say) and stops this one.
    watchdog = RankWatchdog(args.rank_timeout) if comm.get_world_size() > 1 else None
    results = train_or_evaluate(args)
    if watchdog is not None:  # not on an error: the others must see this process gone
        watchdog.stop()
        # Every rank is done: close the process groups before the interpreter exits. Left to
        # exit, gloo's worker threads can be destroyed while joinable, which aborts the process
        # ("terminate called without an active exception") after a successful run.
        comm.synchronize()
        dist.destroy_process_group()
    return results


def train_or_evaluate(args):
    started = time.perf_counter()
    cfg = setup(args)
    if args.eval_only:
        model = VimDetTrainer.build_model(cfg)
        checkpointer = VimDetCheckpointer(
            model,
            save_dir=cfg.OUTPUT_DIR,
            allow_partial_trunk=cfg.MODEL.VIM.ALLOW_PARTIAL_WEIGHTS,
        )
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise ValueError(
                "--eval-only needs trained weights, and MODEL.WEIGHTS is empty: it would score "
                "an untrained model. Add MODEL.WEIGHTS path/to/model_final.pth (or --resume "
                "to evaluate the last checkpoint in OUTPUT_DIR)"
            )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = VimDetTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        draw_test_predictions(cfg, model)
        return results

    trainer = VimDetTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    untrained = None
    if cfg.TEST.EVAL_UNTRAINED and trainer.start_iter == 0:
        untrained = evaluate_untrained(cfg, VimDetTrainer, trainer.model)
    trainer.train()
    # DefaultTrainer.train returns the results only when TEST.EXPECTED_RESULTS is set.
    results = getattr(trainer, "_last_eval_results", None)
    pictures = draw_test_predictions(cfg, trainer.model)
    print_summary(args, cfg, results, untrained, pictures, started)
    return results


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_training(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=build_cfg(args.config_file, args.opts).MODEL.DEVICE,
    )
