"""Run by tests/test_train.py under `torchrun --max-restarts=1`: `cfrobust train`, where rank 1
kills itself (SIGKILL) at its CRASH_AT_STEP-th optimizer step, once: a marker file stops the
restarted processes from crashing again. Each process that ends normally appends
"<restart count> <rank> <steps it took>" to STEP_LOG."""

import atexit
import os
import signal
import sys
from pathlib import Path

import cfrobust.trainer.train as train_module
from cfrobust.cli.main import main

step = train_module.optimizer_step
crash_at = int(os.environ["CRASH_AT_STEP"])
marker = Path(os.environ["CRASH_MARKER"])
calls = 0


def step_that_crashes_once(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == crash_at and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args, **kwargs)


def log_steps() -> None:
    with open(os.environ["STEP_LOG"], "a") as log:
        log.write(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} {os.environ.get('RANK')} {calls}\n")


atexit.register(log_steps)
train_module.optimizer_step = step_that_crashes_once
sys.argv = ["cfrobust", "train", *sys.argv[1:]]
main()
