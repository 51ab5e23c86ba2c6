"""What every kernel launcher of ``fastrank.kernels`` shares: the interpreter switch, host-side size
arithmetic, the autotune size buckets, launches through a remembered autotune choice, the device
guard, and launch plans (a launcher call replayed from an earlier run at about the host cost of a
cuBLAS call)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
import triton
import triton.testing
from triton.knobs import HookChain
from triton.runtime.autotuner import Autotuner


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the flag when a kernel is decorated, i.e. when a kernel module is imported; each
    module records the value it was built with as ``BUILT_FOR_INTERPRETER``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side size arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose Python call costs about 3 us (Triton 3.6 and 3.9, 2-core Xeon), and a grouped
# launch computed some twenty of them.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def size_bucket(n: int) -> int:
    """Autotune key for a size: the next power of two (at least 16)."""
    return max(16, next_power_of_2(n))


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (False for other devices)."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch._C._cuda_getDevice():
        return torch._C._cuda_isCurrentStreamCapturing()
    with torch.cuda.device(device.index):
        return torch._C._cuda_isCurrentStreamCapturing()


def on_own_thread(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` run on a new thread, which is joined; its exception is raised here."""
    made: list = []

    def run() -> None:
        try:
            made.append(make())
        except BaseException as error:  # noqa: BLE001  (raised on the calling thread)
            made.append(error)

    thread = threading.Thread(target=run, name="fastrank-buffer")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def persistent_buffer(device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` for a buffer that later launches share (it outlives the call that makes it).

    On CUDA it is made on a thread of its own, on that thread's default stream, which is then
    synchronized (whatever ``make`` wrote is there before any stream reads it): torch.compile's CUDA
    graph trees (``mode="reduce-overhead"``) send every allocation of the thread that warms up a
    graph into the graphs' memory pool, and raise when the pool holds a live tensor that is no
    graph output (``torch._inductor.cudagraph_trees.check_memory_pool``), which a buffer kept from
    a warm-up would be. Not while a graph is being captured (a launcher then makes a buffer of the
    capture's own instead). The caller keeps the buffer alive for good: it may not be freed while
    a stream's queued launches still use it."""
    if device.type != "cuda":
        return make()
    if device.index is None:  # the caller's current device, not the new thread's (device 0)
        device = torch.device("cuda", torch.cuda.current_device())

    def made_and_synchronized() -> torch.Tensor:
        with torch.cuda.device(device):
            buffer = make()
            torch.cuda.current_stream().synchronize()
        return buffer

    return on_own_thread(made_and_synchronized)


_UNUSED: dict[tuple, torch.Tensor] = {}


def unused_buffer(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element buffer of ``dtype`` on ``device`` for a pointer argument the kernel never
    dereferences in this launch (its signature needs a live, aligned pointer of that type); one
    per device and dtype, shared by every launch (:func:`persistent_buffer`), or, first asked for
    during a CUDA graph's capture, one of the capture's own."""
    key = (device, dtype)
    buffer = _UNUSED.get(key)
    if buffer is None:
        if capturing(device):
            return torch.empty(16, dtype=dtype, device=device)
        buffer = _UNUSED[key] = persistent_buffer(device, lambda: torch.empty(16, dtype=dtype, device=device))
    return buffer


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s CUDA device current for a launch (Triton launches on the current device);
    a no-op for CPU tensors (the interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# Autotuning times each config with ``triton.testing.do_bench`` for AUTOTUNE_WARMUP_MS of warm-up
# and AUTOTUNE_REP_MS of timed runs (the L2 flushed before each), where Triton's autotuner defaults
# to 25 and 100 ms. The kernels take 5-500 us, so 20 ms is still 40-4000 timed runs for the median,
# and a new autotune key (a new size bucket, a new layout) waits about a fifth as long for its
# configs' timing before its first launch returns (the compiles are not changed). Every shape of
# the train-step grid (benchmarks/gpu/train_grid.py) meets new keys: on an H200 it took 3.4 s a
# shape (26 of 72 shapes in its budget), where its timed steps take about 0.3-0.5 s (arithmetic from
# its step times and repeats). NOT MEASURED on a GPU.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20


def autotune_bench(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The benchmark of every fastrank ``@triton.autotune`` (its ``do_bench``): ``kernel_call``
    timed by ``triton.testing.do_bench`` for AUTOTUNE_WARMUP_MS + AUTOTUNE_REP_MS; returns the
    ``quantiles`` of its run time, in ms."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


# What every autotuning of a new key measured, in order: the GPU scripts write it beside their
# figures (benchmarks/gpu/train_grid.py), so that which configs win at which sizes, by how much, and
# what tuning cost is read from a run instead of guessed.
_AUTOTUNINGS: list[dict] = []


def _config_entry(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# Held around every call through a Triton autotuner: its run keeps the call's arguments and its
# choice on the shared Autotuner object (``nargs``, cleared at the end; ``best_config``), so two
# threads in one autotuner (autograd's per-device backward threads, a background RankTracker
# beside the training loop) could tune with the other's arguments or read the other's choice.
_AUTOTUNER_LOCK = threading.Lock()


def _autotuned(kernel, grid, args: tuple, kwargs: dict) -> tuple[object, dict]:
    """``kernel[grid](*args, **kwargs)`` through the autotuner: what the launch returned and the
    keyword arguments of the config it chose for this call (read under the same lock), recording
    in :func:`autotunings` what it timed if this call made it time its configs: a key it had not
    tuned (Triton 3.9 times nothing when its prune function leaves one config, 3.6 times that one)."""
    with _AUTOTUNER_LOCK:
        timings = getattr(kernel, "configs_timings", None)
        compiled = kernel[grid](*args, **kwargs)
        new = getattr(kernel, "configs_timings", None)
        best = kernel.best_config
        if new is not None and new is not timings:
            positions = _choices(kernel).positions
            values = _key_arguments(positions, args, kwargs)
            _AUTOTUNINGS.append({
                "kernel": kernel.base_fn.__name__,
                "key": {name: value for (name, _), value in zip(positions, values) if type(value) in (int, bool, str)},
                "dtype": str(getattr(_first_tensor(args), "dtype", None)),
                "chosen": _config_entry(best),
                "bench_s": getattr(kernel, "bench_time", None),  # compiles included: each config's first call
                "timings_ms": [{**_config_entry(config), "ms": float(timing[0] if isinstance(timing, (list, tuple)) else timing)}
                               for config, timing in new.items()],
            })
    return compiled, best.all_kwargs()


def autotunings() -> list[dict]:
    """Every autotuning of a new key since the process started, in order: the kernel's name, its
    key arguments, the chosen config, the seconds the tuning took (the configs' compiles
    included) and each config's median time in ms. Empty under the interpreter (one config)."""
    return list(_AUTOTUNINGS)


class _Choices:
    """One autotuned kernel's remembered choices: where its key arguments sit, and per key the
    meta-parameters of the config its autotuner chose."""

    def __init__(self, kernel):
        self.positions = [(name, kernel.arg_names.index(name)) for name in kernel.keys]
        self.configs: dict[tuple, dict] = {}


_CHOICES: "weakref.WeakKeyDictionary[object, _Choices]" = weakref.WeakKeyDictionary()


def _choices(kernel) -> _Choices:
    choices = _CHOICES.get(kernel)
    if choices is None:
        choices = _CHOICES[kernel] = _Choices(kernel)
    return choices


def _key_arguments(positions: Sequence[tuple[str, int]], args: tuple, kwargs: dict) -> tuple:
    """The values of an autotuner's key arguments (``_Choices.positions``) in a launch's arguments."""
    count = len(args)
    return tuple(args[index] if index < count else kwargs[name] for name, index in positions)


def _first_tensor(args: tuple):
    """A launch's first argument, or the first entry of it when it is a tuple of tensors."""
    return args[0][0] if isinstance(args[0], tuple) else args[0]


def launch_tuned(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` for an ``@triton.autotune`` kernel whose tensor arguments'
    dtypes all follow from the first argument's (or, for a tuple, its first entry's): the chain
    kernels, whose other tensors have that dtype or a fixed one.

    Returns what Triton's launch returns (the ``CompiledKernel``; None under the interpreter) and
    the chosen config's keyword arguments.

    The first launch of each autotune key goes through the autotuner (which tunes, or finds its
    choice cached); later launches call the JIT function with the config it chose, skipping the
    autotuner's per-call work, which with a warm cache took 30 us of the chain kernel's launch
    (39 arguments) and 54 us of the factor gradients' (64), about half of Triton's host time per
    launch (Triton 3.6 and 3.9, 2-core Xeon, CUDA driver stubbed). The key is the autotuner's own:
    the values of its key arguments, and the dtype (which it adds for every tensor argument).
    """
    choices = _choices(kernel)
    key = _key_arguments(choices.positions, args, kwargs) + (_first_tensor(args).dtype,)
    config = choices.configs.get(key)
    if config is None:
        compiled, config = _autotuned(kernel, grid, args, kwargs)
        choices.configs[key] = config
    else:
        compiled = kernel.fn[grid](*args, **kwargs, **config)
    return compiled, config


# --------------------------------------------------------------------------------------------
# launch plans
# --------------------------------------------------------------------------------------------
#
# A launcher call through Triton's JIT costs tens of microseconds of host time before the driver
# sees it: binding and specializing every argument, the kernel cache lookup, the autotuner, and
# fastrank's own Python that turns shapes into sizes, strides, grids and allocations
# (benchmarks/results/triton_launch_cpu.md). All of it depends only on the call's tensor
# metadata. A plan records, on the second call with some metadata, what that call did: the buffers
# it allocated, and per launch the compiled kernel, the grid and every argument, each tensor
# argument as a root (an input or an allocation) plus a byte offset. A later call with the same
# metadata allocates the same buffers, reads one pointer per root and launches the compiled kernels
# directly through Triton's launcher (``CompiledKernel.run``, which Triton 3.6 and 3.9 call with the
# same arguments), passing pointers as integers (so the launcher skips the ``data_ptr()`` call and
# the driver's pointer query it makes per tensor argument).
#
# Why the compiled kernel is the right one: a plan's key holds every input's shape, strides, dtype
# and device, the launcher's flags, and whether each input pointer is 16-byte aligned. Everything a
# launch passes is computed from the key (sizes, strides, grids and constexprs) or is a pointer:
# an input's (alignment in the key), an allocation's (checked 16-byte aligned at every replay), an
# offset from one of those fixed by the metadata. So Triton's own specialization of the arguments
# (alignment of pointers, integers equal to 1 or divisible by 16, int32 / int64 range, dtypes)
# is a function of the key; tests/test_launch_fast_path.py checks this against Triton's binder
# over many argument sets, with the CUDA driver stubbed. Whatever the key does not determine
# falls back to Triton's JIT: an input pointer of other alignment is another key, a tensor argument
# that is neither an input, a packed copy of one, nor an allocation of the call makes the call
# unplannable, launch hooks (profilers) or the interpreter take the JIT path every time. A packed
# copy (``.contiguous()`` of an input with other strides, such as the stride-0 gradient of a
# ``.sum()``) is made again at every replay from the call's input, whose strides are in the key. A
# call passing one tensor at two positions is not recorded (a replay reads each position's own
# pointer, and which position a launch argument came from is unknown), and a later call records.
#
# Building the key costs about 0.5 us per tensor (its shape, strides, dtype and device read from
# Python, then hashed and compared). A key's first replay therefore also keeps its plan under a
# guard of its tensors: torch's C-level TensorGuards, which Dynamo uses for the same purpose, and
# which compares a later call's tensors' Python type, dispatch keys, dtype, device index,
# requires_grad, shape and strides with these in one call. Later calls whose flags and pointer
# alignment are the key's and whose tensors pass the guard have that key (the guard compares
# more than the key holds, never less), so they run the plan without building it;
# tests/test_launch_fast_path.py draws argument sets to check that a guard hit means an equal key.


def _pointer_lines(count: int) -> tuple[list[str], list[str]]:
    """The generated lines that unpack ``count`` tensors into ``t0 ..`` and read their pointers
    into ``p0 ..`` and ``aligned`` (True when every pointer is 16-byte aligned: one OR instead of a
    tuple in the common case; else the alignment of each), and the pointers' names."""
    names = [f"t{i}" for i in range(count)]
    pointers = [f"p{i}" for i in range(count)]
    each = "".join(f"not {p} & 15, " for p in pointers)
    return [
        f"    {''.join(t + ', ' for t in names) or '()'} = tensors",
        *(f"    {p} = {t}.data_ptr()" for p, t in zip(pointers, names)),
        f"    aligned = True if not ({' | '.join(pointers) or '0'}) & 15 else ({each})",
    ], pointers


