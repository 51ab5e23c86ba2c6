"""Ahead-of-time compile gate for the Triton kernels of ``fastrank.kernels`` (no GPU needed).

    python -m fastrank.kernels.report [--arch 80 90] [--json PATH]

Compiles every kernel listed in :data:`KERNELS` at every configuration its autotuner can select
(the ``@triton.autotune`` configs, through the kernel's ``early_config_prune`` for each value of
the launcher's constexprs), for each dtype, with ``triton.compile`` for a ``GPUTarget`` and the
ptxas of the Triton wheel, and prints one row per compile: registers, spill bytes, stack frame,
shared memory, tensor-core instructions (``wgmma.mma_async`` / ``mma.sync`` in the PTX) and global
loads (``ld.global`` vectorized to v2/v4/v8 against scalar; ``cp.async`` copies to shared memory).

Exit status: 0 when every row passes; 1 when a selectable config fails to compile, takes longer
than ``--timeout`` to compile, spills (ptxas reports spill stores or loads) or needs more shared
memory than the target allows; 2 when :data:`KERNELS` and a kernel disagree. On a Triton without
the ahead-of-time API (or without ptxas) it prints why and exits 0 without checking anything.

Compiles run in parallel, one forked process each (``--workers``, default ``os.cpu_count()``),
so that a compile running past ``--timeout`` can be killed and reported (and counted as failing
again while the limit is not raised). Finished rows are cached
under ``~/.cache/fastrank/kernel-report`` (``--cache-dir``; ``--no-cache`` to recompile), keyed
on the kernel source (``JITFunction.cache_key``, which covers the functions it calls), the
signature, constexprs, options, target and Triton version: an edit to a kernel recompiles that
kernel only.

Rows describe the launch the launchers make for contiguous, 16-byte aligned tensors (the
signature strings of :data:`KERNELS`); odd strides and unaligned sizes are other specializations,
compiled on the GPU when they occur.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# =============================================================================================
# THE TABLE: one entry per kernel. When a kernel's signature changes, edit its entry here.
#
#   module, kernel  where the @triton.jit function (or its @triton.autotune wrapper) lives.
#   args            every runtime (non-constexpr) argument, in the kernel's order, as the
#                   signature of the launch the launcher makes, in triton/tools/compile.py's
#                   notation: "*fp16:16" a pointer aligned to 16 bytes (torch allocations are),
#                   "i32" / "i64" an integer, "i32:16" an integer divisible by 16, "1" an integer
#                   equal to 1 (a unit stride: Triton compiles it in as a constant); a tuple of
#                   such strings for a tuple argument (entries other than "1"). "{dtype}" is
#                   replaced by each entry of `dtypes`, "{acc}" by its accumulator type (fp64 for
#                   fp64, fp32 otherwise).
#   dtypes          the element types the launcher passes the kernel.
#   constexprs      constexprs the launcher sets (the autotuner does not): name -> the values it
#                   can take, every one compiled; a dict keyed by dtype where they depend on it.
#                   Size buckets belong here (e.g. BLOCK_N): the prune function sees them.
#   launch          kernels without @triton.autotune: the launcher's meta-parameters, as
#                   (constexprs, num_warps, num_stages).
#   sizes           representative values of runtime arguments that the autotuner's prune
#                   function reads (none of today's prune functions reads one).
#   skip            (dtype, constexprs) -> True for combinations the launcher never launches.
#
# The report checks every entry against the kernel (fn.arg_names, which parameters are
# constexpr, the autotune configs) and stops with a message naming the kernel and the argument
# when they disagree.
# =============================================================================================

# tl.dot input precision the chain launchers pass: fp32 follows torch's TF32 switch ("tf32" or
# "ieee"); halves pass "tf32", which tl.dot ignores for 16-bit operands.
_CHAIN_PRECISION = {"fp32": ("ieee", "tf32"), "fp16": ("tf32",), "bf16": ("tf32",)}

# The sketch launcher's constexprs (fastrank.kernels.sketch._matmul): fp32 follows torch's TF32
# switch, every other dtype passes "tf32" (ignored); BLOCK_K = sketch_block_k(k) (at most 64 for
# fp32 "ieee" and for fp64); `skip` drops the "ieee" BLOCK_K the launcher never makes.
_SKETCH_CONSTEXPRS = {
    "ACC_FP64": {"fp32": (False,), "fp16": (False,), "bf16": (False,), "fp64": (True,)},
    "INPUT_PRECISION": {"fp32": ("ieee", "tf32"), "fp16": ("tf32",), "bf16": ("tf32",), "fp64": ("tf32",)},
    "ELEMENT_SIZE": {"fp32": (4,), "fp16": (2,), "bf16": (2,), "fp64": (8,)},
    "BLOCK_K": {"fp32": (32, 64, 128, 256), "fp16": (32, 64, 128, 256), "bf16": (32, 64, 128, 256),
                "fp64": (32, 64)},
}


def _sketch_skip(dtype: str, variant: dict) -> bool:
    return variant["INPUT_PRECISION"] == "ieee" and variant["BLOCK_K"] > 64


# The launch of the sketch of a contiguous 1,000,000 x 4096 X (and of the Gram form's second
# launch, Y = A Z): 16-divisible rows and sizes, a batch stride past 2**31 (i64), Omega (Z) read
# through its transposed (k, n) buffer (stride_bn 1), one matrix, one split. The other sketch
# launches below differ from it in a few entries.
_SKETCH_ARGS = {
    "a_ptr": "*{dtype}:16", "b_ptr": "*{dtype}:16", "y_ptr": "*{acc}:16",
    "M": "i32", "N": "i32:16", "K": "i32:16", "split_size": "i32:16", "batch_size": "1",
    "stride_ab": "i64:16", "stride_am": "i32:16", "stride_an": "1",
    "stride_bb": "i32:16", "stride_bn": "1", "stride_bk": "i32:16",
    "stride_ys": "i32:16", "stride_yb": "i32:16", "stride_ym": "i32:16", "stride_yk": "1",
    "M_BUCKET": "i32:16", "N_BUCKET": "i32:16", "K_BUCKET": "i32:16",
}


@dataclass(frozen=True)
class KernelSpec:
    module: str
    kernel: str
    args: dict[str, str | tuple[str, ...]]
    dtypes: tuple[str, ...]
    constexprs: dict[str, tuple | dict[str, tuple]] = field(default_factory=dict)
    launch: tuple[dict, int, int] | None = None
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skip: Callable[[str, dict], bool] | None = None  # (dtype, constexprs) the launcher never makes


KERNELS: dict[str, KernelSpec] = {
    "chain_matmul": KernelSpec(
        module="fastrank.kernels.chain",
        kernel="_chain_matmul_kernel",
        # A tile load that Triton pipelines through cp.async leaves no ld.global behind: in the
        # streamed chain and factor-gradient rows `vec ld` can be 0 while every tile is copied in
        # 16-byte cp.async (cp.async.cg ... 0x10 in their PTX), the vectorized form.
        # Eight factor / destination slots (unused ones repeat a live tensor and size). Unit strides
        # are compile-time constants inside the kernel (the layout flags); the other strides,
        # the widths and M are multiples of 16 here, the layers' d = 256 .. 1024 (odd sizes are
        # other specializations: same code, masked scalar loads where a row is not 16-aligned).
        args={"x_ptr": "*{dtype}:16", "factors": ("*{dtype}:16",) * 8, "dests": ("*{dtype}:16",) * 8,
              "M": "i32:16", "widths": ("i32:16",) * 9,
              "M_BUCKET": "i32:16", "WIDTH_BUCKET": "i32:16",
              "stride_x": "i32:16", "factor_strides": ("i32:16",) * 8,
              "NUM_FACTORS": "i32"},
        dtypes=("fp32", "fp16", "bf16"),
        constexprs={
            # _resident_block(widths): size_bucket(widest) up to MAX_RESIDENT_WIDTH, else 0 (streamed,
            # up to MAX_ONCHIP_WIDTH; fp32 "ieee" stops at MAX_ONCHIP_WIDTH_IEEE = 64)
            "BLOCK_N": (16, 32, 64, 0),
            # x row-major / a transposed view (a caller's); factors row-major / transposed views
            # (the weight chain's W_j^T, the activation chain's reverse chain)
            "X_ROWS_CONTIGUOUS": (False, True),
            "FACTORS_TRANSPOSED": (False, True),
            "RETURN_ALL": (True, False),
            "ELEMENT_SIZE": {"fp32": (4,), "fp16": (2,), "bf16": (2,)},
            "INPUT_PRECISION": _CHAIN_PRECISION,
        },
        # The prune reads the widest layer's bucket: streamed output chunks wider than it go.
        sizes={"WIDTH_BUCKET": (16, 32, 64, 128, 256, 512, 1024)},
        skip=lambda dtype, variant: variant["INPUT_PRECISION"] == "ieee" and variant["BLOCK_N"] == 0,
    ),
    "chain_factor_grads": KernelSpec(
        module="fastrank.kernels.chain",
        kernel="_factor_grads_kernel",
        # Sizes and strides multiples of 16 as above; num_splits is the split launch's (an unsplit
        # launch passes 1, which Triton compiles in as a constant).
        args={"grads": ("*{dtype}:16",) * 8, "inputs": ("*{dtype}:16",) * 8, "outputs": ("*{dtype}:16",) * 8,
              "partial_ptr": "*fp32:16", "counter_ptr": "*i32:16",
              "M": "i32:16", "grad_widths": ("i32:16",) * 8, "input_widths": ("i32:16",) * 8,
              "split_rows": "i32:16", "num_splits": "i32",
              "M_BUCKET": "i32:16", "WIDTH_BUCKET": "i32:16",
              "grad_strides": ("i32:16",) * 8, "input_strides": ("i32:16",) * 8,
              "layouts": "i32", "NUM_GROUPS": "i32"},
        dtypes=("fp32", "fp16", "bf16"),
        constexprs={
            # 1: every member row-major (the layers' backward); 7: row-major members plus
            # transposed views (a caller's): three tile loops in one kernel. Other combinations
            # compile the same loops.
            "LAYOUTS": (1, 7),
            "SPLIT_K": (False, True),
            "ELEMENT_SIZE": {"fp32": (4,), "fp16": (2,), "bf16": (2,)},
            "INPUT_PRECISION": _CHAIN_PRECISION,
        },
    ),
    "chain_backward": KernelSpec(
        module="fastrank.kernels.chain",
        kernel="_chain_backward_kernel",
        # The fused backward of a narrow chain: contiguous operands or transposed factors, eight
        # factor slots, widths and M multiples of 16 (a layer of d = 16 .. 64).
        args={"x_ptr": "*{dtype}:16", "grad_ptr": "*{dtype}:16", "factors": ("*{dtype}:16",) * 8,
              "grad_x_ptr": "*{dtype}:16", "grad_factors": ("*{dtype}:16",) * 8, "scratch_ptr": "*{dtype}:16",
              "partial_ptr": "*fp32:16", "counter_ptr": "*i32:16",
              "M": "i32:16", "widths": ("i32:16",) * 9,
              "M_BUCKET": "i32:16", "NUM_FACTORS": "i32"},
        dtypes=("fp32", "fp16", "bf16"),
        constexprs={
            # _resident_block(widths): size_bucket(widest), at most MAX_RESIDENT_WIDTH
            "BLOCK_N": (16, 32, 64),
            "NEEDS_X": (True, False),
            # contiguous factors (activation chains) / transposed views (the weight chain's W_j^T)
            "FACTORS_TRANSPOSED": (False, True),
            "INPUT_PRECISION": _CHAIN_PRECISION,
        },
        # fp32 "ieee" is fused up to MAX_BACKWARD_WIDTH_IEEE = 16 only
        skip=lambda dtype, variant: variant["INPUT_PRECISION"] == "ieee" and variant["BLOCK_N"] > 16,
    ),
    "gaussian_sketch": KernelSpec(
        module="fastrank.kernels.sketch",
        kernel="_sketch_kernel",
        args=_SKETCH_ARGS,
        dtypes=("fp32", "fp16", "bf16", "fp64"),
        constexprs=_SKETCH_CONSTEXPRS,
        skip=_sketch_skip,
    ),
    "gaussian_sketch_gram": KernelSpec(
        module="fastrank.kernels.sketch",
        kernel="_sketch_kernel",
        # The Gram form's first launch for the same X, Z = X^T Omega: X read transposed
        # (stride_am 1), its 1,000,000 rows (16-divisible) split into chunks with fp32 (fp64)
        # partial products.
        args={**_SKETCH_ARGS, "M": "i32:16", "stride_am": "1", "stride_an": "i32:16"},
        dtypes=("fp32", "fp16", "bf16", "fp64"),
        constexprs=_SKETCH_CONSTEXPRS,
        skip=_sketch_skip,
    ),
    "gaussian_sketch_fp16_gram": KernelSpec(
        module="fastrank.kernels.sketch",
        kernel="_sketch_kernel",
        # The Gram form's second launch for fp16 X, Y = X Z: Z stays fp32 (fp16's range), X's
        # tiles are converted to fp32 and the dot takes TF32; tiles sized for 4-byte elements.
        args={**_SKETCH_ARGS, "a_ptr": "*fp16:16", "b_ptr": "*fp32:16", "y_ptr": "*fp32:16"},
        dtypes=("fp16",),
        constexprs={"ACC_FP64": (False,), "INPUT_PRECISION": ("tf32",), "ELEMENT_SIZE": (4,),
                    "BLOCK_K": (32, 64, 128, 256)},
    ),
    "gaussian_omega": KernelSpec(
        module="fastrank.kernels.sketch",
        kernel="_omega_kernel",
        # the (k, n) buffer seen as (n, k): stride_on 1; written in the sketch's operand dtype
        args={"out_ptr": "*{dtype}:16", "N": "i32", "K": "i32", "seed": "i32",
              "stride_on": "1", "stride_ok": "i32"},
        dtypes=("fp32", "fp16", "bf16", "fp64"),
        launch=({"BLOCK_N": 64, "BLOCK_Q": 4}, 4, 3),  # _write_omega; Triton's default warps, stages
    ),
}

# Largest dynamic shared memory one block may opt in to, bytes (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability": 227 KB on 9.0, 163 KB on 8.0, 99 KB on 8.6
# and 8.9).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# A config that does not compile within this many seconds fails the gate: the autotuner compiles
# every config at the first call of each key, so users would wait that long. Measured with
# Triton 3.9 for sm_90 on a 2-core x86 CPU shared with other jobs: the 440 configs that pass the
# gate compile in 0.18-3.2 s (median 0.45 s); spilling ones take up to 30 s and beyond (an fp32
# "ieee" chain config at BLOCK_N 256, timed alone: 52 s). 30 s is ten times the slowest passing one.
DEFAULT_TIMEOUT_S = 30.0

_REPORT_FORMAT = 1  # bump when a row's fields change: old cache entries are then ignored
_ACCUMULATOR = {"fp64": "fp64"}  # "{acc}" for each dtype; fp32 for every other one
_INT_TYPES = {"i1", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"}
_SCALAR_TYPES = _INT_TYPES | {"fp16", "bf16", "fp32", "fp64"}


class TableError(ValueError):
    """:data:`KERNELS` and a kernel disagree."""


# =============================================================================================
# Triton's ahead-of-time API, which changed across 3.2 - 3.9: everything version-dependent is here.
# Run with Triton 3.9 and 3.6 (the GPU machines' version); the 3.2 - 3.4 branches follow those
# versions' triton/tools/compile.py and have not been run.
# =============================================================================================


def aot_unavailable_reason(arch: int = 90) -> str | None:
    """Why this Triton cannot compile ahead of time for ``sm_<arch>`` (None when it can)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return f"Triton's ahead-of-time API is not importable ({error})"
    if not hasattr(triton, "compile"):
        return f"Triton {triton.__version__} has no triton.compile"
    try:
        path = _ptxas_path(arch)
    except Exception as error:  # noqa: BLE001 (any failure to find ptxas means: cannot check here)
        return f"Triton {triton.__version__}: no ptxas for sm_{arch} ({type(error).__name__}: {error})"
    if not path or not os.path.isfile(path):
        return f"Triton {triton.__version__}: ptxas not found (looked for {path!r})"
    return None


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (3.9: two of them, by architecture)."""
    from triton.backends.nvidia import compiler as nvidia

    if hasattr(nvidia, "get_ptxas"):  # 3.5+: ptxas or ptxas-blackwell by architecture
        return nvidia.get_ptxas(arch).path
    try:
        from triton import knobs  # 3.4

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        return nvidia._path_to_binary("ptxas")[0]  # 3.2, 3.3


def _parse_signature(text: str) -> tuple[str, bool]:
    """``"*fp16:16"`` -> ``("*fp16", True)``: the type and whether it is divisible by 16."""
    kind, _, hint = text.partition(":")
    return kind, hint == "16"


def aot_compile(fn, args: dict[str, str | tuple[str, ...]], constexprs: dict, arch: int, options: dict):
    """``triton.compile`` of ``fn`` for ``sm_<arch>``; returns ``(compiled, ptxas_log)``.

    Args:
        fn: the ``triton.runtime.JITFunction``.
        args: runtime argument -> signature string (``"*fp16:16"``, ``"i32"``, ``"1"``), or a tuple
            of them (not ``"1"``) for a tuple argument.
        constexprs: constexpr name -> value.
        options: ``num_warps``, ``num_stages`` and the config's other compile options.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, aligned = {}, dict(constexprs), []  # aligned: paths, (index,) or (index, entry)
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(args[name], tuple):
            kinds = []
            for entry, text in enumerate(args[name]):
                kind, divisible = _parse_signature(text)
                kinds.append(kind)
                if divisible:
                    aligned.append((index, entry))
            signature[name] = tuple(kinds)
        elif args[name] == "1":
            signature[name] = "constexpr"  # what Triton's launcher does with an int equal to 1
            constants[name] = 1
        else:
            signature[name], divisible = _parse_signature(args[name])
            if divisible:
                aligned.append((index,))
    parameters = inspect.signature(ASTSource.__init__).parameters
    constants_keyword = "constexprs" if "constexprs" in parameters else "constants"  # 3.2: constants
    attrs_descriptor = getattr(importlib.import_module("triton.backends.compiler"), "AttrsDescriptor", None)
    if attrs_descriptor is not None:  # 3.2: a descriptor object, and no tuple arguments
        if any(len(path) > 1 for path in aligned):
            raise TableError(f"Triton {triton.__version__} has no tuple arguments")
        from_hints = getattr(attrs_descriptor, "from_hints", None)
        attrs = from_hints({path[0]: 16 for path in aligned}) if from_hints else None
    else:  # 3.3+: {(argument index[, tuple entry]): [[attribute, value]]}
        attrs = {path: [["tt.divisibility", 16]] for path in aligned}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs, **{constants_keyword: constants})
    target = GPUTarget("cuda", arch, 32)

    knobs = getattr(triton, "knobs", None)
    nvidia_knobs = getattr(knobs, "nvidia", None)
    can_dump = nvidia_knobs is not None and hasattr(nvidia_knobs, "dump_ptxas_log")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if can_dump:  # 3.4+: Triton prints ptxas -v's report
            nvidia_knobs.dump_ptxas_log = True
        compiled = triton.compile(source, target=target, options=options)
    ptxas_log = log.getvalue()
    if "registers" not in ptxas_log:  # older Triton, or Triton's own cache answered: run ptxas -v
        ptxas_log = _run_ptxas(compiled.asm["ptx"], arch)
    return compiled, ptxas_log


