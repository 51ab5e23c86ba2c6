"""Launch plans against Triton's own binder and launcher, with the CUDA driver stubbed
(benchmarks/stubbed_cuda.py). Run in a process of its own by tests/test_launch_fast_path.py:

    python tests/launch_plans_stubbed.py keys [--mutation NAME] [--draws N]
    python tests/launch_plans_stubbed.py replay
    python tests/launch_plans_stubbed.py layers

``keys``: draws many argument sets for each planned launcher (chain_matmul, chain_factor_grads,
chain_matmul_backward, gaussian_sketch): sizes 1 / 15 / 16 / 17 / 33 and a 2**31 row count or
stride, fp16 / bf16 / fp32, contiguous, transposed and sliced operands, views at element offsets
that leave a pointer misaligned, operands the launchers pack (strided in both dimensions, or
broadcast with stride 0, as below a ``.sum()``), and torch's fp32 matmul precision (TF32 or IEEE,
which the kernels follow; a third of the calls are made under both). For each call it records the plan keys the launchers computed and
what Triton's binder computed for every launch (specialization of each argument, options,
constexprs, grid, every integer argument). Two calls with equal keys must have equal bindings: a
replay of one's plan for the other would otherwise run a kernel specialized for other arguments.
``--mutation`` drops one component from every key (alignment, strides, shapes, dtypes, flags), as
a check that the collision search can see each. Prints JSON: draws, distinct keys, distinct
bindings, collisions.

``replay``: real compiles for sm_90; each launcher called on a set of shapes and layouts four
times with the same inputs, the first two through the JIT (the second recording the key's plan),
the third replayed by its key (keeping the plan under a guard of its tensors), the fourth found by
that guard (a call of one tensor by its key again). Every argument Triton's launcher received is compared, pointers by what they point into (input i,
output j, or the call's n-th temporary, with the byte offset), and so are the outputs' layouts.
Operands the launchers pack are packed again by the replay. A call passing one tensor at two
positions is not recorded: a later call with other tensors there replays nothing of it. Prints
JSON: cases, mismatches.

``layers``: bf16 OverparamLinear train steps routed through the kernels as on CUDA; after two
warm-up steps, the JIT calls, kernel launches and gradient copies per step, then the JIT calls and
launches of one step as a CUDA graph's capture sees it (a stream without split counters,
capturing); and the JIT calls per step of steps whose loss is ``.sum()`` (a stride-0 gradient).
Prints JSON: rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stubbed_cuda  # noqa: E402

MUTATIONS = ("alignment", "strides", "shapes", "dtypes", "flags")
PRECISIONS = ("tf32", "ieee")  # torch's fp32 CUDA matmul precision, which the kernels follow
# Integer arguments a replay reads per call (do_not_specialize: their specialization is compared,
# their values are not): the Omega seed.
PER_CALL = ("seed",)


def _mutated(call_key, mutation):
    """``call_key`` with one component of its key dropped."""
    def mutated_call_key(tensors, flags):
        (key_flags, metadata, aligned), pointers = call_key(tensors, flags)
        if mutation == "alignment":
            aligned = ()
        elif mutation == "flags":
            key_flags = ()
        else:
            drop = {"shapes": 0, "strides": 1, "dtypes": 2}[mutation]
            metadata = tuple(tuple(part for index, part in enumerate(entry) if index != drop) for entry in metadata)
        return (key_flags, metadata, aligned), pointers
    return mutated_call_key


def _operand(torch, rows, cols, dtype, layout, generator):
    """A (rows, cols) operand in ``layout``: contiguous, transposed (column-major view), sliced
    (row stride past cols), offset1 / offset8 (a view starting 1 or 8 elements into its storage),
    strided (every other row and column: no unit stride), broadcast (one value, both strides 0),
    or stride31 (one row with a row stride of 2**31)."""
    def fresh(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    if layout == "contiguous":
        return fresh(rows, cols)
    if layout == "transposed":
        return fresh(cols, rows).T
    if layout == "sliced":
        return fresh(rows, cols + 16)[:, 3 : 3 + cols]
    if layout in ("offset1", "offset8"):
        skip = int(layout[6:])
        return fresh(rows * cols + skip)[skip:].view(rows, cols)
    if layout == "strided":
        return fresh(rows * 2, cols * 2)[::2, ::2]
    if layout == "broadcast":
        return fresh(1)[0].expand(rows, cols)
    if layout == "stride31":
        return fresh(cols).as_strided((1, cols), (2**31, 1))
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed", "sliced", "offset1", "offset8", "strided", "broadcast")
SIZES = (1, 15, 16, 17, 33)


def _under_precision(torch, precision: str, call):
    """``call()`` with torch's fp32 CUDA matmul precision set to ``precision`` ("tf32" or "ieee",
    which the kernels follow)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        return call()
    finally:
        matmul.fp32_precision = before


