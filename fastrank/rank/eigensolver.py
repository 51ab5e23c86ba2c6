"""Symmetric eigenvalues for the rank family: torch's solver, or cuSOLVER's batched one on CUDA.

``torch.linalg.eigvalsh`` on CUDA loops over a batch: one ``syevd`` per matrix (``syevj`` per matrix
for fp32 with 32 < n <= 512), the batched Jacobi solver only for n <= 32. ``cusolverDnXsyevBatched``
(cuSOLVER 11.7.1, CUDA 12.6.2 and later) takes the whole batch in one call, any n, as long as
``n * n * batch`` fits in an int32. It is reached here through ctypes, in the cuSOLVER library that
torch's CUDA build loads itself: no extra package, and the same library torch uses. (CuPy's batched
``eigvalsh`` runs ``syevj``, not this solver.) :func:`eigvalsh` picks the solver
(``FASTRANK_EIGENSOLVER``); :func:`cusolver_eigvalsh` is the binding, :func:`available` says
whether it can be called.

Under :func:`on_host` the calling thread's batches, CUDA ones included, are solved by LAPACK on the
host instead: a pool of threads, each solving whole matrices with one LAPACK thread. A batch is
embarrassingly parallel where one ``syevd`` is not: on 2 CPU cores (AMD EPYC), 6 fp64 1024 x 1024
matrices took 54 ms a matrix on two such threads, 70 ms through ``torch.linalg.eigvalsh`` on two
LAPACK threads and 108 ms on one. ``RankTracker(host_threads=...)`` measures this way, so that a
model on a GPU keeps the GPU for training.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = [
    "EIGENSOLVERS", "available", "chunk_size", "cusolver_eigvalsh", "default_host_threads", "eigvalsh", "host_eigvalsh",
    "on_host",
]

_INT32_MAX = 2**31 - 1
_CUDA_R_32F, _CUDA_R_64F = 0, 1  # cudaDataType
_EIG_MODE_NOVECTOR = 0  # cusolverEigMode_t
_FILL_MODE_LOWER = 0  # cublasFillMode_t

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_library_searched = False
_handles: dict[int, ctypes.c_void_p] = {}  # device index -> cusolverDn handle


def _candidate_paths() -> list[str]:
    """Where libcusolver may be: mapped already (torch loads its linear-algebra library lazily, so
    after a first CUDA linalg call), in the nvidia-* wheels beside torch, or on the loader path."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ")[-1]
                if os.path.basename(path).startswith("libcusolver.so") and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    for root in {os.path.dirname(os.path.dirname(torch.__file__))}:
        paths += sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcusolver.so*"), recursive=True))
    found = ctypes.util.find_library("cusolver")
    if found:
        paths.append(found)
    return paths


def _load(device: torch.device | None = None) -> ctypes.CDLL | None:
    """torch's cuSOLVER, if it has ``cusolverDnXsyevBatched``; searched once, after a probe on
    ``device`` (default: the current CUDA device) that makes torch load it: a process working on
    ``cuda:k`` without making it current (DDP's ``model.to(f"cuda:{rank}")``) makes no context on
    another device."""
    global _library, _library_searched
    if _library_searched:
        return _library
    with _lock:
        if _library_searched:
            return _library
        if torch.cuda.is_available() and torch.version.cuda is not None:
            # Make torch map its own cuSOLVER first, so that the search finds that one.
            torch.linalg.eigvalsh(torch.eye(2, device=device if device is not None else "cuda"))
            for path in _candidate_paths():
                try:
                    library = ctypes.CDLL(path)
                except OSError:
                    continue
                if hasattr(library, "cusolverDnXsyevBatched"):
                    _declare(library)
                    _library = library
                    break
        _library_searched = True
    return _library


def _declare(lib: ctypes.CDLL) -> None:
    vp, i32, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
    lib.cusolverDnCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cusolverDnSetStream.argtypes = [vp, vp]
    lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(vp)]
    lib.cusolverDnDestroyParams.argtypes = [vp]
    lib.cusolverDnXsyevBatched_bufferSize.argtypes = [
        vp, vp, i32, i32, i64, i32, vp, i64, i32, vp, i32, ctypes.POINTER(size), ctypes.POINTER(size), i64,
    ]
    lib.cusolverDnXsyevBatched.argtypes = [
        vp, vp, i32, i32, i64, i32, vp, i64, i32, vp, i32, vp, size, vp, size, vp, i64,
    ]
    for name in ("cusolverDnCreate", "cusolverDnSetStream", "cusolverDnCreateParams", "cusolverDnDestroyParams",
                 "cusolverDnXsyevBatched_bufferSize", "cusolverDnXsyevBatched"):
        getattr(lib, name).restype = ctypes.c_int


