"""The CLI shortens the spin-waiting of PyTorch's OpenMP threads, unless the user chose it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cfrobust.openmp_spin import SPIN_COUNT, USER_SETTINGS

# Runs the CLI entry point (`cfrobust --version`, which imports no torch), then prints the
# spin count its process ended with.
CLI_CHILD = """
import os, sys
from cfrobust.cli.main import main
sys.argv = ["cfrobust", "--version"]
try:
    main()
except SystemExit:
    pass
print(os.environ.get("GOMP_SPINCOUNT"))
"""

# CPU seconds the process burns while its main thread sleeps right after each of 20 parallel
# PyTorch kernels: the OpenMP team's spinning, if any.
SPIN_CHILD = """
import sys, time
from cfrobust.openmp_spin import shorten_openmp_spin
if sys.argv[1] == "short":
    shorten_openmp_spin()
import torch
torch.set_num_threads(2)
a = torch.rand(1 << 22)
burnt = 0.0
for _ in range(20):
    a.mul_(1.0)  # a parallel region on both threads
    start = time.process_time()
    time.sleep(0.02)
    burnt += time.process_time() - start
print(burnt)
"""


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    return {**env, **extra}


def run_child(code: str, env: dict, *args: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True,
                          text=True).stdout.split()


def test_the_cli_sets_the_spin_count_before_any_command():
    assert run_child(CLI_CHILD, clean_env())[-1] == SPIN_COUNT


@pytest.mark.parametrize("setting", [("GOMP_SPINCOUNT", "77"), ("OMP_WAIT_POLICY", "active"),
                                     ("CFROBUST_OPENMP_DEFAULTS", "1")])
def test_the_users_openmp_setting_wins(setting):
    name, value = setting
    expected = value if name == "GOMP_SPINCOUNT" else "None"
    assert run_child(CLI_CHILD, clean_env(**{name: value}))[-1] == expected


def test_too_late_once_torch_is_loaded():
    code = "import os, torch\nfrom cfrobust.openmp_spin import shorten_openmp_spin\n" \
           "print(shorten_openmp_spin(), os.environ.get('GOMP_SPINCOUNT'))"
    assert run_child(code, clean_env()) == ["False", "None"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="an OpenMP team needs two cores to spin on one")
def test_the_shorter_spin_frees_the_cores_between_kernels():
    default = float(run_child(SPIN_CHILD, clean_env(), "default")[0])
    if default < 0.02:
        pytest.skip(f"this OpenMP runtime does not spin between kernels ({default:.3f} CPU s in 20 idle gaps)")
    short = float(run_child(SPIN_CHILD, clean_env(), "short")[0])
    assert short < default / 3, (short, default)
