"""Process groups for tests that spawn ranks on this machine (gloo, CPU)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous started right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gloo_worker_leaving_without_teardown(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo group for the body of a spawned rank; the rank then leaves with ``os._exit(0)``.

    The timeout is bounded: if one rank fails, the other errors out instead of waiting forever.
    A failing body destroys the group and raises. A body that finished leaves without running
    destructors: tearing down a DDP Reducer and its gloo process group can deadlock in torch
    (the main thread joins gloo's worker thread while holding the GIL, and that thread waits for
    the GIL to free a finished work item; seen on a fresh CI machine). Write the results to disk
    and pass a barrier inside the body.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