def available(device: torch.device | None = None) -> bool:
    """Whether ``cusolverDnXsyevBatched`` can be called (a CUDA device and a cuSOLVER that has it);
    ``device``: the CUDA device the first call probes on (default: the current one)."""
    return _load(device) is not None


def _check(status: int, function: str) -> None:
    if status != 0:
        raise RuntimeError(f"{function} returned cusolverStatus_t {status} (0 is CUSOLVER_STATUS_SUCCESS)")


def _handle(lib: ctypes.CDLL, device: int) -> ctypes.c_void_p:
    handle = _handles.get(device)
    if handle is None:
        handle = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(lib.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
        _handles[device] = handle
    return handle


def chunk_size(n: int, batch: int) -> int:
    """Matrices per call: cuSOLVER indexes the batch with int32, so ``n * n * chunk <= 2**31 - 1``."""
    if n < 1 or batch < 1:
        raise ValueError(f"chunk_size: expected n >= 1 and batch >= 1, got n={n}, batch={batch}")
    per_call = _INT32_MAX // (n * n)
    if per_call < 1:
        raise ValueError(f"cusolverDnXsyevBatched: one {n} x {n} matrix has more than 2**31 - 1 elements")
    return min(batch, per_call)


def cusolver_eigvalsh(G: Tensor, upper: bool = True) -> Tensor:
    """Ascending eigenvalues of a batch of symmetric matrices, in one ``cusolverDnXsyevBatched`` call
    per ``chunk_size`` matrices.

    Args:
        G: ``(..., n, n)`` float32 or float64 CUDA tensor; only the triangle named by ``upper`` is
            read (``upper=True``: the upper one, as ``torch.linalg.eigvalsh(G, UPLO="U")``).
    Returns:
        ``(..., n)`` tensor of G's dtype, ascending along the last dim.
    Raises:
        RuntimeError: cuSOLVER is unavailable (ask :func:`available` first), a call fails, or a
            matrix did not converge (``info`` names how many).
    """
    lib = _load(G.device if G.is_cuda else None)
    if lib is None:
        raise RuntimeError("cusolverDnXsyevBatched is not available (needs CUDA and cuSOLVER 11.7.1 or later)")
    if not G.is_cuda or G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cusolver_eigvalsh: expected a float32 or float64 CUDA tensor, got {G.dtype} on {G.device}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] == 0:
        raise ValueError(f"cusolver_eigvalsh: expected square matrices (..., n, n) with n >= 1, got shape {tuple(G.shape)}")
    n = G.shape[-1]
    batch_shape = G.shape[:-2]
    # The solver overwrites its input: work on a contiguous copy. Row-major storage read as
    # column-major is the transpose, so the upper triangle here is cuSOLVER's lower one.
    work = G.reshape(-1, n, n).clone(memory_format=torch.contiguous_format)
    if not upper:
        work = work.mT.contiguous()
    batch = work.shape[0]
    values = torch.empty(batch, n, dtype=G.dtype, device=G.device)
    info = torch.zeros(batch, dtype=torch.int32, device=G.device)
    dtype = _CUDA_R_64F if G.dtype == torch.float64 else _CUDA_R_32F
    step = chunk_size(n, batch)
    device = G.device.index if G.device.index is not None else torch.cuda.current_device()
    with _lock, torch.cuda.device(device):
        handle = _handle(lib, device)
        _check(lib.cusolverDnSetStream(handle, ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)),
               "cusolverDnSetStream")
        params = ctypes.c_void_p()
        _check(lib.cusolverDnCreateParams(ctypes.byref(params)), "cusolverDnCreateParams")
        try:
            device_bytes, host_bytes = ctypes.c_size_t(), ctypes.c_size_t()
            _check(lib.cusolverDnXsyevBatched_bufferSize(
                handle, params, _EIG_MODE_NOVECTOR, _FILL_MODE_LOWER, n, dtype, ctypes.c_void_p(work.data_ptr()), n,
                dtype, ctypes.c_void_p(values.data_ptr()), dtype, ctypes.byref(device_bytes), ctypes.byref(host_bytes),
                step,
            ), "cusolverDnXsyevBatched_bufferSize")
            device_work = torch.empty(max(device_bytes.value, 1), dtype=torch.uint8, device=G.device)
            host_work = ctypes.create_string_buffer(max(host_bytes.value, 1))
            item = work.element_size()
            for start in range(0, batch, step):
                count = min(step, batch - start)
                _check(lib.cusolverDnXsyevBatched(
                    handle, params, _EIG_MODE_NOVECTOR, _FILL_MODE_LOWER, n, dtype,
                    ctypes.c_void_p(work.data_ptr() + start * n * n * item), n,
                    dtype, ctypes.c_void_p(values.data_ptr() + start * n * item), dtype,
                    ctypes.c_void_p(device_work.data_ptr()), device_bytes.value, ctypes.cast(host_work, ctypes.c_void_p),
                    host_bytes.value,
                    ctypes.c_void_p(info.data_ptr() + start * 4), count,
                ), "cusolverDnXsyevBatched")
        finally:
            lib.cusolverDnDestroyParams(params)
    failed = int((info != 0).sum())
    if failed:
        first = int(info[(info != 0).nonzero()[0, 0]])
        raise RuntimeError(
            f"cusolverDnXsyevBatched: {failed} of {batch} {n} x {n} matrices failed (first info {first}: "
            "a negative value names a wrong argument, a positive one a matrix that did not converge)"
        )
    return values.reshape(*batch_shape, n)