def _generated(name: str, parameters: str, lines: list[str]) -> Callable:
    namespace: dict = {}
    exec("\n".join([f"def {name}({parameters}):", *lines]), namespace)  # noqa: S102  (from a count alone)
    return namespace[name]


def _keyer(count: int) -> Callable[[Sequence[torch.Tensor], tuple], tuple[tuple, list[int]]]:
    """:func:`call_key` for ``count`` tensors, generated with every attribute read written out: the
    comprehensions it replaces cost 0.9 us more for 8 tensors (2-core EPYC, torch 2.13)."""
    # The device as its index (get_device(): -1 on the CPU), which hashes and compares as an int: a
    # torch.device in every entry cost 0.5 us more per 8-tensor key, built and looked up (2-core EPYC).
    metadata = "".join(f"(t{i}.shape, t{i}.stride(), t{i}.dtype, t{i}.get_device()), " for i in range(count))
    lines, pointers = _pointer_lines(count)
    return _generated("key", "tensors, flags", [
        *lines, f"    return (flags, ({metadata}), aligned), [{', '.join(pointers)}]"])


def _pointer_reader(count: int) -> Callable[[Sequence[torch.Tensor]], tuple[object, list[int]]]:
    """``(aligned, pointers)`` of ``count`` tensors, as :func:`call_key` computes them."""
    lines, pointers = _pointer_lines(count)
    return _generated("read", "tensors", [*lines, f"    return aligned, [{', '.join(pointers)}]"])


