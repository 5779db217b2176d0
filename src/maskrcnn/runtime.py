"""Process-wide CPU memory settings that the command line applies for speed (see bench/README.md).

Large CPU tensors (a 256 x 200 x 304 feature map is 62 MB) are above glibc's mmap threshold, so every one is a
fresh ``mmap`` whose pages fault in on first write and go back to the kernel on ``free``: in R50-FPN inference
that page-faulting is up to a sixth of the time, and it varies from run to run. ``keep_freed_memory`` makes
glibc serve large blocks from its heap and keep freed memory for reuse instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Opt-out: MASKRCNN_KEEP_FREED_MEMORY=0 leaves glibc's defaults alone.
ENV_KEEP_FREED_MEMORY = "MASKRCNN_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no heap trimming); True if applied.

    Peak RSS is unchanged up to fragmentation (R50-FPN inference: +~130 MB), but memory is not returned to the
    kernel until the process ends. A no-op returning False off glibc Linux, in multi-process (torchrun) workers,
    or when MASKRCNN_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(ENV_KEEP_FREED_MEMORY, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # In torchrun workers it made a rank abort at exit now and then ("terminate called without an active
        # exception", after all work was saved): left off there until that is understood.
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