# ----------------------------------------------------------------------------- the policy
EIGENSOLVERS = ("auto", "torch", "cusolver")  # values of FASTRANK_EIGENSOLVER
# Largest n for which "auto" takes cuSOLVER's batched solver. fp64 batches on an H100, batched /
# torch's loop: 1000 x 64^2 3.0 / 328 ms, 128 x 256^2 13.7 / 248, 64 x 1024^2 144 / 650,
# 16 x 2048^2 245 / 412, 4 x 4096^2 495 / 470 (fp32: 604 / 354): no gain left at 4096 (a later
# run: 8 x 4096^2 720 / 937). At n = 4096 each syevd is bound by its reduction to tridiagonal form,
# whose matrix-vector half reads the trailing matrix once per column (about n^3 / 3 * 8 bytes,
# 60 ms of HBM traffic in fp64): solving 2, 4 or 8 matrices at once, each on its own stream and
# host thread, gave 0.99x / 0.98x / 0.98x the loop's 937 ms for 8 fp64 matrices on an H100.
CUSOLVER_MAX_N = 2048
# Above CUSOLVER_MAX_N "auto" still takes the batched solver for batches of at least this many
# matrices: at n = 4096 (fp64, H100) it ran 4 matrices in 0.95x torch's time (495 / 470 ms), 8 in
# 1.30x less (720 / 937 ms), and the exact effective rank of 16 fp32 weights 4096^2 in 1.18 s
# against 1.91 s through torch's loop.
CUSOLVER_MIN_BATCH_ABOVE_MAX_N = 8


def _choice() -> str:
    choice = os.environ.get("FASTRANK_EIGENSOLVER", "auto")
    if choice not in EIGENSOLVERS:
        raise ValueError(f"FASTRANK_EIGENSOLVER must be one of {EIGENSOLVERS}, got {choice!r}")
    return choice


def eigvalsh(G: Tensor, upper: bool = False) -> Tensor:
    """Ascending eigenvalues of symmetric ``(..., n, n)`` matrices, reading the upper or lower triangle.

    A batch of CUDA matrices goes to cuSOLVER's batched solver (:func:`cusolver_eigvalsh`: one call
    for the batch, where ``torch.linalg.eigvalsh`` loops one ``syevd`` per matrix) when it is
    available and ``FASTRANK_EIGENSOLVER`` is "cusolver", or "auto" (default) with
    n <= ``CUSOLVER_MAX_N`` or a batch of at least ``CUSOLVER_MIN_BATCH_ABOVE_MAX_N`` matrices;
    "torch" keeps torch's solver. Single matrices and CPU tensors always
    take ``torch.linalg.eigvalsh``. Under :func:`on_host` every batch goes to
    :func:`host_eigvalsh`. Returns G's dtype and device, shape ``(..., n)``.
    """
    threads = getattr(_host, "threads", None)
    if threads is not None:
        return host_eigvalsh(G, threads, upper=upper)
    n = G.shape[-1]
    if G.is_cuda and G.numel() > n * n:
        choice = _choice()
        batch = G.numel() // (n * n)
        if choice == "cusolver" or (
            choice == "auto" and (n <= CUSOLVER_MAX_N or batch >= CUSOLVER_MIN_BATCH_ABOVE_MAX_N)
        ):
            if available(G.device):
                return cusolver_eigvalsh(G, upper=upper)
            if choice == "cusolver":
                raise RuntimeError(
                    "FASTRANK_EIGENSOLVER=cusolver, but cusolverDnXsyevBatched is not available "
                    "(needs cuSOLVER 11.7.1 / CUDA 12.6.2 or later)"
                )
    return torch.linalg.eigvalsh(G, UPLO="U" if upper else "L")