def _draw(torch, rng, generator):
    """One launcher call: (name, function of no arguments)."""
    from fastrank.kernels import chain, sketch

    dtype = rng.choice((torch.float16, torch.bfloat16, torch.float32))
    kind = rng.choice(("chain", "factor_grads", "backward", "sketch"))
    layout = lambda: rng.choice(LAYOUTS)  # noqa: E731
    if kind == "chain":
        k = rng.choice((1, 2, 3, 9))
        widths = [rng.choice(SIZES) for _ in range(k + 1)]
        rows = rng.choice(SIZES)
        x_layout = rng.choice(LAYOUTS + ("stride31",)) if rows == 1 else layout()
        x = _operand(torch, rows, widths[0], dtype, x_layout, generator)
        factor_layout = layout()
        factors = [_operand(torch, widths[j + 1], widths[j], dtype, factor_layout, generator) for j in range(k)]
        return_all = rng.random() < 0.5
        return kind, lambda: chain.chain_matmul(x, factors, return_all)
    if kind == "factor_grads":
        pairs = rng.choice((1, 2, 4))
        huge = rng.random() < 0.15
        rows = 2**31 if huge else rng.choice(SIZES + (600,))
        def pair_operand(cols):
            if huge:  # 2**31 rows of one repeated row: no storage behind them
                return torch.randn(1, cols, generator=generator).to(dtype).expand(rows, cols)
            return _operand(torch, rows, cols, dtype, layout(), generator)
        grads = [pair_operand(rng.choice(SIZES)) for _ in range(pairs)]
        inputs = [pair_operand(rng.choice(SIZES)) for _ in range(pairs)]
        split_k = rng.choice((None, None, 2))
        return kind, lambda: chain.chain_factor_grads(grads, inputs, split_k)
    if kind == "backward":
        k = rng.choice((1, 2, 4))
        widths = [rng.choice((1, 15, 16, 17, 33, 64)) for _ in range(k + 1)]
        rows = rng.choice(SIZES)
        x = _operand(torch, rows, widths[0], dtype, layout(), generator)
        factors = [_operand(torch, widths[j + 1], widths[j], dtype, "contiguous", generator) for j in range(k)]
        grad = _operand(torch, rows, widths[-1], dtype, layout(), generator)
        needs_x = rng.random() < 0.5
        return kind, lambda: chain.chain_matmul_backward(x, factors, grad, needs_x)
    rows, cols = rng.choice((15, 16, 17, 33, 100)), rng.choice((15, 16, 17, 33, 100))
    a = _operand(torch, rows, cols, dtype, layout(), generator)
    if rng.random() < 0.3:
        a = torch.stack([a, a.clone()])  # a batch of two
    k = rng.choice((1, 15, 16, 17))
    seed = rng.choice((0, 1, 16, 12345))
    gram = rng.random() < 0.5
    return kind, lambda: sketch.gaussian_sketch(a, k, seed, gram)


