"""Launch plans (fastrank.kernels._launch): a replay runs the kernel Triton's JIT would run, with
the arguments it would pass.

On the CPU the checks run in a child process with Triton's CUDA backend on a stubbed driver
(benchmarks/stubbed_cuda.py, tests/launch_plans_stubbed.py), once per Triton install: this one,
and the one whose Python ``FASTRANK_TRITON36_PYTHON`` names (CI sets it to a Triton 3.6
environment, the GPU machine's version):

- over 1,500 drawn argument sets of the four planned launchers, equal plan keys imply equal
  bindings by Triton's own binder (every argument's specialization: 16-byte alignment, integers
  equal to 1 or divisible by 16, int32 / int64; dtypes; options, constexprs, grid, every integer);
- the search sees each component of the key: with one dropped, it finds two argument sets that
  share a key but not a binding;
- a replay hands Triton's C launch function what the JIT's launch handed it (grid, stream,
  function, flags, scratch, metadata, every argument; pointers by what they point into), by its
  key and by the guard its first replay keeps.

In this process: a plan's guard passes exactly the calls of its key (over drawn pairs of argument
sets), and a guard without shapes, strides or the alignment comparison is caught.

With a GPU, replays compute what the JIT path computes, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "launch_plans_stubbed.py"
MUTATIONS = ("alignment", "strides", "shapes", "dtypes", "flags")


def _pythons():
    pythons = [pytest.param(sys.executable, id="this-triton")]
    other = os.environ.get("FASTRANK_TRITON36_PYTHON")
    if other:
        pythons.append(pytest.param(other, id="triton-3.6"))
    return pythons


def _backend_available(python: str) -> bool:
    probe = "import triton.backends.nvidia.driver, triton.runtime.jit"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _stubbed(python: str, *args: str) -> dict:
    if shutil.which("gcc") is None:
        pytest.skip("the stubbed CUDA driver is built with gcc")
    if not _backend_available(python):
        pytest.skip(f"{python} has no Triton with its CUDA backend")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([python, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=900)
    assert done.returncode == 0, f"{SCRIPT.name} {' '.join(args)} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("python", _pythons())
def test_equal_keys_have_equal_triton_bindings(python):
    result = _stubbed(python, "keys")
    assert result["collisions"] == [], f"Triton {result['triton']}: keys shared by other bindings: {result}"
    # The draws reach many specializations, so the search means something.
    assert result["bindings"] > 1000, result


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("python", _pythons())
def test_a_key_without_one_component_is_caught(python, mutation):
    result = _stubbed(python, "keys", "--mutation", mutation)
    assert result["collision_count"] > 0, (
        f"Triton {result['triton']}: with the key's {mutation} dropped, no two argument sets shared a key "
        f"but not a binding: the search cannot see that component"
    )


@pytest.mark.parametrize("allocator", ["fast", "empty_strided"])
@pytest.mark.parametrize("python", _pythons())
def test_a_replay_launches_what_the_jit_launches(python, allocator):
    # Replays allocate through torch's dispatcher-free allocator, or torch.empty_strided where
    # torch has none for the device type: either way they launch what the JIT launches.
    result = _stubbed(python, "replay", "--allocator", allocator)
    assert result["allocator"] == ("_empty_strided_cpu" if allocator == "fast" else "allocate"), result
    assert result["mismatches"] == [], f"Triton {result['triton']}: {result['mismatches']}"
    assert result["replayed"] == result["cases"] > 30, result


@pytest.mark.parametrize("python", _pythons())
def test_layer_train_steps_replay_every_launch(python):
    # A steady training loop never takes Triton's JIT path: every launcher call of a layer's train
    # step (forward chain, fused or composed backward, grouped factor gradients, the collapsed
    # product) replays the plan its second call recorded.
    result = _stubbed(python, "layers")
    for row in result["rows"]:
        assert row["launches_per_step"] >= 1, f"Triton {result['triton']}: {row}: no kernel ran"
        assert row["jit_calls_per_step"] == 0, f"Triton {result['triton']}: {row}: JIT calls in a steady loop"
        # Every gradient comes in its parameter's layout: AccumulateGrad copies none (a launch each).
        assert row["copies_per_step"] == 0, f"Triton {result['triton']}: {row}: copies in a step"
        # A graph captures what its warm-up ran: a JIT call there could compile or autotune (which
        # synchronizes) inside the capture.
        assert row["jit_calls_in_capture"] == 0, f"Triton {result['triton']}: {row}: JIT calls in a capture"
        assert row["jit_calls_per_summed_step"] == 0, f"Triton {result['triton']}: {row}: a .sum() loss left the plans"
        assert row["launches_in_capture"] == row["launches_per_step"], f"Triton {result['triton']}: {row}"
    assert [row["collapsed"] for row in result["rows"]] == [[False]] * 3 + [[True]] * 3 + [[False]], result
    # Triton launches per step: the chain and the fused backward where every width is at most 64
    # (the activation chain, and the collapsed product's weight chain at d = 64); the chain, the
    # reverse chain and the grouped factor gradients above; two of each past 8 factors.
    assert [row["launches_per_step"] for row in result["rows"]] == [2, 2, 3, 3, 2, 3, 6], result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replays_compute_what_the_jit_path_computes():
    from fastrank.kernels import chain, sketch

    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    for dtype in (torch.bfloat16, torch.float32):
        x, factors = randn(37, 48, dtype=dtype), [randn(33, 48, dtype=dtype), randn(64, 33, dtype=dtype)]
        grads, inputs = [randn(700, 33, dtype=dtype)], [randn(700, 48, dtype=dtype)]
        narrow_x, narrow = randn(21, 16, dtype=dtype), [randn(16, 16, dtype=dtype) for _ in range(3)]
        narrow_grad = randn(21, 16, dtype=dtype)
        a = randn(300, 130, dtype=dtype)
        strided_x, broadcast_grad = randn(74, 96, dtype=dtype)[::2, ::2], randn(1, dtype=dtype)[0].expand(21, 16)
        calls = {
            # operands the launchers pack (no unit stride; a .sum()'s stride-0 gradient): replays pack them again
            "chain_matmul packed": lambda: chain.chain_matmul(strided_x, factors),
            "chain_factor_grads packed": lambda: chain.chain_factor_grads([broadcast_grad], [narrow_x]),
            "chain_matmul_backward packed": lambda: chain.chain_matmul_backward(narrow_x, narrow, broadcast_grad),
            "chain_matmul": lambda: chain.chain_matmul(x, factors),
            "chain_matmul last": lambda: chain.chain_matmul(x.T.contiguous().T, factors, return_all=False),
            "chain_factor_grads": lambda: chain.chain_factor_grads(grads, inputs),
            "chain_factor_grads split": lambda: chain.chain_factor_grads(grads, inputs, split_k=3),
            "chain_matmul_backward": lambda: chain.chain_matmul_backward(narrow_x, narrow, narrow_grad),
            "gaussian_sketch": lambda: [sketch.gaussian_sketch(a, 17, 3)],
            "gaussian_sketch gram": lambda: [sketch.gaussian_sketch(a, 17, 4, gram=True)],
        }
        for name, call in calls.items():
            first = [t.clone() for t in call()]
            for _ in range(2):
                again = call()
                torch.cuda.synchronize()
                assert len(again) == len(first)
                for index, (expected, got) in enumerate(zip(first, again)):
                    assert torch.equal(expected, got), f"{name} ({dtype}): output {index} differs on a replay"
                    assert (got.device, got.stride()) == (expected.device, expected.stride()), (name, index)
        # One tensor at two positions is not recorded: the call after it, on two tensors, reads both.
        w, b = randn(48, 48, dtype=dtype), randn(48, 48, dtype=dtype)
        for _ in range(2):  # the key of the calls below, met twice: its recording call is this aliased one
            chain.chain_matmul(x, [w, w], return_all=False)
        for _ in range(2):
            got = chain.chain_matmul(x, [w, b], return_all=False)[0]
            expected = chain.chain_matmul_ref(x, [w, b], return_all=False)[0]
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # The third calls were replays (a key's second call records its plan).
    for plans in (chain._CHAIN_PLANS, chain._FACTOR_GRAD_PLANS, chain._BACKWARD_PLANS, sketch._SKETCH_PLANS):
        assert any(plan is not None for plan in plans.plans.values())


def test_plan_cache_keeps_at_most_its_limit_dropping_the_oldest():
    from fastrank.kernels._launch import PlanCache, PlanRecorder

    cache = PlanCache(limit=3)
    for key in range(5):
        cache.record(key, PlanRecorder((), active=False), [])
    assert list(cache.plans) == [2, 3, 4]
    assert cache.recorder(4, ()).plannable is False  # a known key records nothing more
    # A new key records at its second call: its first only enters `seen`, which keeps at most
    # `limit` keys too, and recording it leaves `seen`.
    first = cache.recorder(9, ())
    assert first.plannable is False and first.retry is True
    cache.record(9, first, [])
    assert 9 not in cache.plans and list(cache.seen) == [9]
    second = cache.recorder(9, ())
    assert second.plannable is True and second.retry is False
    cache.record(9, second, [])
    assert list(cache.plans) == [3, 4, 9] and list(cache.seen) == []
    for key in range(10, 15):
        cache.recorder(key, ())
    assert list(cache.seen) == [12, 13, 14]


@pytest.mark.parametrize("count", [0, 1, 2, 9])
def test_call_key_reads_every_tensor(count):
    """The generated key of ``count`` tensors equals a plain reading of each one: shape, strides,
    dtype and device index, and the pointers' 16-byte alignment (True when all are aligned)."""
    from fastrank.kernels._launch import call_key

    generator = torch.Generator().manual_seed(count)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tensors = []
    for index in range(count):
        base = torch.randn(7 + index, 20, generator=generator).to(dtypes[index % 3])
        tensors.append((base.T, base[:, 1:], base[1:3])[index % 3])  # transposed, misaligned, sliced
    flags = ("flag", count)
    key, pointers = call_key(tuple(tensors), flags)
    assert pointers == [t.data_ptr() for t in tensors]
    metadata = tuple((t.shape, t.stride(), t.dtype, t.get_device()) for t in tensors)
    alignment = tuple(t.data_ptr() % 16 == 0 for t in tensors)
    assert key == (flags, metadata, True if all(alignment) else alignment)
    if count > 1:  # the slice one column in is misaligned (fp32: 4 bytes, half: 2)
        assert key[2] == alignment and not all(alignment)
    aligned = [torch.randn(4, 4, generator=generator) for _ in range(count)]
    assert call_key(tuple(aligned), flags)[0][2] is True


