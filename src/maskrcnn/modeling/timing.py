"""Opt-in wall-clock timing of the model's stages (transform, backbone, FPN, RPN, heads, paste).

The model marks its stages with ``with stage("rpn"): ...``. Nothing is recorded unless a :class:`StageTimer` is
active, and then only ``time.perf_counter`` is read at each stage boundary: no hooks stay on the modules and no
device syncs are added (on CUDA, pass ``sync=True`` to the timer to make the times mean something).

Sub-stages use dotted names ("rpn.head" inside "rpn"); a stage's time includes its sub-stages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

__all__ = ["StageTimer", "stage"]

# The timers now recording, innermost last. A list rather than a contextvar: the model runs on one thread.
_ACTIVE: list[StageTimer] = []
_NULL = nullcontext()


class StageTimer:
    """Sums the seconds spent in each named stage while active (``with StageTimer() as t: model.predict(x)``)."""

    def __init__(self, sync: bool = False) -> None:
        """``sync``: call ``torch.cuda.synchronize()`` at stage boundaries (only useful on a GPU)."""
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self) -> StageTimer:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` (float, s) to stage ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def _measure(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.add(name, time.perf_counter() - start)


def stage(name: str) -> AbstractContextManager[None]:
    """Context manager timing the block as stage ``name`` in the active timer; a shared no-op when none is."""
    if not _ACTIVE:
        return _NULL
    return _ACTIVE[-1]._measure(name)
