"""What the eigensolver tests share: symmetric test matrices whose other triangle holds unrelated
values, and a record of the host solver's calls (fastrank.rank.eigensolver.host_eigvalsh)."""

import threading
from typing import NamedTuple

import torch

from fastrank.rank import eigensolver


def symmetric_with_garbage(batch, n, dtype, upper, seed):
    """``(G, S)``: ``batch + (n, n)`` symmetric indefinite fp64 matrices ``S``, and ``G`` of ``dtype``
    holding ``S`` in the triangle named by ``upper`` and unrelated values in the other."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 2 * n, generator=generator, dtype=torch.float64)
    S = X @ X.mT / n - 0.5 * torch.eye(n, dtype=torch.float64)  # indefinite too
    garbage = torch.randn(*batch, n, n, generator=generator, dtype=torch.float64)
    keep = torch.ones(n, n, dtype=torch.bool).triu() if upper else torch.ones(n, n, dtype=torch.bool).tril()
    return torch.where(keep, S, garbage).to(dtype), S


class HostSolve(NamedTuple):
    device: str  # G's device type
    shape: tuple
    threads: int
    upper: bool
    thread: str  # the calling thread's name


def record_host_solves(monkeypatch) -> list[HostSolve]:
    """The calls of ``host_eigvalsh`` from now on (through ``eigvalsh`` under ``on_host`` too),
    each still solved."""
    calls: list[HostSolve] = []
    solve = eigensolver.host_eigvalsh

    def recorded(G, threads, upper=False):
        calls.append(HostSolve(G.device.type, tuple(G.shape), threads, upper, threading.current_thread().name))
        return solve(G, threads, upper=upper)

    monkeypatch.setattr(eigensolver, "host_eigvalsh", recorded)
    return calls
