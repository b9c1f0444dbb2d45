"""Run by tests/test_resume.py: `cfrobust train` with each optimizer step slowed down, so the
test can kill it in the middle of an epoch."""

import sys
import time

import cfrobust.trainer.train as train_module
from cfrobust.cli.main import main

step = train_module.optimizer_step


def slow_step(*args, **kwargs):
    time.sleep(0.15)
    return step(*args, **kwargs)


train_module.optimizer_step = slow_step
sys.argv = ["cfrobust", "train", *sys.argv[1:]]
main()
