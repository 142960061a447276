"""Data parallelism under torchrun: process group, rank roles and the few collectives the trainer needs.

A plain `python train_nemoe.py` is one process (world size 1) and none of this
does anything. Under `torchrun --nproc_per_node N train_nemoe.py ...` every
process trains a DistributedDataParallel replica on its own documents; rank 0
alone writes logs and checkpoints. Everything else that decides something
(expert usage, stop requests, time-based saves, save failures) is agreed on
through a collective, so all ranks take the same branch at the same step and
no rank waits forever in a collective that another rank skipped.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemoe.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); world size 1 without torchrun."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return DistInfo(rank, world, local_rank)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the process group (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flags_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not _active():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=_flags_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum of a float tensor over ranks (returns a new tensor on the tensor's device)."""
    if not _active():
        return values
    out = values.detach().double().to(_flags_device())
    dist.all_reduce(out)
    return out.to(values.device)


def sum_over_ranks_(values: torch.Tensor) -> torch.Tensor:
    """In place: `values` becomes its sum over ranks (for statistics a decision reads)."""
    if _active():
        values.copy_(sum_over_ranks(values))
    return values


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_or_raise(error: BaseException | None) -> None:
    """Collective: if any rank failed (error not None), every rank raises.

    The failing rank re-raises its own error (rank 0's message is the one users
    read); the others raise a UserError saying which rank failed, so none of them
    is left waiting in the next collective.
    """
    failed = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = [(rank, msg) for rank, msg in enumerate(failed) if msg is not None]
    if bad:
        rank, msg = bad[0]
        raise UserError(f"rank {rank} failed: {msg}")


def replicas_digest(state, step: int) -> str:
    """The digest of `state` (see state_digest), which must be the same on every rank; a
    difference is a bug and raises RuntimeError naming each rank's digest."""
    digests = gather_objects(state_digest(state))
    if len(set(digests)) > 1:
        raise RuntimeError(f"data-parallel replicas diverged at step {step}: digests by rank {digests}")
    return digests[0]


def state_digest(state) -> str:
    """A short hash of a nested state (dicts, lists, tensors, numbers, strings): every tensor's
    exact bytes, so replicas on different ranks can be compared without sending them."""
    h = hashlib.sha256()

    def feed(node, path: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node, key=str):
                feed(node[key], f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                feed(item, f"{path}[{i}]")
        elif torch.is_tensor(node):
            t = node.detach().cpu().contiguous().reshape(-1)
            h.update(f"{path}:{t.dtype}:{t.numel()}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{path}={node!r}".encode())

    feed(state, "")
    return h.hexdigest()[:16]
