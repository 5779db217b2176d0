"""torch.distributed helpers: joining the process group that ``torchrun`` describes, collectives, launching.

There is no launcher protocol of our own. A worker is any process started by ``torchrun`` (or by
:func:`launch` / :func:`run_torchrun`, which call the same torch elastic launcher) with the usual environment
variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed`
joins that group (NCCL on CUDA, gloo on CPU) with a timeout, so a rank that dies or stalls makes the others fail
with :class:`RankFailureError` instead of waiting forever. Every helper degrades to a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankFailureError",
    "all_gather_object",
    "all_ranks_true",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "distributed_session",
    "gather_object",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main_process",
    "is_peer_failure",
    "launch",
    "launched_by_torchrun",
    "run_torchrun",
]

DEFAULT_TIMEOUT_S = 1800.0


class RankFailureError(RuntimeError):
    """Another rank died or stopped answering: a collective failed or ran past the process group's timeout."""


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` from torchrun, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files and shows progress bars."""
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or any launcher with its environment contract) started with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _wants_cuda(device: str | torch.device | None) -> bool:
    name = str(device) if device is not None else "auto"
    if name in ("", "auto"):
        return torch.cuda.is_available()
    return name.startswith("cuda")


def init_distributed(device: str | torch.device | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment; True when one is active afterwards.

    NCCL when ``device`` is (or, for "auto", can be) CUDA, gloo otherwise. On CUDA each process takes the GPU
    ``LOCAL_RANK``. ``timeout_s`` bounds every collective, so a dead peer ends the run with an error.
    """
    if is_dist():
        return True
    if not launched_by_torchrun():
        return False
    use_cuda = _wants_cuda(device)
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asks for CUDA but CUDA is not available on this machine")
        local, n_gpus = get_local_rank(), torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local >= n_gpus:
            raise RuntimeError(f"{local_world} processes were started on this machine but it has only {n_gpus} "
                               f"GPU(s); start at most {n_gpus} (torchrun --nproc-per-node / maskrcnn --devices)")
        torch.cuda.set_device(local)
    backend = backend or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout_s)))
    return True


def destroy_distributed() -> None:
    """Leave the process group, if any."""
    if is_dist():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = "auto",
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """Context of :func:`init_distributed` that leaves the group it joined on exit; yields whether one is active."""
    owned = not is_dist()
    active = init_distributed(device, timeout_s)
    try:
        yield active
    finally:
        if owned and active:
            destroy_distributed()


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` comes from a collective whose peer died or timed out (not from this rank's own code)."""
    if isinstance(exc, RankFailureError):
        return True
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    # gloo and NCCL report as plain RuntimeErrors in some code paths (e.g. DDP's reducer).
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "gloo/transport",
        "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL error", "Watchdog caught collective operation timeout"))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` indexed by rank on rank ``dst``, None elsewhere (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (returned unchanged in a single process)."""
    if get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / get_world_size()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank; lets all ranks stop together instead of hanging."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0)


# ---------------------------------------------------------------------------------------------------
# Launching on one machine through torch's own elastic launcher (what torchrun runs)


def launch(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), *,
           monitor_interval: float = 0.1) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes on this machine, as ``torchrun --standalone`` would.

    Each process gets torchrun's environment (RANK, WORLD_SIZE, ...) and calls :func:`init_distributed` itself.
    ``fn`` must be importable by name (spawn start method). Returns each rank's return value; raises torch's
    ``ChildFailedError`` naming the failed rank when one fails (the others are stopped).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # noqa: PLC0415

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=int(nprocs), run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=monitor_interval, start_method="spawn")
    return elastic_launch(config, fn)(*args)


def run_torchrun(nprocs: int, argv: Sequence[str], module: str = "maskrcnn") -> None:
    """``torchrun --standalone --nproc-per-node=nprocs -m module *argv``, in-process through torch.distributed.run."""
    from torch.distributed.run import get_args_parser, run  # noqa: PLC0415

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={int(nprocs)}", "--max-restarts=0",
                                         "--monitor-interval=0.5", "-m", module, *argv])
    run(args)