def _run_ptxas(ptx: str, arch: int) -> str:
    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton compiles sm_90 as sm_90a
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [_ptxas_path(arch), "-v", f"--gpu-name={name}", source, "-o", os.path.join(folder, "kernel.o")],
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ptxas -v failed with exit code {result.returncode}: {result.stderr.strip()}")
    return result.stderr


def shared_memory(compiled) -> int:
    """Dynamic shared memory of a compiled kernel, bytes (``metadata.shared`` in 3.2 - 3.9)."""
    metadata = compiled.metadata
    return int(metadata.shared if hasattr(metadata, "shared") else metadata["shared"])


# =============================================================================================
# Reading the compiled kernel
# =============================================================================================


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes and stack frame from ``ptxas -v`` output."""

    def number(pattern: str) -> int | None:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else None

    registers = number(r"Used (\d+) registers")
    if registers is None:
        raise RuntimeError(f"no register count in the ptxas report:\n{log.strip()[-800:]}")
    return {
        "regs": registers,
        "spill_stores": number(r"(\d+) bytes spill stores") or 0,
        "spill_loads": number(r"(\d+) bytes spill loads") or 0,
        "stack": number(r"(\d+) bytes stack frame") or 0,
    }


_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*)")


def count_instructions(ptx: str) -> dict:
    """Tensor-core instructions and global loads in the PTX text."""
    vector = {"v2": 0, "v4": 0, "v8": 0}
    scalar = 0
    for match in _LD_GLOBAL.finditer(ptx):
        width = next((part for part in match.group(1).split(".") if part in vector), None)
        if width is None:
            scalar += 1
        else:
            vector[width] += 1
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "mma": len(re.findall(r"\bmma\.sync\b", ptx)),
        "ld_v8": vector["v8"],
        "ld_v4": vector["v4"],
        "ld_v2": vector["v2"],
        "ld_scalar": scalar,
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared\.global\b", ptx)),
    }


# =============================================================================================
# Tasks: one per (kernel, arch, dtype, launcher constexprs, selectable config)
# =============================================================================================


@dataclass
class Task:
    kernel: str  # the KERNELS key
    arch: int
    dtype: str
    variant: dict  # launcher constexprs
    config: dict  # autotuned constexprs
    options: dict  # num_warps, num_stages, ...
    args: dict[str, str | tuple[str, ...]] = field(repr=False)
    fn: object = field(repr=False)
    key: str = ""

    def label(self) -> tuple[str, str]:
        variant = " ".join(f"{k}={_short(v)}" for k, v in self.variant.items())
        config = " ".join(f"{k}={_short(v)}" for k, v in self.config.items())
        options = " ".join(f"{k}={v}" for k, v in self.options.items())
        return variant, f"{config} {options}".strip()


def _short(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _jit_function(obj, name: str):
    """The JITFunction under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    fn = obj
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TableError(
                f"kernel {name}: {type(obj).__name__} is not a Triton JIT function; under "
                "TRITON_INTERPRET=1 kernels are built for the interpreter and cannot be compiled"
            )
        fn = fn.fn
    return fn


