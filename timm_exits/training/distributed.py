"""Many training processes (torchrun): process group set-up, sums over ranks, and errors agreed on by all ranks."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError
from .recipe_types import RecipeError
from .run_folder import RunFolderError
from .sources import DataError

# rank 0's errors that the other ranks raise as the same class (the command line makes them one line, exit 2)
_SHARED_ERRORS = (RunFolderError, CheckpointError, RecipeError, DataError, FileNotFoundError)

__all__ = ["PeerFailedError"]


class PeerFailedError(ConnectionError):
    """Another process of a distributed run stopped (its own error is printed above), so this one stops too."""


# what a collective raises on the ranks that survive a rank that stopped: gloo closes the connection, nccl aborts
_PEER_GONE = ("closed by peer", "reset by peer", "remote worker", "remote process exited")


# ----------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _pick_device(device_pref: str, local_rank: int) -> torch.device:
    """The recipe's ``device`` as a torch device: ``auto`` and ``cuda`` take this process's GPU (``cuda:<local_rank>``).

    Raises:
        RecipeError: Not a device string, or ``cuda`` / ``cuda:N`` where no such CUDA device is visible.
    """
    if device_pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(f"cuda:{local_rank}" if device_pref == "cuda" else device_pref)
    except RuntimeError:
        raise RecipeError(f"device={device_pref}: not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        index = device.index
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= visible:
            raise RecipeError(
                f"device={device_pref}: no such CUDA device is visible (cuda:{index} asked for, {visible} visible); "
                "use device=cpu or device=auto."
            )
    return device


def _setup_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = _Dist(device=device)
    if world > 1 or dist.is_initialized():
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
            d.owns_group = True
        d.rank, d.world, d.local_rank = dist.get_rank(), dist.get_world_size(), local_rank
    return d


def _all_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _agree(d: _Dist, error: BaseException | None) -> None:
    """Raise rank 0's error (if any) on every rank, so no rank waits forever on the others."""
    if d.world == 1:
        if error is not None:
            raise error
        return
    box = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        kind, msg = box[0]
        cls = {c.__name__: c for c in _SHARED_ERRORS}.get(kind, RuntimeError)
        raise cls(f"(from rank 0) {msg}")


@contextlib.contextmanager
def _peer_errors(d: _Dist) -> Iterator[None]:
    """Turn the communication error a rank gets when another rank stopped into one `PeerFailedError` line (the CLI
    prints it and exits with status 2) instead of a traceback of the collective it was waiting in."""
    try:
        yield
    except RuntimeError as e:
        if d.world > 1 and (isinstance(e, dist.DistBackendError) or any(m in str(e) for m in _PEER_GONE)):
            raise PeerFailedError(
                f"rank {d.rank} of {d.world}: another process of this run stopped (its error is printed above), so "
                "this one stops too."
            ) from e
        raise