_KEYERS: dict[int, Callable] = {}
_READERS: dict[int, Callable] = {}


def call_key(tensors: Sequence[torch.Tensor], flags: tuple) -> tuple[tuple, list[int]]:
    """``(key, pointers)`` of a launcher call: the plan key of its input ``tensors`` and launcher
    ``flags`` (what its launches depend on), and each input's data pointer.

    The key is ``(flags, metadata, aligned)``: per tensor ``(shape, stride(), dtype,
    get_device())``, and True when every pointer is 16-byte aligned, else a tuple of each one's
    alignment."""
    keyer = _KEYERS.get(len(tensors))
    if keyer is None:
        keyer = _KEYERS[len(tensors)] = _keyer(len(tensors))
    return keyer(tensors, flags)


def read_pointers(tensors: Sequence[torch.Tensor]) -> tuple[object, list[int]]:
    """``(aligned, pointers)``: the last component of :func:`call_key`'s key, and its pointers."""
    reader = _READERS.get(len(tensors))
    if reader is None:
        reader = _READERS[len(tensors)] = _pointer_reader(len(tensors))
    return reader(tensors)


# Dynamo's C-level tensor check (torch._C._dynamo.guards.TensorGuards): whether tensors have the
# Python type, dispatch keys (device type among them), dtype, device index, requires_grad, shape
# and strides of the tensors it was made from. 0.9 us for 8 tensors where their key costs 5.3 us
# to build and look up (2-core EPYC, torch 2.13). None where torch has none.
_TENSOR_GUARDS = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None), "TensorGuards", None)


