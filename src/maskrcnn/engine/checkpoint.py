"""Training checkpoints: atomic writes, keep-last-k rotation, a ``last_checkpoint`` pointer, RNG state capture.

A checkpoint file ``model_{iteration:07d}.pt`` holds the state after ``iteration`` completed iterations. It is a
plain ``torch.save`` dict that loads with ``weights_only=True`` (RNG states are stored as tensors and ints, not as
numpy objects), so resuming never unpickles arbitrary code.
"""

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskrcnn.atomic import atomic_save, atomic_write_text, remove_stale_temp

__all__ = ["CheckpointManager", "atomic_save", "atomic_write_text", "checkpoint_name", "get_rng_state",
           "load_checkpoint", "module_generators", "remove_stale_temp", "set_rng_state"]

CHECKPOINT_PATTERN = re.compile(r"^model_(\d{7,})\.pt$")
POINTER_NAME = "last_checkpoint"


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint taken after ``iteration`` completed iterations."""
    return f"model_{iteration:07d}.pt"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint (``weights_only=True``); the error names the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


class CheckpointManager:
    """Writes ``model_{iter:07d}.pt`` files into one directory, keeps the newest ``keep_last`` of them."""

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        """``keep_last <= 0`` keeps every checkpoint."""
        self.directory = Path(directory)
        self.keep_last = int(keep_last)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of every checkpoint file present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = CHECKPOINT_PATTERN.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint the ``last_checkpoint`` pointer names, else the highest-numbered one, else None."""
        pointer = self.directory / POINTER_NAME
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if name and (self.directory / name).is_file():
                return self.directory / name
        found = self.list_checkpoints()
        return found[-1][1] if found else None

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Atomically write the checkpoint for ``iteration``, point ``last_checkpoint`` at it, rotate old ones."""
        path = atomic_save(state, self.directory / checkpoint_name(iteration))
        # The pointer moves only once the file is complete, so it never names a partial checkpoint.
        atomic_write_text(self.directory / POINTER_NAME, path.name + "\n")
        self._rotate(keep=path)
        return path

    def _rotate(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        found = [p for _, p in self.list_checkpoints() if p != keep]
        # The just-written file counts as one of the kept ones even if an older run left higher numbers.
        for p in found[: max(len(found) - (self.keep_last - 1), 0)]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ---------------------------------------------------------------------------------------------------
# RNG states, in a weights_only-loadable form


def get_rng_state() -> dict[str, Any]:
    """Global torch (CPU and CUDA), numpy and python RNG states as tensors/ints/floats."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            torch.cuda.set_rng_state(cuda_states[0].cpu())


def module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as a module attribute, keyed ``"<module path>.<attr>"``.

    Explicit generators (the project's way of making randomness repeatable) are not in ``state_dict``; the
    trainer saves and restores them with this so that sampling inside the model resumes exactly.
    """
    found: dict[str, torch.Generator] = {}
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[f"{mod_name}.{attr}" if mod_name else attr] = value
    return found
