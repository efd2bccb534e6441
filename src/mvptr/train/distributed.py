"""Ranks and devices of a training process.

Why: the same loop runs as one CPU process (the demo, the tests), as 2 gloo processes (the DDP test on this
2-core machine) and as N NCCL processes on GPUs started by submitit (`TorchDistributedEnvironment`), never
torchrun. A job started by submitit with several tasks exports MASTER_ADDR/RANK/WORLD_SIZE from its
JobEnvironment; a process started otherwise with those variables set (a test) joins the same way.

Which examples a rank reads at a step is `mvptr.data.order.batch_indices`.

Use:
    env = setup_distributed()          # Env(rank, world_size, local_rank, device)
    teardown_distributed()
"""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _submitit_tasks() -> int:
    """Number of tasks of the submitit job this process belongs to (0 outside a submitit job)."""
    try:
        import submitit

        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job
        return 0


def _keep_gloo_on_loopback() -> None:
    """Ranks that meet on a loopback address all run on this host: make gloo connect them over loopback too.

    Otherwise gloo binds to whatever the host name resolves to, and on hosts whose name resolves to an address
    that cannot reach itself (containers, sandboxes) the ranks wait for each other until the collective timeout.
    A GLOO_SOCKET_IFNAME set by the user wins.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        address = ipaddress.ip_address(socket.gethostbyname(os.environ.get("MASTER_ADDR", "")))
    except (OSError, ValueError):  # an address that does not resolve: init_process_group reports it
        return
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if address.is_loopback and names:
        os.environ["GLOO_SOCKET_IFNAME"] = names[0]


def setup_distributed(timeout_s: float | None = None) -> Env:
    """Join the process group when there is more than one process (NCCL on GPU, gloo on CPU).

    `timeout_s` bounds how long a rank waits for the others (torch's default, 30 min for gloo, when None).
    """
    if _submitit_tasks() > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if not cuda:
            _keep_gloo_on_loopback()
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
    return Env(rank, world_size, local_rank, device)


def teardown_distributed() -> None:
    """Leave the process group; every rank calls it once its work is done.

    The barrier keeps a rank from closing its connections while another still talks to it. Collecting garbage
    first frees the autograd graphs that keep gloo's work objects alive: left to the interpreter's shutdown, they
    aborted about 1 gloo process in 10 with "terminate called without an active exception" (12 of 150 runs of
    the VSC gather test's workers on the development machine; 0 of 90 with this order).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