def tensor_guard(tensors: Sequence[torch.Tensor]):
    """A check ``guard.check(*others)`` that passes only for tensors whose :func:`call_key`
    metadata (shape, strides, dtype, device) equals that of ``tensors`` (it also compares their
    Python type, requires_grad and dispatch keys, so it may fail where the keys are equal, never
    pass where they differ); None where torch's ``TensorGuards`` is missing or takes other
    arguments."""
    if _TENSOR_GUARDS is None:
        return None
    try:
        return _TENSOR_GUARDS(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except (TypeError, RuntimeError):
        return None


class _Packed:
    """The kind of a recorded packed copy: ``inputs[input].contiguous()``."""

    __slots__ = ("input",)

    def __init__(self, input: int):
        self.input = input


class _Slot:
    """A tensor argument of a recorded launch: ``roots[root]``'s pointer plus ``offset`` bytes."""

    __slots__ = ("root", "offset")

    def __init__(self, root: int, offset: int):
        self.root, self.offset = root, offset


def _launch_call(compiled) -> tuple[Callable, tuple, bool]:
    """How to launch ``compiled`` without Triton's Python: ``(function, leading, packed)``, the launch
    being ``function(grid_x, grid_y, grid_z, stream, *leading, arguments)`` when ``packed``, else
    ``function(grid_x, grid_y, grid_z, stream, *leading, *arguments)``.

    For a kernel without global or profile scratch memory, ``function`` is the C launch function of
    Triton's ``CudaLauncher`` (its Python ``__call__`` took 0.8 us of a 1.7 us launch, Triton 3.9,
    2-core Xeon). The two launchers this knows take different arguments: Triton 3.9's generic one
    (it has ``kernel_signature``) the scratch pointers after the hooks, then the argument annotations
    and signature, and the arguments as one tuple; Triton 3.6's per-signature module the scratch
    pointers before the metadata and the arguments spread. Otherwise ``CompiledKernel.run``, whose
    arguments Triton 3.6 and 3.9 share. Launch metadata and hooks are None: a plan does not replay
    while hooks are installed.
    """
    launcher = compiled.run  # initializes the kernel's module and Triton's launcher once
    function, metadata = compiled.function, compiled.packed_metadata
    launch = getattr(launcher, "launch", None)
    direct = (
        launch is not None
        and not getattr(launcher, "gsan_enabled", False)
        and not getattr(launcher, "global_scratch_size", 1)
        and not getattr(launcher, "profile_scratch_size", 1)
    )
    if direct:
        cooperative, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
        if hasattr(launcher, "kernel_signature") and hasattr(launcher, "arg_annotations"):  # Triton 3.9
            return launch, (function, cooperative, pdl, metadata, None, None, None, None, None,
                            launcher.arg_annotations, launcher.kernel_signature), True
        if not hasattr(launcher, "kernel_signature"):  # Triton 3.6
            return launch, (function, cooperative, pdl, None, None, metadata, None, None, None), False
    return launcher, (function, metadata, None, None, None), False


def _launch_hooks_installed() -> bool:
    """Whether a launch hook is installed (a profiler such as Proton): Triton 3.6 and 3.9 keep them
    in a ``HookChain`` (empty by default), and a replay, which passes no launch metadata, then
    leaves the launch to the JIT. A hook set as a plain function counts as installed."""
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    if type(enter) is HookChain and type(exit_) is HookChain:  # the common case: 0.07 against 0.21 us
        return bool(enter.calls or exit_.calls)
    return any(hook is not None and getattr(hook, "calls", True) for hook in (enter, exit_))


def _current_cuda_device() -> int:
    """The current CUDA device's index, for a call whose inputs are CUDA tensors (so CUDA is
    initialized): torch's raw query, without ``torch.cuda.current_device``'s initialization check."""
    return torch._C._cuda_getDevice()


def _contiguous_strides(shape: tuple) -> tuple:
    """The strides ``torch.empty(shape)`` gives: row-major, a zero size counting as one."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _allocator(device: torch.device) -> Callable[[tuple, tuple, torch.dtype], torch.Tensor]:
    """``allocate(shape, stride, dtype)``: an uninitialized tensor on ``device`` (for CUDA: on the
    current device, which a replay makes ``device``), through the caching allocator as
    ``torch.empty_strided``.

    The allocator of Inductor's generated code (``torch._C._dynamo.guards._empty_strided_<type>``,
    which skips the dispatcher and the Python argument parser: 0.46 against 0.93 us for
    ``torch.empty_like`` of an expanded template and 1.0 us for ``torch.empty_strided``, torch
    2.13, 2-core EPYC) where torch has it for the device type; else ``torch.empty_strided``."""
    guards = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
    fast = getattr(guards, f"_empty_strided_{device.type}", None)
    if fast is not None:
        return fast

    def allocate(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)

    return allocate


class _Source:
    """The source of a generated function and the objects it names."""

    def __init__(self):
        self.lines: list[str] = []
        self.namespace: dict = {}
        self.names: dict[int, str] = {}  # id of a named value -> its name

    def name(self, value, prefix: str = "k") -> str:
        """An expression for ``value``: a literal for an int, bool or None, else its name (one per
        object)."""
        if value is None or type(value) in (int, bool):
            return repr(value)
        name = self.names.get(id(value))
        if name is None:
            name = self.names[id(value)] = f"{prefix}{len(self.namespace)}"
            self.namespace[name] = value  # keeps value alive, so its id stays its own
        return name

    def function(self, name: str, parameters: str) -> Callable:
        self.text = f"def {name}({parameters}):\n" + "".join(f"    {line}\n" for line in self.lines)
        exec(self.text, self.namespace)  # noqa: S102  (generated from a recorded call)
        return self.namespace[name]


class LaunchPlan:
    """What a launcher call does, for replay by a later call with the same :func:`call_key`.

    ``run(pointers, device_index, tensors)`` is generated from the recorded call as one Python
    function: it packs the inputs the call packed (``tensors[i].contiguous()``), makes the call's
    allocations (:func:`_allocator`'s, contiguous or, for an output returned as a transposed
    matrix such as a column-major factor's gradient, with that view's strides), reads one pointer
    per allocation and per external buffer (``fetch()`` each time: a buffer that outlives the
    call, such as the split-K arrival counters or the shared workspace of the current stream),
    checks those pointers 16-byte aligned, launches every recorded kernel with its arguments written out (sizes, strides
    and constexprs as constants, each tensor argument as a pointer plus an offset) and returns the
    outputs; None where an allocation is not aligned or an external buffer is unavailable.
    """

    __slots__ = ("run", "keep", "source")

    def __init__(self, run: Callable, keep: list, source: str):
        self.run = run
        self.keep = keep  # buffers whose pointers the launches name as constants
        self.source = source  # run's source

    def replay(self, pointers: list[int], index: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Run the plan for the input ``tensors`` whose pointers are ``pointers`` (in key order,
        followed by the per-call scalars) on the device ``index`` (``Tensor.get_device()``); None
        when it cannot (an allocation not 16-byte aligned, an external buffer unavailable, launch
        hooks installed), and the caller then takes the JIT path."""
        if _launch_hooks_installed():
            return None
        if index < 0:  # the CPU tensors of a stubbed driver
            return self.run(pointers, 0, tensors)
        if index != _current_cuda_device():
            with torch.cuda.device(index):
                return self.run(pointers, index, tensors)
        return self.run(pointers, index, tensors)


