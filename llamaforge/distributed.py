"""The process group of a multi-process job (training under torchrun, tensor-parallel inference).

``init_distributed`` joins the group that torchrun's environment describes (RANK, WORLD_SIZE, ...). On CPU the
group uses ``gloo``; when the rendezvous address is the loopback, gloo is bound to the loopback interface too. A
timeout on the group makes a dead rank fail the job instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PeerLostError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False  # this call created the process group (and will destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...), if any.

    A single process without those variables runs undistributed. The group uses NCCL on CUDA and gloo on
    CPU; ``timeout_s`` bounds every collective so that a dead peer ends the job with an error.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, False)
    if dev.type == "cpu" and os.environ.get("MASTER_ADDR", "127.0.0.1") in _LOOPBACK:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # single-host CPU job: keep gloo on the loopback
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)  # fmt: skip
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def destroy_distributed(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(exc: BaseException, who: str, peer: str = "another rank") -> PeerLostError | None:
    """The error to end ``who`` (e.g. "rank 1 of 2") with when ``exc`` is a collective that failed because ``peer``
    crashed, was stopped or hangs (gloo: the connection closed or a receive timed out; any backend's DistError);
    None for any other exception."""
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "/gloo/" in text)):
        return None
    # gloo's first line, without its source location and its generic advice
    reason = text.split("\n")[0].split("] ", 1)[-1].split(". This is typically")[0].strip()
    return PeerLostError(f"{who}: lost contact with {peer} ({reason}); it crashed, was stopped or hangs: see its "
                         "log. This process stops too.")  # fmt: skip