GUARD_LAYOUTS = ("contiguous", "transposed", "sliced", "offset1", "offset8", "strided", "broadcast")


def _guard_operand(recipe, generator):
    """A fresh tensor (new storage) made by ``recipe`` = (rows, cols, dtype, layout)."""
    rows, cols, dtype, layout = recipe
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=generator).to(dtype)
    if layout == "transposed":
        return torch.randn(cols, rows, generator=generator).to(dtype).T
    if layout == "sliced":
        return torch.randn(rows, cols + 16, generator=generator).to(dtype)[:, 3 : 3 + cols]
    if layout in ("offset1", "offset8"):
        skip = int(layout[6:])
        return torch.randn(rows * cols + skip, generator=generator).to(dtype)[skip:].view(rows, cols)
    if layout == "strided":
        return torch.randn(rows * 2, cols * 2, generator=generator).to(dtype)[::2, ::2]
    return torch.randn(1, generator=generator).to(dtype)[0].expand(rows, cols)  # broadcast


def _guard_search(draws: int = 1200) -> dict:
    """Draw pairs of argument sets (the second made afresh by the first's recipes, or with one
    tensor's size, layout, dtype, requires_grad or type changed, or made one element into a storage
    with the same strides), keep a plan under
    a guard of the first through ``PlanCache.replay`` (a key hit), drop the key's plan so that
    only the guard can serve, and replay the second: ``wrong`` counts guard hits on a second set
    whose key differs, ``missed`` guard misses where the keys are equal and nothing but metadata in
    the key changed."""
    import random

    from fastrank.kernels._launch import LaunchPlan, PlanCache, call_key

    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    counts = {"wrong": 0, "missed": 0, "hits": 0, "misses": 0}
    for _ in range(draws):
        count = rng.choice((2, 3, 5, 9))  # calls of one tensor build their key (GUARDED_FROM)
        recipes = [(rng.choice((1, 15, 16, 17, 33)), rng.choice((1, 15, 16, 17, 33)), rng.choice(dtypes),
                    rng.choice(GUARD_LAYOUTS)) for _ in range(count)]
        second = list(recipes)
        change = rng.choice(("none", "none", "size", "layout", "offset", "dtype", "grad", "type"))
        position = rng.randrange(count)
        rows, cols, dtype, layout = second[position]
        if change == "size":
            second[position] = (rows, cols + 1, dtype, layout) if rng.random() < 0.5 else (rows + 1, cols, dtype, layout)
        elif change == "layout":
            second[position] = (rows, cols, dtype, rng.choice(GUARD_LAYOUTS))
        elif change == "dtype":
            second[position] = (rows, cols, rng.choice(dtypes), layout)
        first_tensors = tuple(_guard_operand(recipe, generator) for recipe in recipes)
        second_tensors = [_guard_operand(recipe, generator) for recipe in second]
        if change == "offset":  # the same shape and strides one element into a storage
            made = second_tensors[position]
            span = 1 + sum((size - 1) * step for size, step in zip(made.shape, made.stride()))
            base = torch.randn(span + 1, generator=generator).to(made.dtype)[1:]
            second_tensors[position] = base.as_strided(made.shape, made.stride())
        elif change == "grad":
            second_tensors[position].requires_grad_()
        elif change == "type":
            second_tensors[position] = torch.nn.Parameter(second_tensors[position].contiguous(), requires_grad=False)
        second_tensors = tuple(second_tensors)
        flags = ("flag", count)
        cache, marker = PlanCache(), object()
        key = call_key(first_tensors, flags)[0]
        cache.plans[key] = LaunchPlan(lambda p, index, tensors: [marker], [], "")
        assert cache.replay(first_tensors, flags, -1) == ([marker], key)  # by the key: guarded now
        del cache.plans[key]
        outputs, replayed_key = cache.replay(second_tensors, flags, -1)
        hit = outputs == [marker] and replayed_key is None
        same = call_key(second_tensors, flags)[0] == key
        counts["hits" if hit else "misses"] += 1
        counts["wrong"] += hit and not same
        counts["missed"] += same and not hit and change not in ("grad", "type")
    return counts