def keys(mutation: str | None, draws: int) -> dict:
    stubbed_cuda.activate(compile=False)
    import torch

    from fastrank.kernels import _launch, chain, sketch

    if mutation is not None:  # the launchers' keys come from PlanCache.replay, which reads this name
        _launch.call_key = _mutated(_launch.call_key, mutation)
    seen_keys: list = []
    original_recorder = _launch.PlanCache.recorder

    def recorder(self, key, inputs, scalars=0):
        seen_keys.append((id(self), key))
        return original_recorder(self, key, inputs, scalars)

    _launch.PlanCache.recorder = recorder
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    bindings_by_key: dict = {}
    collisions, distinct_bindings = [], set()
    for draw in range(draws):
        kind, call = _draw(torch, rng, generator)
        # torch's fp32 matmul precision, drawn; a third of the calls run again under the other one
        precisions = [rng.choice(PRECISIONS)]
        if rng.random() < 1 / 3:
            precisions.append(next(p for p in PRECISIONS if p != precisions[0]))
        for precision in precisions:
            seen_keys.clear()
            stubbed_cuda.BINDINGS.clear()
            _under_precision(torch, precision, call)
            if not stubbed_cuda.BINDINGS:
                break  # a torch path (a width beyond the kernels, a single row of fp32 ...)
            key = (kind, tuple(seen_keys))
            binding = tuple(
                (b["kernel"], b["specialization"], b["options"], b["grid"],
                 tuple(sorted((name, value) for name, value in b["values"].items()
                              if not _is_pointer(value) and name not in PER_CALL)))
                for b in stubbed_cuda.BINDINGS
            )
            distinct_bindings.add(binding)
            previous = bindings_by_key.setdefault(key, ((draw, precision), binding))
            if previous[1] != binding:
                collisions.append({"kind": kind, "draws": [previous[0], (draw, precision)]})
    return {"mutation": mutation, "draws": draws, "keys": len(bindings_by_key),
            "bindings": len(distinct_bindings), "collisions": collisions[:20], "collision_count": len(collisions),
            "triton": stubbed_cuda._ACTIVE["triton"]}


def _is_pointer(value) -> bool:
    if isinstance(value, tuple) and value and value[0] == "ptr":
        return True
    return isinstance(value, tuple) and any(_is_pointer(entry) for entry in value)