def _load_module(module_name: str):
    module = importlib.import_module(module_name)
    if getattr(module, "BUILT_FOR_INTERPRETER", False):  # imported earlier under TRITON_INTERPRET=1
        module = importlib.reload(module)
    return module


def _values_for(name: str, values, dtype: str, kernel: str) -> tuple:
    if isinstance(values, dict):
        if dtype not in values:
            raise TableError(f"kernel {kernel}: constexpr {name!r} has no values for dtype {dtype!r}")
        values = values[dtype]
    return tuple(values)


def check_table(name: str, spec: KernelSpec, fn, configs: Sequence) -> None:
    """Raise :class:`TableError` naming the kernel and argument where ``spec`` and ``fn`` disagree."""
    where = f"kernel {name} ({spec.module}.{spec.kernel})"
    params = list(fn.params)
    runtime = [p.name for p in params if not p.is_constexpr]
    table = list(spec.args)
    for position, arg in enumerate(runtime):
        if arg not in spec.args:
            raise TableError(f"{where}: runtime argument {arg!r} (position {position}) is missing from KERNELS")
    for arg in table:
        if arg not in runtime:
            what = "a constexpr" if arg in fn.arg_names else "not an argument"
            raise TableError(f"{where}: KERNELS lists runtime argument {arg!r}, which is {what} of the kernel")
    if table != runtime:
        raise TableError(f"{where}: runtime arguments in KERNELS are in the order {table}, the kernel's are {runtime}")
    for arg, signature in spec.args.items():
        in_tuple = isinstance(signature, tuple)
        for text in signature if in_tuple else (signature,):
            kind, _ = _parse_signature(text)
            base = kind[1:] if kind.startswith("*") else kind
            base = base.replace("{dtype}", "fp32").replace("{acc}", "fp32")
            if (text == "1" and in_tuple) or (text != "1" and base not in _SCALAR_TYPES):
                raise TableError(
                    f"{where}: argument {arg!r} has signature {signature!r}; expected e.g. '*fp16:16', "
                    "'i32', 'i32:16' or '1', or a tuple of them (but '1') for a tuple argument"
                )
    constexpr_params = [p for p in params if p.is_constexpr]
    constexpr_names = {p.name for p in constexpr_params}
    config_keys = set()
    for config in configs:
        config_keys |= set(config.kwargs)
    launch_keys = set(spec.launch[0]) if spec.launch else set()
    for arg in list(spec.constexprs) + sorted(config_keys | launch_keys):
        if arg not in constexpr_names:
            what = "a runtime argument" if arg in fn.arg_names else "not an argument"
            raise TableError(f"{where}: {arg!r} is set as a constexpr but is {what} of the kernel")
    for p in constexpr_params:
        given = p.name in spec.constexprs or p.name in launch_keys
        in_every_config = bool(configs) and all(p.name in c.kwargs for c in configs)
        has_default = p.default is not inspect.Parameter.empty
        if not (given or in_every_config or has_default):
            raise TableError(
                f"{where}: constexpr {p.name!r} is set neither by KERNELS (constexprs / launch) "
                "nor by every autotune config"
            )
    if not configs and spec.launch is None:
        raise TableError(f"{where}: not autotuned, so KERNELS must give its launch meta-parameters")