# ----------------------------------------------------------------------------- on the host
_host = threading.local()  # .threads: the calling thread's on_host() setting, or absent
_pools: dict[int, ThreadPoolExecutor] = {}  # threads -> pool of single-LAPACK-thread workers
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the parent's workers do not exist there, a pool is started anew."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def default_host_threads() -> int:
    """Half the CPUs this process may run on, at least 1: host solver threads that leave the other
    half to the process's own work (a training loop feeding a GPU, its data loading)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cpus // 2)


def _check_threads(threads: object, caller: str) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{caller}: threads must be a positive int, got {threads!r}")
    return threads


def _pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` workers, each with one intra-op (LAPACK) thread, started once.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL thread counts, and the
    count that threads started later take when they first run a parallel op. Each worker sets
    its own to 1 (after ``torch.get_num_threads()`` has made it take the inherited count, so that
    a later first op does not reset it); once every worker has, the count for later threads is
    set back to the starting thread's, which keeps its own.
    """
    pool = _pools.get(threads)
    if pool is not None:
        return pool
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            inherited = torch.get_num_threads()
            started = threading.Barrier(threads + 1, timeout=60)  # a worker that cannot start raises

            def single_threaded() -> None:
                torch.get_num_threads()
                torch.set_num_threads(1)
                started.wait()

            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastrank-eigvalsh")
            for _ in range(threads):  # each blocks at the barrier, so each submit starts a worker
                pool.submit(single_threaded)
            started.wait()
            torch.set_num_threads(inherited)
            _pools[threads] = pool
    return pool


def host_eigvalsh(G: Tensor, threads: int, upper: bool = False) -> Tensor:
    """Ascending eigenvalues of symmetric ``(..., n, n)`` matrices, solved by LAPACK on the host.

    The batch is split into ``threads`` contiguous parts, each solved by ``torch.linalg.eigvalsh``
    on a worker thread with one LAPACK thread (the workers are started once per ``threads`` and
    kept). A CUDA ``G`` is copied to pinned host memory on the current stream first (the calling
    thread waits for the copy), and the eigenvalues come back to its device. Differentiable as
    ``torch.linalg.eigvalsh`` is (the workers' grad mode is on; under the caller's ``no_grad`` the
    parts they receive do not require grad).

    Args:
        G: ``(..., n, n)`` float32 or float64 tensor on any device; the triangle named by ``upper``
            is read (``upper=True``: the upper one).
        threads: the number of matrices solved at once, a positive int.
    Returns:
        ``(..., n)`` tensor of G's dtype on G's device, ascending along the last dim.
    Raises:
        ValueError: ``threads`` is not a positive int, or G is not a batch of square matrices.
    """
    threads = _check_threads(threads, "host_eigvalsh")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"host_eigvalsh: expected square matrices (..., n, n), got shape {tuple(G.shape)}")
    n = G.shape[-1]
    flat = G.reshape(math.prod(G.shape[:-2]), n, n)
    if G.is_cuda:
        host = torch.empty(flat.shape, dtype=G.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(G.device).synchronize()
    else:
        host = flat.cpu()
    uplo = "U" if upper else "L"
    part = max(1, math.ceil(host.shape[0] / threads))
    pieces = [host[start : start + part] for start in range(0, max(host.shape[0], 1), part)]  # one if empty
    pool = _pool(threads)
    futures = [pool.submit(torch.linalg.eigvalsh, piece, UPLO=uplo) for piece in pieces]
    values = torch.cat([future.result() for future in futures])
    return values.reshape(*G.shape[:-1]).to(G.device)


@contextlib.contextmanager
def on_host(threads: int) -> Iterator[None]:
    """Within the block, :func:`eigvalsh` on the calling thread solves every batch, CUDA ones
    included, through :func:`host_eigvalsh` on ``threads`` host threads. Nests; other threads are
    not affected.

    Use::

        with on_host(8):
            effective_ranks(list_of_cuda_weights)   # Grams on the GPU, eigenvalues on 8 CPU threads
    """
    threads = _check_threads(threads, "on_host")
    previous = getattr(_host, "threads", None)
    _host.threads = threads
    try:
        yield
    finally:
        _host.threads = previous