def test_a_guard_finds_exactly_the_calls_of_its_key():
    counts = _guard_search()
    assert counts["wrong"] == 0, counts
    assert counts["missed"] == 0, counts
    # both sides were reached many times, so the search means something
    assert counts["hits"] > 300 and counts["misses"] > 300, counts


@pytest.mark.parametrize("mutation", ["shapes", "strides", "alignment"])
def test_a_guard_without_one_component_is_caught(mutation, monkeypatch):
    """With the guard's shapes or strides left free, or the pointers' alignment not compared, the
    search finds guard hits for calls of another key."""
    from fastrank.kernels import _launch

    guards = _launch._TENSOR_GUARDS
    if mutation == "alignment":
        real = _launch.read_pointers
        monkeypatch.setattr(_launch, "read_pointers", lambda tensors: (True, real(tensors)[1]))
    else:
        def loose(tensors):
            free = lambda t: [None] * t.dim()  # noqa: E731
            exact = lambda t, values: list(values)  # noqa: E731
            sizes = [free(t) if mutation == "shapes" else exact(t, t.shape) for t in tensors]
            strides = [free(t) if mutation == "strides" else exact(t, t.stride()) for t in tensors]
            return guards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)

        monkeypatch.setattr(_launch, "tensor_guard", loose)
    assert _guard_search(400)["wrong"] > 0


