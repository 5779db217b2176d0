"""maskrcnn.runtime: glibc keeps freed memory for reuse, so a re-allocated large tensor does not fault again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import resource, sys, torch
from maskrcnn.runtime import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(96 << 20, dtype=torch.uint8).fill_(1)  # 96 MB, above glibc's largest mmap threshold, then freed
before = faults()
# 64 MB fits in the freed block whatever its alignment slack (an equal size sometimes does not, and comes from
# the top of the heap: fresh pages either way, with or without the setting).
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(applied, faults() - before)
"""


def _run(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASKRCNN_KEEP_FREED_MEMORY", "THP_MEM_ALLOC_ENABLE")}
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # 4 KB pages, so that a fresh 64 MB block costs ~16k faults
    if env_value is not None:
        env["MASKRCNN_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_large_blocks_are_reused_without_page_faults() -> None:
    applied, faults = _run(None)
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    assert faults < 1000  # reused: no fresh pages
    applied, faults = _run("0")  # the opt-out leaves glibc alone: the second block is a fresh mmap
    assert not applied and faults > 10000