def build_tasks(kernels: dict[str, KernelSpec], archs: Sequence[int]) -> list[Task]:
    from triton.runtime.autotuner import Autotuner

    tasks = []
    for name, spec in kernels.items():
        obj = getattr(_load_module(spec.module), spec.kernel, None)
        if obj is None:
            raise TableError(f"kernel {name}: {spec.module} has no attribute {spec.kernel!r}")
        fn = _jit_function(obj, name)
        autotuner = obj if isinstance(obj, Autotuner) else None
        configs = list(autotuner.configs) if autotuner is not None else []
        check_table(name, spec, fn, configs)
        prune = getattr(autotuner, "early_config_prune", None)
        for dtype in spec.dtypes:
            accumulator = _ACCUMULATOR.get(dtype, "fp32")

            def typed(text: str) -> str:
                return text.replace("{dtype}", dtype).replace("{acc}", accumulator)

            args = {k: tuple(map(typed, v)) if isinstance(v, tuple) else typed(v) for k, v in spec.args.items()}
            names = list(spec.constexprs)
            value_lists = [_values_for(n, spec.constexprs[n], dtype, name) for n in names]
            for values in itertools.product(*value_lists):
                variant = dict(zip(names, values))
                if spec.skip is not None and spec.skip(dtype, variant):
                    continue
                for meta, options in _selectable(name, spec, configs, prune, variant):
                    for arch in archs:
                        tasks.append(Task(name, arch, dtype, variant, meta, options, args, fn))
    for task in tasks:
        task.key = _cache_key(task)
    return tasks