def test_a_plan_leaving_the_cache_takes_its_guards():
    """A plan dropped for the cache's limit is found neither by its key nor by a guard; one bucket
    keeps at most GUARDS_PER_BUCKET guards, and calls beyond them replay by their keys."""
    from fastrank.kernels._launch import GUARDS_PER_BUCKET, LaunchPlan, PlanCache, PlanRecorder, call_key

    cache = PlanCache(limit=GUARDS_PER_BUCKET + 2)
    x = torch.randn(4, 6)
    calls = [(x, torch.randn(6, 3 + width)[:, :3]) for width in range(GUARDS_PER_BUCKET + 2)]  # one bucket
    keys = []
    for index, tensors in enumerate(calls):
        key = call_key(tensors, ("flag",))[0]
        keys.append(key)
        cache.plans[key] = LaunchPlan(lambda p, device, t, index=index: [index], [], "")
        assert cache.replay(tensors, ("flag",), -1) == ([index], key)  # by the key
    bucket, = cache.guarded
    assert len(cache.guarded[bucket]) == GUARDS_PER_BUCKET
    for index, tensors in enumerate(calls):
        guarded = index < GUARDS_PER_BUCKET
        assert cache.replay(tensors, ("flag",), -1) == ([index], None if guarded else keys[index])
    cache.record(("another",), PlanRecorder((), active=True), [])  # the oldest key leaves
    assert keys[0] not in cache.plans
    assert [entry[2] for entry in cache.guarded[bucket]] == keys[1:GUARDS_PER_BUCKET]
    assert cache.replay(calls[0], ("flag",), -1) == (None, keys[0])
    cache.clear()
    assert cache.guarded == {} and cache.replay(calls[1], ("flag",), -1) == (None, keys[1])