def replay() -> dict:
    stubbed_cuda.activate(compile=True)
    import torch

    from fastrank.kernels import _launch, chain, sketch

    replays = [0]
    guarded = [0]  # replays a guard found (their key was not built)
    original_replay = _launch.PlanCache.replay

    def counted_replay(self, tensors, flags, index, scalars=()):
        outputs, key = original_replay(self, tensors, flags, index, scalars)
        replays[0] += outputs is not None
        guarded[0] += outputs is not None and key is None
        return outputs, key

    _launch.PlanCache.replay = counted_replay
    generator = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for layout in ("contiguous", "transposed", "offset1", "strided", "broadcast"):
            x = _operand(torch, 17, 32, dtype, layout, generator)
            factors = [_operand(torch, 16, 32, dtype, layout, generator), _operand(torch, 33, 16, dtype, layout, generator)]
            cases.append((f"chain_matmul {dtype} {layout}", (x, *factors), lambda x=x, f=factors: chain.chain_matmul(x, f)))
            cases.append((f"chain_matmul last {dtype} {layout}", (x, *factors),
                          lambda x=x, f=factors: chain.chain_matmul(x, f, return_all=False)))
            grads = [_operand(torch, 600, 16, dtype, layout, generator), _operand(torch, 600, 33, dtype, layout, generator)]
            inputs = [_operand(torch, 600, 32, dtype, layout, generator), _operand(torch, 600, 16, dtype, layout, generator)]
            cases.append((f"chain_factor_grads {dtype} {layout}", (*grads, *inputs),
                          lambda g=grads, i=inputs: chain.chain_factor_grads(g, i)))
            cases.append((f"chain_factor_grads split {dtype} {layout}", (*grads, *inputs),
                          lambda g=grads, i=inputs: chain.chain_factor_grads(g, i, split_k=3)))
            if layout in ("strided", "broadcast"):  # the fused backward packs x and the gradient
                xb, grad = _operand(torch, 17, 16, dtype, layout, generator), _operand(torch, 17, 16, dtype, layout, generator)
                narrow = [_operand(torch, 16, 16, dtype, "contiguous", generator) for _ in range(3)]
                cases.append((f"chain_matmul_backward {dtype} {layout}", (xb, *narrow, grad),
                              lambda x=xb, f=narrow, g=grad: chain.chain_matmul_backward(x, f, g)))
            if layout == "contiguous":
                grad = _operand(torch, 17, 16, dtype, "contiguous", generator)
                narrow = [_operand(torch, 16, 16, dtype, "contiguous", generator) for _ in range(3)]
                xb = _operand(torch, 17, 16, dtype, "contiguous", generator)
                # the weight chain's factors: transposed views of contiguous ones, read as they are,
                # their gradients returned in their layout
                flipped = [_operand(torch, 16, 16, dtype, "transposed", generator) for _ in range(3)]
                for needs_x in (True, False):
                    cases.append((f"chain_matmul_backward {dtype} needs_x={needs_x}", (xb, *narrow, grad),
                                  lambda x=xb, f=narrow, g=grad, n=needs_x: chain.chain_matmul_backward(x, f, g, n)))
                    cases.append((f"chain_matmul_backward transposed {dtype} needs_x={needs_x}", (xb, *flipped, grad),
                                  lambda x=xb, f=flipped, g=grad, n=needs_x: chain.chain_matmul_backward(x, f, g, n)))
            a = _operand(torch, 33, 100, dtype, layout, generator)
            cases.append((f"gaussian_sketch {dtype} {layout}", (a,), lambda a=a: sketch.gaussian_sketch(a, 17, 5)))
            cases.append((f"gaussian_sketch gram {dtype} {layout}", (a,), lambda a=a: sketch.gaussian_sketch(a, 17, 6, gram=True)))
            # a batch whose two batch dimensions cannot be merged: reshape packs it
            batch = _operand(torch, 33 * 6, 100, dtype, layout, generator).reshape(2, 3, 33, 100).transpose(0, 1)
            cases.append((f"gaussian_sketch batch {dtype} {layout}", (batch,), lambda b=batch: sketch.gaussian_sketch(b, 17, 7)))
    mismatches, replayed = [], 0
    for name, inputs, call in cases:
        runs, jit = [], []
        guarded[0] = 0
        for _ in range(4):  # the JIT; the JIT, recording; the replay by key, keeping a guard; by the guard
            stubbed_cuda.LAUNCHES.clear()
            before = stubbed_cuda.launch_count()
            jit_before = _launch.jit_calls()
            outputs = call()
            jit.append(_launch.jit_calls() - jit_before)
            if stubbed_cuda.launch_count() - before != len(stubbed_cuda.LAUNCHES):
                mismatches.append({"case": name, "problem": "the stub counted other launches than the launcher made"})
            runs.append((list(stubbed_cuda.LAUNCHES), outputs))
        (_, _), (first, first_outputs), *replays_run = runs
        if not first:
            continue  # a torch path
        kinds = [_kinds(launch["arguments"]) for launch in first]
        counts = (replays[0], guarded[0])
        replays[0] = 0
        # the third by its key, the fourth by a guard (a call of one tensor: by its key again)
        expected = (2, int(len(inputs) >= _launch.GUARDED_FROM))
        if counts != expected or any(_has_int_pointer(launch, kind) for launch, kind in zip(first, kinds)):
            mismatches.append({"case": name, "problem": f"(replays, by a guard) of four calls {counts}, expected {expected}"})
            continue
        replayed += 1
        if jit != [1, 1, 0, 0]:
            mismatches.append({"case": name, "problem": f"jit_calls counted {jit} for two JIT calls, then two replays"})
        for by, (second, second_outputs) in zip(("key", "guard"), replays_run):
            if len(first) != len(second):
                mismatches.append({"case": name, "by": by, "problem": f"{len(first)} launches, then {len(second)}"})
                continue
            layouts = [[(tuple(o.shape), o.stride(), o.dtype, o.device) for o in outputs]
                       for outputs in (first_outputs, second_outputs)]
            if layouts[0] != layouts[1]:
                mismatches.append({"case": name, "by": by, "problem": f"outputs {layouts[0]} from the JIT, {layouts[1]} replayed"})
            for index, (a, b, kind) in enumerate(zip(first, second, kinds)):
                left = _named(a, kind, inputs, first_outputs)
                right = _named(b, kind, inputs, second_outputs)
                if left != right:
                    mismatches.append({"case": name, "by": by, "launch": index, "jit": repr(left)[:400],
                                       "replay": repr(right)[:400]})
    mismatches += _aliased_calls(torch, chain, generator, replays)
    allocator = _launch._allocator(torch.device("cpu")).__name__  # what the plans allocated with
    return {"cases": len(cases), "replayed": replayed, "mismatches": mismatches, "allocator": allocator,
            "triton": stubbed_cuda._ACTIVE["triton"]}


