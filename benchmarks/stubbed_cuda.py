"""Triton's CUDA backend on a machine without a GPU: a no-op CUDA driver (``cuda_stub.c``, built
with gcc and loaded as ``libcuda.so.1``), so that kernels compile for sm_90 and launch through
Triton's real launcher (Triton 3.6's per-signature C module, 3.9's generic one), with all its
argument handling, on CPU tensors (a pointer is its own device address; a launch does nothing).

Used by benchmarks/host_cost.py (host time of a launch) and tests/test_launch_fast_path.py (the
specialization a launch plan replays). Call :func:`activate` before ``fastrank.kernels`` is
imported, in a process of its own: it turns Triton's interpreter off and makes the stubbed CUDA
driver Triton's active driver (device 0, stream 0, compute capability 9.0).

``activate(compile=False)`` replaces compilation too: each JIT launch runs Triton's own binder
(argument binding and specialization, exactly as a real launch does) and records its result in
:data:`BINDINGS`, then returns without compiling or launching. Either way the autotuner takes its
first pruned config without timing (nothing runs), and (unless ``record=False``) :data:`LAUNCHES`
records every call of Triton's launcher: grid, stream, function handle and the kernel arguments (tensors as their data
pointers, marked).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STUB_SOURCE = Path(__file__).with_name("cuda_stub.c")

BINDINGS: list[dict] = []  # per JIT launch with compile=False: kernel name, specialization, options
LAUNCHES: list[dict] = []  # per launcher call: grid, function, arguments

_ACTIVE: dict = {}


def build_stub() -> Path:
    """Compile cuda_stub.c into a folder holding ``libcuda.so.1`` and ``libcuda.so`` (a cache
    keyed on the source's hash); returns the folder."""
    source = STUB_SOURCE.read_bytes()
    folder = Path(tempfile.gettempdir()) / f"fastrank-cuda-stub-{hashlib.sha256(source).hexdigest()[:12]}"
    library = folder / "libcuda.so.1"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"libcuda.so.1.{os.getpid()}"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(partial),
                        str(STUB_SOURCE)], check=True)
        partial.replace(library)
    if not (folder / "libcuda.so").exists():
        try:
            (folder / "libcuda.so").symlink_to("libcuda.so.1")
        except FileExistsError:
            pass
    return folder


def _pointer(value):
    """A launcher argument as recorded: tensors as ("ptr", data_ptr), tuples entry by entry."""
    if isinstance(value, tuple):
        return tuple(_pointer(entry) for entry in value)
    if hasattr(value, "data_ptr"):
        return ("ptr", value.data_ptr())
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", value)
    return value


def activate(compile: bool = True, record: bool = True) -> None:
    """Make the stubbed CUDA driver Triton's active driver (see the module docstring);
    ``record=False`` leaves Triton's launcher as it is (no :data:`LAUNCHES`), for timing."""
    if _ACTIVE:
        if _ACTIVE["compile"] != compile:
            raise RuntimeError("stubbed_cuda.activate: already active with another compile setting")
        return
    if "fastrank.kernels" in sys.modules:
        raise RuntimeError("stubbed_cuda.activate must run before fastrank.kernels is imported")
    os.environ.pop("TRITON_INTERPRET", None)
    folder = build_stub()
    os.environ["TRITON_LIBCUDA_PATH"] = str(folder)
    stub = ctypes.CDLL(str(folder / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)

    import triton
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    driver = CudaDriver()
    driver.get_current_device = lambda: 0
    driver.get_current_stream = lambda device=None: 0
    driver.get_device_capability = lambda device=None: (9, 0)
    driver.set_current_device = lambda device: None

    base_launcher = driver.launcher_cls

    class RecordingLauncher(base_launcher):
        """Triton's launcher, recording what reaches its C launch function (which a launch plan's
        replay calls directly): the grid, stream, function, cooperative / PDL flags, scratch
        pointers, packed metadata and kernel arguments. The launch metadata and hooks are left
        out: the JIT passes Triton's (empty) hook chains, a replay None."""

        def __init__(self, src, metadata):
            super().__init__(src, metadata)
            launch = self.launch
            generic = hasattr(self, "kernel_signature")  # Triton 3.9's generic launcher

            def recording_launch(*args):
                if generic:
                    head, (packed, scratch, kernel_arguments) = args[:7], (args[7], args[11:13], args[15])
                else:  # Triton 3.6: scratch before the metadata, the kernel arguments spread
                    head, (packed, scratch, kernel_arguments) = args[:7], (args[9], args[7:9], args[13:])
                LAUNCHES.append({"grid": head[:3], "stream": head[3], "function": head[4], "flags": head[5:7],
                                 "scratch": scratch, "metadata": id(packed),
                                 "arguments": tuple(_pointer(value) for value in kernel_arguments)})
                return launch(*args)

            self.launch = recording_launch

    if record:
        driver.launcher_cls = RecordingLauncher
    triton.runtime.driver.set_active(driver)

    def first_config(self, *args, config, **kwargs):  # nothing runs: every config times the same
        return [1.0, 1.0, 1.0]

    Autotuner._bench = first_config

    if not compile:
        def bind_only(self, *args, grid, warmup, **kwargs):
            binder = self.device_caches[0][4]
            bound, specialization, options = binder(*args, **kwargs)
            named = dict(bound)
            resolved = grid(named) if callable(grid) else grid
            BINDINGS.append({"kernel": self.__name__, "specialization": _plain(specialization),
                             "options": _plain(options), "grid": tuple(resolved),
                             "values": {name: _pointer(value) for name, value in named.items()}})
            return None

        JITFunction.run = bind_only
    _ACTIVE.update(compile=compile, stub=stub, triton=triton.__version__)


def _plain(value):
    """Triton's specialization entries as comparable Python values."""
    if isinstance(value, dict):
        return tuple(sorted((key, _plain(entry)) for key, entry in value.items() if key != "debug"))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(entry) for entry in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def launch_count() -> int:
    """Launches the stubbed driver has seen (``cuLaunchKernelEx`` calls)."""
    return ctypes.c_uint64.in_dll(_ACTIVE["stub"], "fastrank_stub_launches").value