def test_plan_cache_without_guards_replays_by_key(monkeypatch):
    """Where torch has no TensorGuards, every replay builds its key and still finds its plan."""
    from fastrank.kernels import _launch

    monkeypatch.setattr(_launch, "_TENSOR_GUARDS", None)
    cache, marker = _launch.PlanCache(), object()
    tensors = (torch.randn(3, 5), torch.randn(5, 2).T)
    key = _launch.call_key(tensors, ("flag",))[0]
    cache.plans[key] = _launch.LaunchPlan(lambda p, index, t: [marker], [], "")
    for _ in range(3):
        assert cache.replay(tensors, ("flag",), -1) == ([marker], key)
    assert cache.guarded == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_allocator_allocates_on_the_current_cuda_device():
    from fastrank.kernels._launch import _allocator

    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        with torch.cuda.device(index):  # a replay makes its inputs' device current
            made = _allocator(device)((33, 17), (1, 33), torch.bfloat16)
        assert (made.device, made.shape, made.stride(), made.dtype) == (device, (33, 17), (1, 33), torch.bfloat16)
        made.copy_(torch.arange(33 * 17, device=device).view(33, 17))
        assert torch.equal(made.cpu(), torch.arange(33 * 17).view(33, 17).to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (1, 7, 3), (64, 64), (2, 1, 1)])
def test_plan_strides_are_the_strides_torch_empty_gives(shape):
    from fastrank.kernels._launch import _contiguous_strides

    assert _contiguous_strides(shape) == torch.empty(shape).stride()


