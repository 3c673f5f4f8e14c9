"""`--tensor-parallel-size N` without torchrun: spawn N local processes that join one process group
through the same environment variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, entry: Callable[[list[str]], int], argv: list[str], size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = entry(argv)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.exit(code)


def spawn(entry: Callable[[list[str]], int], argv: list[str], size: int) -> int:
    """Run `entry(argv)` on `size` ranks; returns the first non-zero exit code, else 0. A SIGTERM to this
    process goes on to rank 0, which leads the others (a server drains, then releases them)."""
    context = mp.start_processes(_worker, args=(entry, argv, size, free_port()), nprocs=size, join=False,
                                 start_method="spawn")
    signal.signal(signal.SIGTERM, lambda *_: os.kill(context.processes[0].pid, signal.SIGTERM))
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        return err.exit_code or 1
    except mp.ProcessRaisedException as err:
        print(f"specinfer: a tensor-parallel rank failed:\n{err}", file=sys.stderr)
        return 1
    return 0
