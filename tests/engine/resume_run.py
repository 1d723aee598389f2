"""Helper for test_exact_resume.py: train with tools/train_net.py's set-up, log every loss.

    python resume_run.py LOSSES.jsonl KILL_AFTER [--resume] KEY VALUE ...

Appends ``{"iteration": i, "total_loss": x}`` per iteration to LOSSES.jsonl and kills its own
process with SIGKILL after iteration KILL_AFTER (-1: never), after that iteration's checkpoint.
"""

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

from detectron2.engine import HookBase

TRAIN_NET = Path(__file__).resolve().parents[2] / "tools" / "train_net.py"
CONFIG = (
    TRAIN_NET.parents[1] / "configs" / "quick_schedules" / "cascade_vim_micro_instant_test.yaml"
)


class LossLog(HookBase):
    """Writes each iteration's total loss; SIGKILLs the process after ``kill_after``."""

    def __init__(self, path: str, kill_after: int) -> None:
        self.path, self.kill_after = path, kill_after

    def after_step(self) -> None:
        loss = self.trainer.storage.history("total_loss").latest()
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": self.trainer.iter, "total_loss": loss}) + "\n")
        if self.trainer.iter == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    losses, kill_after, *rest = sys.argv[1:]
    resume = rest[:1] == ["--resume"]
    spec = importlib.util.spec_from_file_location("train_net_for_resume", TRAIN_NET)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    flags = ["--config-file", str(CONFIG)] + (["--resume"] if resume else [])
    args = train_net.default_argument_parser().parse_args(flags + rest[resume:])
    cfg = train_net.setup(args)
    trainer = train_net.VimDetTrainer(cfg)
    trainer.register_hooks([LossLog(losses, int(kill_after))])
    trainer.resume_or_load(resume=resume)
    trainer.train()


if __name__ == "__main__":
    main()
