"""CPU processes keep freed activation-sized buffers instead of handing them back to the OS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cfrobust import host_memory

GLIBC = host_memory._glibc() is not None

# Allocates and frees 96 MB (above glibc's largest adaptive mmap threshold, 32 MiB), then prints
# how much of it is still resident.
CHILD = """
import os, sys
import numpy as np
from cfrobust.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
page = os.sysconf("SC_PAGE_SIZE")
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = resident()
block = np.ones(96 << 20, np.uint8)
del block
print(applied, (resident() - before) >> 20)
"""


def child_run(mode: str, env: dict) -> tuple[str, int]:
    output = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, check=True,
                            capture_output=True, text=True).stdout.split()
    return output[0], int(output[1])


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*host_memory.USER_SETTINGS, "GLIBC_TUNABLES")}
    return {**env, **extra}


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_a_freed_large_buffer_stays_resident_once_retained_and_goes_back_otherwise():
    # 96 MiB freed: nearly all of it stays resident, or nearly none (the resident set moves by a
    # page or so besides, as the interpreter runs between the two readings).
    applied, resident_mib = child_run("retain", clean_env())
    assert applied == "True" and 94 <= resident_mib <= 97
    applied, resident_mib = child_run("system", clean_env())
    assert applied == "False" and -2 <= resident_mib <= 2


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("name, value", [("CFROBUST_SYSTEM_MALLOC", "1"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")])
def test_the_users_own_malloc_settings_are_left_alone(name, value):
    applied, resident_mib = child_run("retain", clean_env(**{name: value}))
    assert applied == "False" and -2 <= resident_mib <= 2


def test_only_malloc_tunables_count_as_the_users_choice():
    assert host_memory.user_sets_malloc({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}) is False
    assert host_memory.user_sets_malloc({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.arena_max=2"}) is True
    assert host_memory.user_sets_malloc({"MALLOC_TOP_PAD_": "0"}) is True
    assert host_memory.user_sets_malloc({"PATH": "/bin"}) is False


class OldGlibc:
    """mallopt as glibc before 2.35 answers it: no mmap threshold above 32 MiB."""

    def __init__(self):
        self.settings = {}

    def mallopt(self, parameter, value):
        if parameter == host_memory._M_MMAP_THRESHOLD and value > 32 << 20:
            return 0
        self.settings[parameter] = value
        return 1


def test_an_older_glibc_gets_the_largest_mmap_threshold_it_accepts_and_the_trim_threshold_still(monkeypatch):
    libc = OldGlibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.setattr(host_memory.os, "environ", {})
    assert host_memory.retain_freed_memory() is True
    assert libc.settings == {host_memory._M_MMAP_THRESHOLD: 32 << 20, host_memory._M_TRIM_THRESHOLD: 512 << 20}
