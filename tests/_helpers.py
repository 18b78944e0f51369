"""Small helpers shared by the tests: a free port, joining rank processes with a deadline, one CPU thread."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

import pytest
import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_or_kill(procs: Sequence[BaseProcess], timeout_s: float) -> list[int]:
    """Waits up to `timeout_s` for each process, kills those still running; returns their pids (a hung collective)."""
    for proc in procs:
        proc.join(timeout_s)
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return hung


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, and do not stall when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