def _aliased_calls(torch, chain, generator, replays) -> list[dict]:
    """Calls passing one tensor at two positions, then calls with the same metadata passing two:
    the second aliased call, the key's recording one, is not recorded (its launch names one input
    for both, which a replay could not tell apart), so the first distinct call runs the JIT and
    records, the next replays what it launched, and a last, aliased again, replays reading its
    one tensor at both positions."""
    def operand(rows, cols, layout="contiguous"):
        return _operand(torch, rows, cols, torch.bfloat16, layout, generator)

    x, w, a, b = operand(17, 32), operand(32, 32), operand(32, 32), operand(32, 32)
    t, u, v = operand(17, 16, "strided"), operand(17, 16, "strided"), operand(17, 16, "strided")
    narrow = [operand(16, 16) for _ in range(2)]
    scenarios = {  # name: (aliased call, its inputs, the same call on distinct tensors, their inputs)
        "chain_matmul(x, [w, w])": (lambda: chain.chain_matmul(x, [w, w]), (x, w, w),
                                    lambda: chain.chain_matmul(x, [a, b]), (x, a, b)),
        "chain_matmul_backward(t, factors, t), t packed": (
            lambda: chain.chain_matmul_backward(t, narrow, t), (t, *narrow, t),
            lambda: chain.chain_matmul_backward(u, narrow, v), (u, *narrow, v)),
    }
    problems = []
    for name, (aliased, aliased_inputs, distinct, distinct_inputs) in scenarios.items():
        runs = []
        for call, inputs in ((aliased, aliased_inputs), (aliased, aliased_inputs), (distinct, distinct_inputs),
                             (distinct, distinct_inputs), (aliased, aliased_inputs)):
            stubbed_cuda.LAUNCHES.clear()
            replays[0] = 0
            outputs = call()
            runs.append((replays[0], list(stubbed_cuda.LAUNCHES), inputs, outputs))
        # which arguments are pointers: from a JIT launch (a replay passes them as integers)
        kinds = [_kinds(launch["arguments"]) for launch in runs[2][1]]
        runs = [(count, [_named(launch, kind, inputs, outputs) for launch, kind in zip(launches, kinds)])
                for count, launches, inputs, outputs in runs]
        counts = [count for count, _ in runs]
        if counts != [0, 0, 0, 1, 1]:
            problems.append({"case": name, "problem": f"replays per call {counts}, expected [0, 0, 0, 1, 1]"})
        if runs[3][1] != runs[2][1] or runs[4][1] != runs[1][1]:
            problems.append({"case": name, "problem": "a replay launched other arguments than the JIT call",
                             "jit": repr(runs[2][1])[:400], "replay": repr(runs[3][1])[:400]})
    return problems