@pytest.mark.parametrize("fast", [True, False], ids=["inductor allocator", "empty_strided"])
def test_plan_allocator_makes_what_empty_strided_makes(fast, monkeypatch):
    """A replay's allocations (``_allocator``): torch's dispatcher-free allocator where torch has
    one for the device type, else ``torch.empty_strided``; either gives the tensor
    ``torch.empty_strided`` gives (shape, strides, dtype, device, no grad, inference mode)."""
    from fastrank.kernels._launch import _allocator

    guards = torch._C._dynamo.guards
    assert hasattr(guards, "_empty_strided_cpu")  # what the CPU host-cost figures measure
    if not fast:
        monkeypatch.delattr(guards, "_empty_strided_cpu")
    allocate = _allocator(torch.device("cpu"))
    assert (allocate is getattr(guards, "_empty_strided_cpu", None)) is fast
    generator = torch.Generator().manual_seed(1)
    cases = [((5, 7), (7, 1)), ((5, 7), (1, 5)), ((0, 3), (3, 1)), ((), ()), ((2, 3, 4), (12, 4, 1))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        for shape, stride in cases:
            for inference in (False, True):
                values = torch.randint(0, 100, shape, generator=generator).to(dtype)
                with torch.inference_mode(inference):
                    made = allocate(shape, stride, dtype)
                    reference = torch.empty_strided(shape, stride, dtype=dtype)
                    made.copy_(values)
                assert (made.shape, made.stride(), made.dtype, made.device) == (torch.Size(shape), stride, dtype,
                                                                                  torch.device("cpu"))
                assert not made.requires_grad and made.is_inference() == reference.is_inference() == inference
                assert torch.equal(made, values)


def test_on_own_thread_returns_or_raises_what_the_thread_did():
    import threading

    from fastrank.kernels._launch import on_own_thread

    caller = threading.get_ident()
    made = on_own_thread(lambda: (threading.get_ident(), torch.arange(3)))
    assert made[0] != caller and torch.equal(made[1], torch.arange(3))

    def fails():
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        on_own_thread(fails)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_persistent_buffers_stay_out_of_a_threads_graph_pool():
    # What torch.compile's CUDA graph trees do while warming up a graph: every allocation of this
    # thread goes to a private pool (torch._inductor.cudagraph_trees._use_cuda_memory_pool_manager).
    # A persistent buffer is made elsewhere, zeroed and ready.
    from fastrank.kernels._launch import persistent_buffer

    device = torch.device("cuda", torch.cuda.current_device())
    pool = torch.cuda.graph_pool_handle()

    def pool_of(tensor):
        address = tensor.untyped_storage().data_ptr()
        for segment in torch.cuda.memory_snapshot():
            if segment["address"] <= address < segment["address"] + segment["total_size"]:
                return tuple(segment["segment_pool_id"])
        raise AssertionError("no segment holds the tensor")

    torch._C._cuda_beginAllocateCurrentThreadToPool(device.index, pool)
    try:
        routed = torch.empty(1 << 16, device=device)
        buffer = persistent_buffer(device, lambda: torch.zeros(1 << 16, dtype=torch.int32, device=device))
    finally:
        torch._C._cuda_endAllocateToPool(device.index, pool)
        torch._C._cuda_releasePool(device.index, pool)
    assert pool_of(routed) == tuple(pool), "the thread's allocations did not go to the pool (the test's premise)"
    assert pool_of(buffer) != tuple(pool), "the persistent buffer was made in the pool"
    assert buffer.device == device and int(buffer.abs().sum()) == 0


class _RacyAutotuner:
    """What a Triton Autotuner's run does with shared state: keeps the call's arguments and then its
    choice on the object, with time (compiling, benchmarking) between."""

    class _Config:
        def __init__(self, value):
            self.value = value

        def all_kwargs(self):
            return {"BLOCK": self.value}

    def __init__(self):
        self.nargs = self.best_config = None

    def __getitem__(self, grid):
        import time

        def run(value):
            self.nargs = {"value": value}
            time.sleep(0.02)
            assert self.nargs == {"value": value}, "another call's arguments in this call's tuning"
            self.best_config = self._Config(value)
            time.sleep(0.02)
            self.nargs = None
            return f"compiled {value}"

        return run


def test_calls_through_one_autotuner_from_two_threads_keep_their_own_choices():
    # Autograd's per-device backward threads, or a background RankTracker beside the training loop,
    # may launch one autotuned kernel at once: each call tunes with its own arguments and returns
    # the config chosen for it.
    import threading
    import time

    from fastrank.kernels._launch import _autotuned

    kernel, results, errors = _RacyAutotuner(), {}, []

    def call(value):
        try:
            results[value] = _autotuned(kernel, (1,), (value,), {})
        except AssertionError as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(value,)) for value in (16, 32)]
    threads[0].start()
    time.sleep(0.01)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == {16: ("compiled 16", {"BLOCK": 16}), 32: ("compiled 32", {"BLOCK": 32})}