class PlanRecorder:
    """Records a launcher call made through Triton's JIT as a :class:`LaunchPlan`.

    The launcher allocates its buffers with :meth:`empty`, packs inputs with :meth:`contiguous`,
    names buffers that outlive the call with :meth:`external` and launches with :meth:`launch`.
    Every tensor argument of a launch must be one of these, an input of the call, or a view of an
    input with the input's data pointer that no other input shares; else the call is not
    plannable and :meth:`plan` returns None. ``retry``: the call's key is left to a later call to
    record (the key's first call, or a call not plannable for a reason of its own: one tensor at
    two positions).
    """

    def __init__(self, inputs: Sequence[torch.Tensor], scalars: int = 0, active: bool = True):
        self.plannable = active  # inactive: launch and allocate only (the call's plan is known)
        self.retry = False
        self.shared_taken = False  # whether a workspace of the call is a shared buffer
        self.roots: list = list(inputs) + [None] * scalars
        # "input", "scalar" (a per-call integer argument), (shape, dtype) of an allocation, a
        # _Packed copy of an input, the fetch function of an external buffer, or "constant" (a
        # buffer that lives as long as the plan)
        self.kinds: list = ["input"] * len(inputs) + ["scalar"] * scalars
        self.launches: list[tuple] = []  # (compiled kernel, grid, argument values with slots)

    def empty(self, shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``torch.empty(shape)`` on ``like``'s device, in its dtype unless ``dtype``, recorded."""
        buffer = torch.empty(shape, dtype=dtype if dtype is not None else like.dtype, device=like.device)
        if self.plannable:
            self.roots.append(buffer)
            self.kinds.append((tuple(buffer.shape), buffer.dtype))
        return buffer

    def contiguous(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor.contiguous()``, recorded when it packs an input of the call: a replay packs the
        input at that position of its own call (its strides, in the key, are these)."""
        packed = tensor.contiguous()
        if packed is tensor or not self.plannable:
            return packed
        positions = self._positions(tensor)
        if len(positions) == 1:
            self.roots.append(packed)
            self.kinds.append(_Packed(positions[0]))
        else:  # not an input (a view of one: unplannable), or one at several positions
            self.plannable = False
        return packed

    def _positions(self, tensor: torch.Tensor) -> list[int]:
        """The input positions holding ``tensor`` itself; at more than one, the call is left to a
        later one to record (``retry``)."""
        positions = [root for root, kind in enumerate(self.kinds) if kind == "input" and self.roots[root] is tensor]
        if len(positions) > 1:
            self.retry = True
        return positions

    def workspace(self, parts: Sequence[tuple], like: torch.Tensor,
                  shared: Callable[[int], tuple[torch.Tensor, Callable[[], torch.Tensor]] | None] | None = None,
                  ) -> list[torch.Tensor]:
        """Temporary buffers ``(shape, dtype)`` on ``like``'s device carved from one buffer, each
        starting 256-byte aligned: one recorded allocation (one ``torch.empty`` per replay instead
        of one per buffer, ~1 us each on the CPU allocator), or, where ``shared(nbytes)`` gives
        one, the start of a buffer that outlives the call and the fetch that finds it at each
        replay (a workspace the current stream's launches share, ``external``). A call takes a
        shared buffer once: a second workspace of the call is allocated (the two would overlap)."""
        offsets, size = [], 0
        for shape, dtype in parts:
            offsets.append(size)
            numel = math.prod(shape)
            size += -(-numel * dtype.itemsize // 256) * 256
        found = shared(max(size, 1)) if shared is not None and not self.shared_taken else None
        if found is not None:
            self.shared_taken = True
            buffer = self.external(*found)
        else:
            buffer = self.empty(max(size, 1), like, torch.uint8)
        return [
            buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for offset, (shape, dtype) in zip(offsets, parts)
        ]

    def external(self, buffer: torch.Tensor, fetch: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        """``buffer``, recorded as fetched by ``fetch()`` at every replay."""
        if self.plannable:
            self.roots.append(buffer)
            self.kinds.append(fetch)
        return buffer

    def constant(self, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer``, recorded as a constant: the plan keeps it and launches with its pointer (a
        buffer that is never written, such as :func:`unused_buffer`'s)."""
        if self.plannable:
            self.roots.append(buffer)
            self.kinds.append("constant")
        return buffer

    def launch(self, kernel, grid, *args, tuned_choice: bool = True, per_call: dict | None = None, **kwargs) -> None:
        """Launch ``kernel[grid](*args, **kwargs)`` and record it. An autotuned ``kernel`` goes through
        :func:`launch_tuned` (its remembered choice) unless ``tuned_choice`` is False. ``per_call``
        maps argument names to scalar indices: those arguments (``do_not_specialize`` integers) are
        read at every replay from the values following the input pointers."""
        if isinstance(kernel, Autotuner):
            if tuned_choice:
                compiled, config = launch_tuned(kernel, grid, *args, **kwargs)
            else:
                compiled, config = _autotuned(kernel, grid, args, kwargs)
            function = kernel.fn
        else:
            compiled, config, function = kernel[grid](*args, **kwargs), {}, kernel
        if not self.plannable:
            return
        if compiled is None or not hasattr(compiled, "packed_metadata"):  # the interpreter
            self.plannable = False
            return
        named = {**dict(zip(function.arg_names, args)), **kwargs, **config}
        if any(name not in named for name in function.arg_names):  # a default value: not recorded
            self.plannable = False
            return
        first_scalar = self.kinds.index("scalar") if per_call else 0
        values = [
            _Slot(first_scalar + per_call[name], 0) if per_call and name in per_call else self._slots(named[name])
            for name in function.arg_names
        ]
        resolved = tuple(grid(named) if callable(grid) else grid)
        self.launches.append((compiled, resolved + (1,) * (3 - len(resolved)), values))

    def _slots(self, value):
        if isinstance(value, tuple):
            return tuple(self._slots(entry) for entry in value)
        if not isinstance(value, torch.Tensor):
            return value
        positions = self._positions(value)
        if len(positions) > 1:  # which position this argument came from is unknown
            self.plannable = False
            return value
        for root, candidate in enumerate(self.roots):
            if value is candidate:
                return _Slot(root, 0)
        pointer = value.data_ptr()
        for root, candidate in enumerate(self.roots):
            if self.kinds[root] in ("input", "scalar"):
                continue
            storage = candidate.untyped_storage()
            if storage.data_ptr() <= pointer < storage.data_ptr() + storage.nbytes():
                return _Slot(root, pointer - candidate.data_ptr())
        sharing = [root for root, kind in enumerate(self.kinds) if kind == "input" and self.roots[root].data_ptr() == pointer]
        if len(sharing) == 1:  # a view of one input (a transpose): its pointer
            return _Slot(sharing[0], 0)
        # A tensor the plan cannot rebuild: a copy it did not record, or a view whose pointer
        # several inputs share (then a later call, whose inputs may not, records).
        self.plannable = False
        self.retry = self.retry or len(sharing) > 1
        return value

    def plan(self, outputs: Sequence[torch.Tensor]) -> LaunchPlan | None:
        """The plan of the recorded call returning ``outputs`` (each an allocation or a view of
        one), or None when the call is not plannable."""
        if not self.plannable or not self.launches:
            return None
        source, keep = _Source(), []
        lines = source.lines
        allocations = [root for root, kind in enumerate(self.kinds) if isinstance(kind, tuple)]
        # root -> (shape, strides) it is made with: its recorded shape, contiguous, unless returned as below
        layouts = {root: (self.kinds[root][0], _contiguous_strides(self.kinds[root][0])) for root in allocations}
        returned: list[tuple[int, torch.Tensor | None]] = []  # per output: its allocation, and the view
        for output in outputs:  # of it that the output is (None: the allocation itself)
            storage = output.untyped_storage().data_ptr()
            root = next((root for root in allocations if output is self.roots[root]), None)
            if root is not None:
                returned.append((root, None))
                continue
            root = next((root for root in allocations if self.roots[root].untyped_storage().data_ptr() == storage), None)
            if root is None:
                return None  # an input, or a tensor no allocation holds
            returned.append((root, output))
        for position, (root, view) in enumerate(returned):
            # An allocation returned once, as a view of all of it that is contiguous or a transposed
            # matrix (a gradient in a column-major factor's layout): made as the view (its shape and
            # strides), not made and then viewed (as_strided costs 1.0 us, 2-core EPYC).
            if (view is not None and view.storage_offset() == 0 and view.numel() == self.roots[root].numel()
                    and [r for r, _ in returned].count(root) == 1
                    and (view.is_contiguous() or (view.dim() == 2 and view.T.is_contiguous()))):
                layouts[root] = (tuple(view.shape), tuple(view.stride()))
                returned[position] = (root, None)
        pointer_of: dict[int, str] = {}  # root -> the expression of its pointer
        allocated: dict[int, str] = {}  # root -> the name of its buffer
        for root, kind in enumerate(self.kinds):
            if kind in ("input", "scalar"):
                pointer_of[root] = f"p{len(pointer_of)}"
        # one unpacking, then a local per pointer: a subscript per use cost 0.1 us more for the
        # grouped factor gradients' sixteen uses (2-core EPYC)
        lines.append(f"{''.join(name + ', ' for name in pointer_of.values()) or '()'} = p")
        allocators: dict[torch.device, Callable] = {}  # one per device, so that each is named once
        for root, kind in enumerate(self.kinds):
            if isinstance(kind, tuple):
                (shape, stride), dtype = layouts[root], kind[1]
                buffer = allocated[root] = f"a{root}"
                device = self.roots[root].device
                if device not in allocators:
                    allocators[device] = _allocator(device)
                allocate = source.name(allocators[device], "m")
                lines.append(f"{buffer} = {allocate}({shape!r}, {stride!r}, {source.name(dtype, 'd')})")
                lines.append(f"q{root} = {buffer}.data_ptr()")
                pointer_of[root] = f"q{root}"
            elif isinstance(kind, _Packed):
                lines.append(f"c{root} = tensors[{kind.input}].contiguous()")
                lines.append(f"q{root} = c{root}.data_ptr()")
                pointer_of[root] = f"q{root}"
            elif kind == "constant":
                keep.append(self.roots[root])
                pointer_of[root] = repr(self.roots[root].data_ptr())
            elif callable(kind):
                lines.append(f"e{root} = {source.name(kind, 'f')}()")
                lines.append(f"if e{root} is None: return None")
                lines.append(f"q{root} = e{root}.data_ptr()")
                pointer_of[root] = f"q{root}"
        checked = [pointer_of[root] for root, kind in enumerate(self.kinds)
                   if isinstance(kind, (tuple, _Packed)) or callable(kind)]
        if checked:  # 16-byte aligned when recorded (an input's alignment is in the key)
            lines.append(f"if ({' | '.join(checked)}) & 15: return None")
        lines.append("stream = stream_of(index)")

        def expression(value) -> str:
            if isinstance(value, _Slot):
                pointer = pointer_of[value.root]
                return f"{pointer} + {value.offset}" if value.offset else pointer
            if isinstance(value, tuple):
                return "(" + "".join(expression(entry) + ", " for entry in value) + ")"
            return source.name(value)

        for compiled, grid, values in self.launches:
            function, leading, packed = _launch_call(compiled)
            arguments = "".join(expression(value) + ", " for value in values)
            lines.append(f"{source.name(function, 'l')}({', '.join(map(str, grid))}, stream, "
                         f"{''.join(name + ', ' for name in map(source.name, leading))}"
                         f"{'(' + arguments + ')' if packed else arguments})")
        results = [
            allocated[root] if view is None else
            f"{allocated[root]}.as_strided({tuple(view.shape)!r}, {view.stride()!r}, {view.storage_offset()})"
            for root, view in returned
        ]
        lines.append(f"return [{', '.join(results)}]")
        source.namespace.update(stream_of=triton.runtime.driver.active.get_current_stream)
        run = source.function("run", "p, index, tensors")
        return LaunchPlan(run, keep, source.text)


_CACHES: list[PlanCache] = []  # every PlanCache made (one per launcher), for jit_calls()


def jit_calls() -> int:
    """How many launcher calls took the JIT path (no plan for their key, a plan that could not run,
    or a key that is not plannable) since the process started, over every launcher: a steady
    training loop adds none once each shape's second call has recorded its plan."""
    return sum(cache.jit_calls for cache in _CACHES)


# Guarded entries a PlanCache keeps per bucket (flags, tensor count, the first tensor's shape and
# dtype, the last one's shape): a call checks them in order (a failing check costs about 0.5 us,
# where alignment does not already tell them apart), the key path serves the rest.
GUARDS_PER_BUCKET = 8
# Calls of fewer tensors build their key: a single tensor's key costs what the bucket and a check
# do (gaussian_sketch replayed in 8.9 us by its key, 9.7 us by a guard; driver stubbed, 2-core EPYC).
GUARDED_FROM = 2


class PlanCache:
    """One launcher's plans by :func:`call_key`; None marks a key that is not plannable. A key is
    recorded at its second call: its first only enters ``seen``. Recording costs about 0.35 ms (the
    plan's Python, generated and compiled: chain_matmul took 87 us at a key's first call, 428 us
    at its second, 12.8 us replayed; driver stubbed, 2-core EPYC), which a key met once, such as
    one prompt length of a varying workload, would pay for nothing. At most ``limit`` keys are kept
    in each, the oldest dropped first (a workload whose shapes keep changing would otherwise grow
    them without end). ``jit_calls`` counts the calls that took the JIT path (each made a
    :meth:`recorder`).

    A call finds its plan without building its key where it can: a key's first replay also
    keeps the plan under a :func:`tensor_guard` of its tensors with its flags and pointer
    alignment (``guarded``), and later calls whose tensors pass that guard, with equal flags and
    alignment, have the key (the guard compares everything the key holds) and run the plan."""

    def __init__(self, limit: int = 4096):
        self.plans: dict[tuple, LaunchPlan | None] = {}
        self.seen: dict[tuple, None] = {}  # keys met once, in order
        # bucket (see GUARDS_PER_BUCKET) -> [(guard, plan, key)]
        self.guarded: dict[tuple, list[tuple]] = {}
        self.limit = limit
        self.jit_calls = 0
        _CACHES.append(self)

    def replay(self, tensors: Sequence[torch.Tensor], flags: tuple, index: int,
               scalars: Sequence[int] = ()) -> tuple[list[torch.Tensor] | None, tuple | None]:
        """``(outputs, key)`` of a launcher call on the input ``tensors`` with launcher ``flags``
        (what its launches depend on, as :func:`call_key` takes them) on the device ``index`` (the
        inputs' ``get_device()``), ``scalars`` the per-call integers its plan reads after the
        pointers: the outputs of the plan for the call's key, or None (no plan, or it could not
        run: the caller then takes the JIT path with a :meth:`recorder` for ``key``). ``key`` is
        None when a guard found the plan (the key was not built)."""
        bucket = None
        if len(tensors) >= GUARDED_FROM:
            first = tensors[0]
            bucket = (flags, len(tensors), first.shape, first.dtype, tensors[-1].shape)
            entries = self.guarded.get(bucket)
            if entries:
                aligned, pointers = read_pointers(tensors)
                for guard, plan, key in entries:
                    if key[2] == aligned and guard.check(*tensors):
                        if scalars:
                            pointers.extend(scalars)
                        outputs = self._run(plan, pointers, index, tensors)
                        # the key's plan, which could not run: the JIT path, as the key path would take
                        return (outputs, None) if outputs is not None else (None, key)
        key, pointers = call_key(tensors, flags)
        plan = self.plans.get(key)
        if plan is None:
            return None, key
        if scalars:
            pointers.extend(scalars)
        outputs = self._run(plan, pointers, index, tensors)
        if outputs is not None and bucket is not None:
            self._guard(bucket, key, plan, tensors)
        return outputs, key

    @staticmethod
    def _run(plan: LaunchPlan, pointers: list[int], index: int,
             tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        if _launch_hooks_installed():
            return None
        # LaunchPlan.replay's steps, inline on the common paths
        if index < 0:  # the CPU tensors of a stubbed driver
            return plan.run(pointers, 0, tensors)
        if index != _current_cuda_device():
            return plan.replay(pointers, index, tensors)
        return plan.run(pointers, index, tensors)

    def _guard(self, bucket: tuple, key: tuple, plan: LaunchPlan, tensors: Sequence[torch.Tensor]) -> None:
        """Keep ``plan`` under a guard of ``tensors`` (whose key is ``key``) in ``bucket``, unless
        it is full or torch has no guards."""
        entries = self.guarded.get(bucket, ())
        if len(entries) < GUARDS_PER_BUCKET:
            guard = tensor_guard(tensors)
            if guard is not None:
                self.guarded.setdefault(bucket, []).append((guard, plan, key))

    def _forget(self, key: tuple) -> None:
        """Drop the guarded entries of ``key`` (its plan left the cache)."""
        for bucket, entries in list(self.guarded.items()):
            kept = [entry for entry in entries if entry[2] != key]
            if len(kept) != len(entries):
                if kept:
                    self.guarded[bucket] = kept
                else:
                    del self.guarded[bucket]

    def recorder(self, key: tuple, inputs: Sequence[torch.Tensor], scalars: int = 0) -> PlanRecorder:
        """A :class:`PlanRecorder` for a call with ``key`` that the JIT runs: recording at the key's
        second call, else launching only (its first call, a plan that could not run, or a key not
        plannable)."""
        self.jit_calls += 1
        if key in self.plans:
            return PlanRecorder(inputs, scalars, active=False)
        if key not in self.seen:
            if len(self.seen) >= self.limit:
                del self.seen[next(iter(self.seen))]
            self.seen[key] = None
            first = PlanRecorder(inputs, scalars, active=False)
            first.retry = True  # the key's next call records
            return first
        return PlanRecorder(inputs, scalars)

    def record(self, key: tuple, recorder: PlanRecorder, outputs: Sequence[torch.Tensor]) -> None:
        """Keep the plan ``recorder`` made of the call with ``key`` returning ``outputs`` (None: the
        key is not plannable), unless the call left its key to a later one (``recorder.retry``)."""
        if key not in self.plans and not recorder.retry:
            self.seen.pop(key, None)
            if len(self.plans) >= self.limit:
                oldest = next(iter(self.plans))
                del self.plans[oldest]
                self._forget(oldest)
            self.plans[key] = recorder.plan(outputs)

    def clear(self) -> None:
        self.plans.clear()
        self.seen.clear()
        self.guarded.clear()