def _kinds(value):
    """Which launcher arguments are pointers (the JIT passes tensors there)."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("ptr", "int") and isinstance(value[1], int):
        return value[0] == "ptr"
    if isinstance(value, tuple):
        return tuple(_kinds(entry) for entry in value)
    return False


def _has_int_pointer(launch, kind) -> bool:
    def walk(value, pointer):
        if pointer is True:
            return value[0] == "int"
        if isinstance(pointer, tuple):
            return any(walk(v, p) for v, p in zip(value, pointer))
        return False
    return walk(launch["arguments"], kind)


def _named(launch, kind, inputs, outputs):
    temporaries: dict = {}

    def name(pointer):
        for index, tensor in enumerate(inputs):
            start = tensor.untyped_storage().data_ptr()
            if start <= pointer < start + max(tensor.untyped_storage().nbytes(), 1):
                return ("input", index, pointer - tensor.data_ptr())
        for index, tensor in enumerate(outputs):
            start = tensor.untyped_storage().data_ptr()
            if start <= pointer < start + tensor.untyped_storage().nbytes():
                return ("output", index, pointer - tensor.data_ptr())
        return ("temporary", temporaries.setdefault(pointer, len(temporaries)))

    def walk(value, pointer):
        if pointer is True:
            return name(value[1])
        if isinstance(pointer, tuple):
            return tuple(walk(v, p) for v, p in zip(value, pointer))
        return value

    return (launch["grid"], launch["stream"], launch["function"], launch["flags"], launch["scratch"],
            launch["metadata"], walk(launch["arguments"], kind))


# (d, B, L) of the layers' train steps: activation chains with the fused recomputing backward
# (widths <= 64; B = 1 the H200 capture that failed), one that keeps its intermediates (the
# reverse chain and the grouped factor gradients), collapsed products (the register-resident and
# the streamed weight chain, at depth 4 and 8), and a chain of more factors than
# one launch takes.
LAYER_SHAPES = ((64, 33, 4), (64, 1, 4), (256, 64, 4), (128, 1024, 4), (64, 8192, 4), (256, 8192, 8), (64, 16, 10))


def _within_accumulate_grad(event) -> bool:
    """Whether a profiler event ran inside autograd's AccumulateGrad."""
    parent = event.cpu_parent
    while parent is not None:
        if "AccumulateGrad" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def layers() -> dict:
    """bf16 ``OverparamLinear(d, d, depth=L)`` train steps routed as on CUDA (every chain op's body
    the Triton launcher, whatever the tensors' device) on the stubbed driver: after two warm-up
    steps, the launcher calls per step that took the JIT path (none: every call's plan was
    recorded) and the kernel launches per step (some: the steps ran through the kernels)."""
    stubbed_cuda.activate(compile=True, record=False)
    import torch

    import fastrank
    from fastrank import chain as chain_ops
    from fastrank.kernels import _launch, chain

    chain_ops._CUDA_KERNELS = chain
    chain_ops._chain_matmul_body = lambda x, factors, return_all: chain.chain_matmul(x, factors, return_all)
    chain_ops._chain_matmul_backward_body = (
        lambda x, factors, grad_output, needs_x: chain.chain_matmul_backward(x, factors, grad_output, needs_x))
    chain_ops._chain_factor_grads_body = lambda grads, inputs: chain.chain_factor_grads(grads, inputs)
    chain_ops._runs_kernels = chain.runs_on_chip
    chain_ops._recomputes_backward = chain.recomputes_backward
    capturing = chain._capturing
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for d, batch, depth in LAYER_SHAPES:
        layer = fastrank.OverparamLinear(d, d, depth=depth).to(torch.bfloat16)
        x = torch.randn(batch, d).to(torch.bfloat16).requires_grad_(True)
        params = list(layer.parameters())

        def step(summed: bool = False):
            for p in params:
                p.grad = None
            x.grad = None
            y = layer(x)
            # a .sum() loss sends the gradient back broadcast (stride 0): the launchers pack it
            (y.sum() if summed else y.float().square().mean()).backward()

        for _ in range(2):
            step()
        jit, launches = _launch.jit_calls(), stubbed_cuda.launch_count()
        for _ in range(3):
            step()
        steady_jit, steady_launches = _launch.jit_calls() - jit, stubbed_cuda.launch_count() - launches
        # Gradients AccumulateGrad copies in a step (on CUDA a launch each): those whose strides
        # differ from their parameter's.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
            step()
        copies = sum(event.name == "aten::copy_" and _within_accumulate_grad(event) for event in profiled.events())
        # A CUDA graph's capture after that warm-up: torch.cuda.graph captures on a stream of its
        # own, which has no split counters yet.
        chain._SPLIT_COUNTERS.clear()
        chain._WORKSPACES.clear()  # nor a shared workspace
        chain._capturing = lambda device: True
        jit, launches = _launch.jit_calls(), stubbed_cuda.launch_count()
        try:
            step()
        finally:
            chain._capturing = capturing
        in_capture = {"jit_calls_in_capture": _launch.jit_calls() - jit,
                      "launches_in_capture": stubbed_cuda.launch_count() - launches}
        for _ in range(2):  # the JIT, then the JIT recording, for the keys the broadcast gradient makes
            step(summed=True)
        jit = _launch.jit_calls()
        for _ in range(2):
            step(summed=True)
        rows.append({"shape": f"d={d} B={batch} L={depth}", "collapsed": list(layer._path_choices.values()),
                     "jit_calls_per_step": steady_jit / 3, "launches_per_step": steady_launches / 3,
                     "copies_per_step": copies, **in_capture,
                     "jit_calls_per_summed_step": (_launch.jit_calls() - jit) / 2})
    return {"rows": rows, "triton": stubbed_cuda._ACTIVE["triton"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("keys", "replay", "layers"))
    parser.add_argument("--mutation", choices=MUTATIONS)
    parser.add_argument("--draws", type=int, default=1500)
    parser.add_argument("--allocator", choices=("fast", "empty_strided"), default="fast",
                        help="empty_strided: replays allocate as where torch has no dispatcher-free "
                             "allocator for the device type (fastrank.kernels._launch._allocator)")
    options = parser.parse_args()
    if options.allocator == "empty_strided":
        import torch

        del torch._C._dynamo.guards._empty_strided_cpu
    modes = {"keys": lambda: keys(options.mutation, options.draws), "replay": replay, "layers": layers}
    result = modes[options.mode]()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