def _selectable(name, spec, configs, prune, variant) -> list[tuple[dict, dict]]:
    """(constexprs, options) of every config the autotuner can pick for ``variant``."""
    if not configs:
        meta, warps, stages = spec.launch
        return [(dict(meta), {"num_warps": warps, "num_stages": stages})]
    chosen = []
    size_names = list(spec.sizes)
    for sizes in itertools.product(*(spec.sizes[n] for n in size_names)):
        named_args = dict(zip(size_names, sizes))
        if prune is None:
            pruned = configs
        else:
            try:
                pruned = prune(configs, named_args, **variant)
            except KeyError as error:
                raise TableError(
                    f"kernel {name}: its early_config_prune reads argument {error.args[0]!r}; "
                    "give representative values for it in KERNELS[...].sizes (or constexprs)"
                ) from None
        for config in pruned:
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            for option in ("num_ctas", "maxnreg"):
                value = getattr(config, option, None)
                if value is not None and not (option == "num_ctas" and value == 1):
                    options[option] = value
            entry = (dict(config.kwargs), options)
            if entry not in chosen:
                chosen.append(entry)
    return chosen


def _cache_key(task: Task) -> str:
    import triton

    text = json.dumps(
        [_REPORT_FORMAT, triton.__version__, task.fn.cache_key, task.arch, task.args, task.variant,
         task.config, task.options],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


# =============================================================================================
# Compiling: one forked process per task, so that an overrunning compile can be killed
# =============================================================================================


def compile_task(task: Task) -> dict:
    """Compile one task and read its resources; a failure to compile becomes a row too."""
    row = {"compile_s": None, "error": None}
    start = time.perf_counter()
    try:
        compiled, log = aot_compile(task.fn, task.args, {**task.variant, **task.config}, task.arch, task.options)
        row.update(parse_ptxas_log(log))
        row["shared"] = shared_memory(compiled)
        row.update(count_instructions(compiled.asm["ptx"]))
    except Exception as error:  # noqa: BLE001 (a config that does not compile is a gate failure)
        text = f"{type(error).__name__}: {error}".strip()
        row["error"] = text.splitlines()[0][:300] if text else type(error).__name__
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def _child(task: Task, connection, cache_dir: str) -> None:
    import warnings

    # Triton 3.9 warns once per process that its fp-fusion default will change: once per compile here.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        from triton import knobs

        knobs.cache.dir = cache_dir
    except (ImportError, AttributeError):
        pass
    try:
        row = compile_task(task)
    except BaseException as error:  # noqa: BLE001 (report, never hang the parent)
        row = {"error": f"{type(error).__name__}: {error}", "compile_s": None}
    connection.send(row)
    connection.close()
    os._exit(0)  # skip the parent's atexit handlers inherited through fork


def _warm_up(arch: int, cache_dir: str) -> None:
    """Compile a one-line kernel here, before forking: every forked compile then starts with
    Triton's compiler loaded and initialized, which saved 0.5 s of each one (0.7 s -> 0.2 s for
    a small kernel, Triton 3.9, 2-core x86 CPU). Triton disables its thread pool after each
    compile, so forking after it is safe."""
    import triton
    import triton.language as tl

    os.environ["TRITON_CACHE_DIR"] = cache_dir

    @triton.jit
    def _warm_up_kernel(pointer):
        tl.store(pointer, tl.load(pointer) + 1)

    with contextlib.suppress(Exception):
        aot_compile(_warm_up_kernel, {"pointer": "*fp32:16"}, {}, arch, {"num_warps": 1, "num_stages": 1})


def run_tasks(
    tasks: Sequence[Task],
    workers: int,
    timeout: float | None,
    on_result: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Compile ``tasks``, at most ``workers`` at a time; rows in the order of ``tasks``.

    ``on_result(index, row)`` is called as each compile finishes (an interrupted run keeps those).
    """
    import multiprocessing
    from multiprocessing.connection import wait

    results: list[dict | None] = [None] * len(tasks)
    if not tasks:
        return []
    context = multiprocessing.get_context("fork")
    pending = list(range(len(tasks)))
    running = {}  # connection -> (process, index, start)
    # Triton's own cache would answer repeated compiles without running ptxas (no register report)
    # and keeps every artifact: compile into a scratch folder instead.
    with tempfile.TemporaryDirectory(prefix="fastrank-kernel-report-") as scratch:
        _warm_up(tasks[0].arch, scratch)
        try:
            while pending or running:
                while pending and len(running) < workers:
                    index = pending.pop(0)
                    receiver, sender = context.Pipe(duplex=False)
                    process = context.Process(target=_child, args=(tasks[index], sender, scratch), daemon=True)
                    process.start()
                    sender.close()
                    running[receiver] = (process, index, time.monotonic())
                for receiver in wait(list(running), timeout=0.5):
                    process, index, _ = running.pop(receiver)
                    try:
                        results[index] = receiver.recv()
                    except EOFError:
                        process.join()
                        results[index] = {"error": f"compiler process died (exit code {process.exitcode})",
                                          "compile_s": None}
                    receiver.close()
                    process.join()
                    if on_result:
                        on_result(index, results[index])
                now = time.monotonic()
                for receiver, (process, index, start) in list(running.items()):
                    if timeout and now - start > timeout:
                        process.kill()
                        process.join()
                        receiver.close()
                        running.pop(receiver)
                        results[index] = {"error": None, "timeout_s": timeout, "compile_s": round(now - start, 1)}
                        if on_result:
                            on_result(index, results[index])
        finally:
            for receiver, (process, _, _) in running.items():
                process.kill()
                process.join()
    return results


# =============================================================================================
# The gate
# =============================================================================================


def judge(row: dict, arch: int) -> list[str]:
    """Why a row fails the gate (empty: it passes)."""
    if row.get("timeout_s"):
        return [f"compile exceeded {row['timeout_s']:g} s"]
    if row.get("error"):
        return [f"does not compile: {row['error']}"]
    reasons = []
    if row["spill_stores"] or row["spill_loads"]:
        reasons.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is not None and row["shared"] > limit:
        reasons.append(f"shared memory {row['shared']} B > {limit} B (sm_{arch})")
    return reasons


def make_rows(tasks: Sequence[Task], results: Sequence[dict]) -> list[dict]:
    rows = []
    for task, result in zip(tasks, results):
        variant, config = task.label()
        row = {"kernel": task.kernel, "arch": task.arch, "dtype": task.dtype, "variant": variant,
               "config": config, **result}
        row["failures"] = judge(row, task.arch)
        row["status"] = "FAIL" if row["failures"] else "pass"
        rows.append(row)
    return rows


_COLUMNS = [
    ("kernel", "kernel"), ("sm", "arch"), ("dtype", "dtype"), ("variant", "variant"), ("config", "config"),
    ("regs", "regs"), ("spill st/ld B", "spill"), ("stack B", "stack"), ("smem B", "shared"),
    ("wgmma", "wgmma"), ("mma", "mma"), ("ld v4/v2/s", "loads"), ("cp.async", "cp_async"),
    ("compile s", "compile_s"), ("status", "status"),
]


def _cell(row: dict, key: str) -> str:
    if key == "spill":
        return "-" if "spill_stores" not in row else f"{row['spill_stores']}/{row['spill_loads']}"
    if key == "loads":
        if "ld_v4" not in row:
            return "-"
        v4 = row["ld_v4"] + row["ld_v8"]  # v8 only for 16-bit elements: still 16 bytes
        return f"{v4}/{row['ld_v2']}/{row['ld_scalar']}"
    if key == "status":
        return row["status"] + (f" ({'; '.join(row['failures'])})" if row["failures"] else "")
    value = row.get(key)
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict]) -> str:
    cells = [[_cell(row, key) for _, key in _COLUMNS] for row in rows]
    headers = [title for title, _ in _COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers[:-1])]

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values[:-1], widths)) + "  " + values[-1]

    return "\n".join([line(headers), "-" * (sum(widths) + 2 * len(widths) + 6)] + [line(c) for c in cells])


def format_groups(rows: Sequence[dict], ignore: Sequence[str] = ()) -> str:
    """One line per (kernel, arch, dtype, variant) with ``ignore``'s constexprs merged: how many
    configs fail, the ranges of registers, spill stores and shared memory, and how many compiled
    configs use each kind of instruction: ``wgmma`` (Hopper's asynchronous tensor cores),
    ``mma.sync`` only, neither (FMA), any vectorized global load (v2 or wider), ``cp.async``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        variant = " ".join(p for p in row["variant"].split() if p.split("=")[0] not in ignore)
        groups.setdefault((row["kernel"], row["arch"], row["dtype"], variant), []).append(row)
    headers = ["kernel", "sm", "dtype", "variant", "configs", "fail", "spill", "smem>", "slow", "regs",
               "max spill st B", "max smem B", "wgmma", "mma.sync", "FMA", "vec ld", "cp.async"]
    lines = []
    for (kernel, arch, dtype, variant), members in groups.items():
        compiled = [r for r in members if "regs" in r]
        failures = [f for r in members for f in r["failures"]]
        lines.append([
            kernel, str(arch), dtype, variant or "-", str(len(members)),
            str(sum(1 for r in members if r["failures"])),
            str(sum(f.startswith("spills") for f in failures)),
            str(sum(f.startswith("shared memory") for f in failures)),
            str(sum(f.startswith("compile exceeded") for f in failures)),
            f"{min(r['regs'] for r in compiled)}-{max(r['regs'] for r in compiled)}" if compiled else "-",
            str(max(r["spill_stores"] for r in compiled)) if compiled else "-",
            str(max(r["shared"] for r in compiled)) if compiled else "-",
            str(sum(r.get("wgmma", 0) > 0 for r in compiled)),
            str(sum(r.get("wgmma", 0) == 0 and r.get("mma", 0) > 0 for r in compiled)),
            str(sum(r.get("wgmma", 0) == 0 and r.get("mma", 0) == 0 for r in compiled)),
            str(sum(r.get("ld_v8", 0) + r.get("ld_v4", 0) + r.get("ld_v2", 0) > 0 for r in compiled)),
            str(sum(r.get("cp_async", 0) > 0 for r in compiled)),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key[:2], f"{key}.json")


def run_report(
    kernels: dict[str, KernelSpec],
    archs: Sequence[int],
    workers: int,
    timeout: float | None,
    cache_dir: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Rows of every task of ``kernels`` for ``archs`` (cached rows are reused, new ones stored)."""
    tasks = build_tasks(kernels, archs)
    results: list[dict | None] = [None] * len(tasks)
    if cache_dir:
        for i, task in enumerate(tasks):
            path = _cache_path(cache_dir, task.key)
            if os.path.exists(path):
                with open(path) as f:
                    cached = json.load(f)
                # A compile that ran past a limit at least as long as this one's counts again;
                # one cut off at a shorter limit is retried.
                if not cached.get("timeout_s") or (timeout and cached["timeout_s"] >= timeout):
                    results[i] = {**cached, "cached": True}
    todo = [i for i, result in enumerate(results) if result is None]
    finished = 0

    def on_result(position: int, result: dict) -> None:
        nonlocal finished
        finished += 1
        if progress:
            progress(finished, len(todo))
        if cache_dir:
            path = _cache_path(cache_dir, tasks[todo[position]].key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)

    fresh = run_tasks([tasks[i] for i in todo], workers, timeout, on_result)
    for i, result in zip(todo, fresh):
        results[i] = result
    return make_rows(tasks, results)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastrank", "kernel-report")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None, kernels: dict[str, KernelSpec] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastrank.kernels.report",
        description="Compile every Triton kernel of fastrank ahead of time at every selectable "
        "autotune config and dtype; fail on compile errors, spills or too much shared memory.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (default: 90)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--kernel", nargs="+", metavar="NAME", help="only these KERNELS entries")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds one compile may take before it fails the gate (default {DEFAULT_TIMEOUT_S:g}; 0: none)")
    parser.add_argument("--cache-dir", default=_default_cache_dir(), help="where finished rows are kept")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything, store nothing")
    parser.add_argument("--failures-only", action="store_true", help="print only the failing rows")
    parser.add_argument("--group", nargs="*", metavar="CONSTEXPR",
                        help="print one line per kernel, dtype and launcher constexprs (merging the "
                        "constexprs named here) instead of one per config")
    args = parser.parse_args(argv)
    kernels = KERNELS if kernels is None else kernels
    if args.kernel:
        unknown = [k for k in args.kernel if k not in kernels]
        if unknown:
            parser.error(f"unknown kernel(s) {unknown}; KERNELS has {sorted(kernels)}")
        kernels = {k: kernels[k] for k in args.kernel}

    # The kernels must be built for the compiler, not the interpreter (the test suite sets
    # TRITON_INTERPRET=1 on machines without a GPU; Triton reads it when a kernel is decorated).
    os.environ["TRITON_INTERPRET"] = "0"
    for arch in args.arch:
        reason = aot_unavailable_reason(arch)
        if reason is not None:
            print(f"kernel report skipped: {reason}", file=sys.stderr)
            return 0
    signal.signal(signal.SIGTERM, _terminate)
    start = time.perf_counter()

    def progress(done, total):
        if sys.stderr.isatty() or done == total or done % 50 == 0:
            print(f"\rcompiled {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    try:
        rows = run_report(kernels, args.arch, max(1, args.workers), args.timeout or None,
                          None if args.no_cache else args.cache_dir, progress)
    except TableError as error:
        print(f"KERNELS table error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    failing = [row for row in rows if row["failures"]]
    if args.group is not None:
        print(format_groups(rows, args.group))
    else:
        print(format_table(failing if args.failures_only else rows))
    cached = sum(1 for row in rows if row.get("cached"))
    print(
        f"\n{len(rows)} compiles ({cached} from the cache) for sm_{', sm_'.join(map(str, args.arch))} "
        f"in {elapsed:.1f} s with {args.workers} workers: {len(rows) - len(failing)} pass, {len(failing)} fail"
    )
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": args.arch, "seconds": round(elapsed, 1),
                       "rows": rows}, f, indent=1)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
