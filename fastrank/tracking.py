"""Rank during training: ``RankTracker`` watches embeddings and weights at a cost you do not notice.

Embeddings are never stored. A forward hook on each watched module folds its output ``X`` (N x d)
into fp64 accumulators: the Gram ``X^T X``, the column sums and the row count, or, when ``d`` is too
large for a d x d matrix, a streaming Nystrom sketch ``X^T (X Omega)`` with the exact trace
``||X||_F^2``. Under ``torch.distributed`` the accumulators are summed across ranks with one
all-reduce each (O(d^2) traffic, independent of N), so the result equals the single-process
result on the concatenated data.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import numbers
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .classes import ClassStatistics, _check_labels
from .layers import OverparamConv1D, _OverparamBase
from .layers.hf import is_hf_conv1d
from .rank import effective_ranks, nystrom_entropy, rank_metrics
from .rank.common import _METHODS as RANK_METHODS
from .rank.eigensolver import on_host
from .sharded import check_token_rate, collapsed_weight_of, first_output, is_sharded, select_tokens

__all__ = ["RankTracker", "weight_matrix"]

Measurement = dict[str, dict[str, float]]  # one measurement step's metrics, by measured name

# Relative entropy accuracy asked of exact weight spectra during training: the fp64 Gram route meets
# it without an SVD of ill-conditioned weights (a 512 x 512 product of two factors: 51 ms -> 5 ms
# on a 2-core CPU), and a training curve needs no more.
TRACKING_TOLERANCE = 1e-6

# The forwards whose outputs a RankTracker accumulates (its ``forwards`` argument).
FORWARDS = ("all", "training")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _accepts(check: Callable[[Any], Any], value: object) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True


# RankTracker's arguments other than the model: what each must be, and the test of it.
_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "embeddings": ("a module name or an iterable of module names (str)",
                   lambda v: isinstance(v, tuple) and all(isinstance(name, str) for name in v)),
    "weights": ("a bool", lambda v: isinstance(v, bool)),
    "every": ("a positive int", lambda v: _is_int(v) and v >= 1),
    "method": (f"one of {RANK_METHODS}", lambda v: v in RANK_METHODS),
    "center": ("a bool", lambda v: isinstance(v, bool)),
    "sketch_threshold": ("a non-negative int", lambda v: _is_int(v) and v >= 0),
    "sketch_size": ("a positive int", lambda v: _is_int(v) and v >= 1),
    "seed": ("an int", _is_int),
    "process_group": ("a torch.distributed process group or None", lambda v: True),
    "background": ("a bool", lambda v: isinstance(v, bool)),
    "num_classes": ("a positive int or None", lambda v: v is None or (_is_int(v) and v >= 1)),
    "token_rate": ("None or a number in (0, 1]", lambda v: _accepts(check_token_rate, v)),
    "token_dim": ("0 (outputs (T, B, d)) or 1 (outputs (B, T, d))", lambda v: _is_int(v) and v in (0, 1)),
    "forwards": (f"one of {FORWARDS}", lambda v: v in FORWARDS),
    "host_threads": ("a positive int or None", lambda v: v is None or (_is_int(v) and v >= 1)),
}


def embedding_names(embeddings: Iterable[str] | str) -> tuple[str, ...] | Any:
    """``RankTracker``'s ``embeddings`` as a tuple (one str is one name); a non-iterable as it is,
    for :func:`check_options` to refuse."""
    if isinstance(embeddings, str):
        return (embeddings,)
    return tuple(embeddings) if isinstance(embeddings, Iterable) else embeddings


def check_options(caller: str, options: Mapping[str, Any]) -> None:
    """Check ``RankTracker`` arguments other than ``model`` (``embeddings`` through :func:`embedding_names`).

    Raises TypeError for a name that is not an argument and ValueError for a value that is not
    allowed, each beginning with ``caller`` and naming the argument, the expected and the given value.
    """
    for name, value in options.items():
        if name not in _OPTIONS:
            raise TypeError(f"{caller}: RankTracker has no argument {name!r}; its arguments are {sorted(_OPTIONS)}")
        expected, valid = _OPTIONS[name]
        if not valid(value):
            raise ValueError(f"{caller}: {name} must be {expected}, got {value!r}")


def _what_it_is(model: nn.Module, name: str) -> str:
    """`` (a parameter of module 'encoder.0')`` when ``name`` is a parameter or buffer of ``model``, else ``""``."""
    owner = name.rpartition(".")[0]
    for kind, tensors in (("parameter", model.named_parameters(remove_duplicate=False)),
                          ("buffer", model.named_buffers(remove_duplicate=False))):
        if any(name == tensor_name for tensor_name, _ in tensors):
            return f" ({name!r} is a {kind} of module {owner!r})"
    return ""


def _in_backward() -> bool:
    """Whether the autograd engine runs on this thread: a forward now is the recompute of a
    checkpointed region (``torch.utils.checkpoint``, reentrant or not), not a forward of its own."""
    return torch._C._current_graph_task_id() != -1


# Under torch.compile a watched module's forward hook is traced as one call of this op, which runs
# the hook's accumulation (RankTracker._accumulate) when the compiled graph runs: Dynamo cannot
# trace the accumulation (its lock, the autograd engine query, the generators of the sketch and of
# the token selection), and a graph break inside a module hook left the compiled model in a graph
# per module on every step, not only on measurement steps (a five-module MLP ran 6 compiled
# regions a step, 12 on measurement steps, against 1 untracked). What the trace knows is passed
# in: the model's training mode at that point of the traced code (a ``model.train()`` in the
# compiled function is applied after its graph runs) and whether the module is an nn.DataParallel
# replica. The op finds its tracker by key (weakly: it keeps no tracker alive, and a removed one is
# forgotten), the key held in a scalar tensor of the tracker's: a graph input, where an int argument
# would be a constant of the trace that Dynamo guards, so that every new tracker recompiled the
# model and the ninth fell back to eager for good (torch._dynamo.config.recompile_limit). The op
# mutates nothing, but it declares that it mutates that tensor: Dynamo and AOTAutograd drop a call
# of a pure op whose result is unused, and this one returns nothing.
_TRACKERS: weakref.WeakValueDictionary[int, RankTracker] = weakref.WeakValueDictionary()
_TRACKER_KEYS = itertools.count()


def _track_output(output: Tensor, tracker: Tensor, name: str, training: bool, replica: bool) -> None:
    """``fastrank::track_output``: accumulate ``output``, the output of module ``name``, into the
    RankTracker whose key ``tracker`` holds (nothing once that tracker is removed or gone), as its
    eager hook would, the model in training mode where ``training``, the module an nn.DataParallel
    replica where ``replica``: whether the step is measured and whether the forward is a
    checkpoint's recompute are decided here, when the compiled graph runs. Tagged
    ``cudagraph_unsafe``: Inductor's graph partitioning (on by default) keeps it out of the CUDA
    graphs of ``mode="reduce-overhead"``, where a replay would skip it; without partitioning (the
    cpp wrapper, AOT compilation) a graph holding it is not captured."""
    found = _TRACKERS.get(int(tracker))
    if found is not None:
        found._accumulate(name, output, replica, training)


# Defined through torch.library.Library, not torch.library.custom_op, whose Python wrappers (autograd
# and mutation bookkeeping) cost 36 us a call against 3.2 us here (torch 2.13, 2-core EPYC): every
# compiled forward calls the op once per watched module, measured step or not. No output, so no
# autograd formula is needed.
_LIBRARY = torch.library.Library("fastrank", "FRAGMENT")
_LIBRARY.define("track_output(Tensor output, Tensor(a!) tracker, str name, bool training, bool replica) -> ()",
                tags=(torch.Tag.cudagraph_unsafe,))
_LIBRARY.impl("track_output", _track_output, "CompositeExplicitAutograd")


@torch.library.register_fake("fastrank::track_output", lib=_LIBRARY)
def _(output: Tensor, tracker: Tensor, name: str, training: bool, replica: bool) -> None:
    return None


def _exporting() -> bool:
    """Whether torch.export traces the call: the flag ``torch.compiler.is_exporting()`` returns, read
    directly because Dynamo of torch 2.11 traces ``is_exporting()`` as True under torch.compile too.
    An exported program leaves the tracker's op out: it observes training, and another process
    could not run it."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def _guard_module_hooks() -> None:
    """Make torch.compile see forward hooks: by default Dynamo does not guard on a hook added to a
    module that had none when the code was compiled (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so code compiled without it, for the hooked model before its tracker, or for another model
    built the same way (a teacher beside its student), went on running without it, and the tracker
    never saw the outputs it watches. The first tracker turns those guards on for the rest of the
    process and drops the code compiled before (``torch._dynamo.reset_code_caches()``: it
    recompiles at its next call, with its guards and the hooks); later trackers drop nothing: a
    hook added or removed then fails a guard of the code that runs the module, which recompiles
    (a hook that other code adds and removes on a compiled module recompiles it too). Run outside
    any trace (a tracker made inside a compiled function): a traced config write would not happen
    before the code it is meant for."""
    import torch._dynamo

    config = torch._dynamo.config
    if config.skip_nnmodule_hook_guards:
        config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset_code_caches()


def weight_matrix(module: nn.Module) -> Tensor | None:
    """The 2-D weight whose rank is reported: ``(out, in)``; conv kernels as ``(out, in/groups*k...)``.

    Over-parameterized layers report their collapsed weight. Hugging Face's ``Conv1D`` (GPT-2: a
    linear layer that stores its weight as ``(in, out)``) and :class:`fastrank.OverparamConv1D`
    are read transposed, as ``(out, in)`` like ``nn.Linear``. Other modules: None.
    """
    if isinstance(module, _OverparamBase):
        weight = collapsed_weight_of(module)
        weight = weight.T if isinstance(module, OverparamConv1D) else weight
    elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        weight = module.weight
    elif is_hf_conv1d(module, exact=False):
        weight = module.weight.T
    else:
        return None
    return weight.reshape(weight.shape[0], -1)


def _rows(output: Any) -> Tensor | None:
    """The module output as rows of features: ``(..., d)`` -> ``(N, d)``; ``(N, C, H, W)`` -> ``(N*H*W, C)``."""
    output = first_output(output)
    if not isinstance(output, Tensor) or output.dim() == 0 or not output.is_floating_point():
        return None
    if output.dim() == 4:
        output = output.movedim(1, -1)
    if output.dim() == 1:
        output = output.unsqueeze(0)
    return output.reshape(-1, output.shape[-1])


class _EmbeddingAccumulator:
    """fp64 sums over every row seen: Gram (or sketch), column sums, squared norm and count."""

    def __init__(self, sketch_threshold: int, sketch_size: int, seed: int) -> None:
        self.sketch_threshold = sketch_threshold
        self.sketch_size = sketch_size
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.gram: Tensor | None = None  # (d, d) X^T X, or (d, k) X^T (X Omega) when sketching
        self.omega: Tensor | None = None  # (d, k), the same on every rank (seeded)
        self.column_sum: Tensor | None = None  # (d,)
        self.square_sum: Tensor | None = None  # () ||X||_F^2
        self.count: Tensor | None = None  # () rows

    @property
    def sketching(self) -> bool:
        return self.omega is not None

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        d = rows.shape[1]
        if self.gram is None:
            device = rows.device
            if d > self.sketch_threshold:
                gen = torch.Generator().manual_seed(self.seed)
                k = min(self.sketch_size, d)
                self.omega = torch.randn(d, k, generator=gen, dtype=torch.float64).to(device)
                self.gram = torch.zeros(d, k, dtype=torch.float64, device=device)
            else:
                self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
            self.column_sum = torch.zeros(d, dtype=torch.float64, device=device)
            self.square_sum = torch.zeros((), dtype=torch.float64, device=device)
            self.count = torch.zeros((), dtype=torch.float64, device=device)
        elif d != self.column_sum.shape[0]:
            raise ValueError(
                f"RankTracker: feature size changed from {self.column_sum.shape[0]} to {d} within one measurement"
            )
        if self.sketching:
            self.gram.addmm_(rows.T, rows @ self.omega)
        else:
            self.gram.addmm_(rows.T, rows)
        self.column_sum += rows.sum(0)
        self.square_sum += rows.square().sum()
        self.count += rows.shape[0]

    def totals(self, group=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(gram, column_sum, square_sum, count), summed over the ranks of ``group`` when
        ``torch.distributed`` is initialized (one all-reduce each, on copies: the local sums stay)."""
        local = (self.gram, self.column_sum, self.square_sum, self.count)
        if not (dist.is_available() and dist.is_initialized()):
            return local
        reduced = tuple(t.clone() for t in local)
        for tensor in reduced:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return reduced


class RankTracker:
    """Measure the effective rank of embeddings and weights while a model trains.

    Args:
        model: the model to watch.
        embeddings: qualified names of modules (``dict(model.named_modules())`` keys) whose outputs
            are measured. Outputs ``(..., d)`` are read as rows of ``d`` features, 4-D outputs
            ``(N, C, H, W)`` as ``N*H*W`` rows of ``C`` features; tuple outputs use their first item.
        weights: also measure the weight of every ``nn.Linear`` / ``nn.Conv2d`` / over-parameterized
            layer (collapsed weight; conv kernels flattened to ``(out, in/groups*kh*kw)``), all
            layers of one shape in one batched call.
        every: measure at steps ``0, every, 2*every, ...``; hooks only accumulate on those steps.
        method: passed to the rank functions (``"auto"``, ``"exact"``, ``"randomized"``, ``"slq"``).
        center: subtract the column mean of the embeddings (covariance instead of Gram).
        sketch_threshold: embeddings wider than this are accumulated as a rank-``sketch_size``
            Nystrom sketch ``X^T (X Omega)`` instead of the ``d x d`` Gram.
        sketch_size: columns of the sketch.
        seed: seeds the sketch matrix (identical on every rank).
        process_group: the ``torch.distributed`` group to reduce over (default: the world, when
            initialized).
        background: run the spectra of a measurement step on a worker thread while training goes
            on. ``step()`` then only snapshots (all-reduces the accumulators and copies the weights)
            and returns None; the results reach ``history`` in step order, and reading ``history``
            (or ``flush()``, the exports, ``remove()``) waits for the pending ones. On a 2-core CPU
            this hides most of the measurement behind the training loop; results are the same. A
            model on one CUDA device is measured on a CUDA stream of the worker's own, so that its
            kernels run beside the loop's instead of queueing between them.
        num_classes: also measure the class geometry of each embedding (``nc1``,
            ``class_mean_effective_rank``, ``classes``, ``empty_classes``; see
            :mod:`fastrank.classes`): give each measured batch's labels with :meth:`set_labels`
            before its forward. Streaming fp64 sums (C x d means, d x d scatter), all-reduced like
            the Gram; embeddings are never stored.
        token_rate: sequence outputs ``(B, T, d)``: measure ``max(1, round(token_rate * T))`` token
            positions per measurement step instead of all T (the same positions for every
            sequence and rank, drawn from ``seed`` and the step; :func:`fastrank.sharded.select_tokens`).
        token_dim: the token dim of 3-D outputs: 1 for ``(B, T, d)``, 0 for ``(T, B, d)``.
        forwards: which forwards of a measurement step are accumulated. ``"all"`` (the default):
            every forward the user runs, in training or eval mode, with or without grad (a held-out
            batch under ``torch.no_grad()`` is measured like a training batch). ``"training"``: only
            forwards while ``model.training`` is True, so that validation and evaluation loops
            (which call ``model.eval()``) stay out of the measurement; grad mode does not matter
            (``torch.utils.checkpoint(..., use_reentrant=True)`` runs the training forward under
            no_grad). The framework callbacks use ``"training"``. Either way, the forward that
            gradient checkpointing reruns inside backward is not counted: every row counts once.
        host_threads: solve the measurement's eigenvalue problems (the exact spectra of the weights'
            and embeddings' fp64 Grams) on this many host CPU threads, one matrix per thread and
            one LAPACK thread each (:func:`fastrank.rank.eigensolver.on_host`), instead of on the
            device the matrices are on. For a model on a GPU the Grams are still formed there (one
            fp64 product each), then copied to pinned host memory, and the GPU's share of a
            measurement is those products and copies: the eigensolvers, which take most of its GPU
            time, run on the host, beside the loop's work rather than between its kernels.
            ``fastrank.rank.eigensolver.default_host_threads()`` (half the CPUs this process may
            use) leaves the other half to the loop and its data loading. Default None: the
            device's solver (cuSOLVER's batched one on CUDA). The results agree to fp64 rounding.

    Every argument is checked here: an unknown method, a sketch size below 1, a token dim other
    than 0 or 1, a model that is not an ``nn.Module`` or an embedding name that is not one of its
    modules raise at construction, naming the argument, the expected and the given value. Outputs
    or weights that are not finite (NaN or Inf, a diverged run) raise at the measurement, naming
    the module and the step.

    ``torch.compile``: the hooks are traced as calls of ``fastrank::track_output``, which accumulate
    when the compiled graph runs (no graph break, no added graph, none per new tracker). By default
    torch.compile does not guard on a hook added to a module that had none, and a model compiled
    without it would run on without it: the first tracker with embeddings turns Dynamo's hook
    guards on for the process and drops the code compiled before (see ``_guard_module_hooks``).
    ``torch.export`` leaves the tracker out.

    Sharded models (FSDP2, tensor parallel): DTensor weights are measured without gathering them
    (:mod:`fastrank.sharded`), in ``step()`` on the calling thread also with ``background=True``
    (their all-reduces must run in the same order on every rank); over-parameterized layers whose
    factors are sharded gather the factors for their collapsed weight.

    Use::

        tracker = RankTracker(model, embeddings=("encoder",), every=100)
        for batch in loader:
            loss = model(batch).sum(); loss.backward(); opt.step()
            tracker.step()          # measures on steps 0, 100, 200, ... and records history

    ``compute()`` measures now from what was accumulated; ``history`` holds every measurement,
    ``to_csv`` / ``to_json`` / ``log`` export it; ``remove()`` takes the hooks away.
    """

    def __init__(
        self,
        model: nn.Module,
        embeddings: Iterable[str] = (),
        weights: bool = True,
        every: int = 100,
        method: str = "auto",
        center: bool = False,
        sketch_threshold: int = 4096,
        sketch_size: int = 512,
        seed: int = 0,
        process_group=None,
        background: bool = False,
        num_classes: int | None = None,
        token_rate: float | None = None,
        token_dim: int = 1,
        forwards: str = "all",
        host_threads: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RankTracker: model must be a torch.nn.Module, got {type(model).__name__}")
        embeddings = embedding_names(embeddings)
        check_options("RankTracker", {
            "embeddings": embeddings, "weights": weights, "every": every, "method": method, "center": center,
            "sketch_threshold": sketch_threshold, "sketch_size": sketch_size, "seed": seed,
            "background": background, "num_classes": num_classes, "token_rate": token_rate,
            "token_dim": token_dim, "forwards": forwards, "host_threads": host_threads,
        })
        modules = dict(model.named_modules())
        for name in embeddings:
            if name not in modules:
                raise ValueError(f"RankTracker: embeddings: no module named {name!r} in the model{_what_it_is(model, name)}; "
                                 f"known names include {sorted(n for n in modules if n)[:8]}")
        self.model = model
        self.forwards = forwards
        self.weights = weights
        self.every = every
        self.method = method
        self.center = center
        self.process_group = process_group
        self.host_threads = host_threads
        self.step_count = 0
        self._history: list[dict[str, Any]] = []
        self._executor = ThreadPoolExecutor(max_workers=1) if background else None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # the worker's, per CUDA device
        self._pending: list[tuple[int, Future]] = []
        self._polled = 0  # rows of _history already handed out by poll()
        self.num_classes = num_classes
        self.token_rate, self.token_dim, self.seed = check_token_rate(token_rate), token_dim, seed
        self._labels: Tensor | None = None
        self._class_stats: dict[str, ClassStatistics] = {}
        self._accumulators = {
            name: _EmbeddingAccumulator(sketch_threshold, sketch_size, seed) for name in embeddings
        }
        # Held while a hook accumulates: nn.DataParallel runs its replicas' forwards (and so the
        # hooks, which replicas share) on a thread each.
        self._lock = threading.Lock()
        self._key = next(_TRACKER_KEYS)
        _TRACKERS[self._key] = self
        with torch.inference_mode(False):  # made under inference_mode, AOTAutograd could not write it back
            self._key_tensor = torch.tensor(self._key)  # what a compiled graph's fastrank::track_output names it by
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in embeddings
        ]
        if self._handles:
            import torch._dynamo as dynamo  # (not `import torch._dynamo`: torch would be local to __init__)

            dynamo.disable(_guard_module_hooks)()

    # ---- accumulation -----------------------------------------------------------------------

    @property
    def measuring(self) -> bool:
        """Whether the current step is a measurement step (hooks accumulate)."""
        return self.step_count % self.every == 0

    def _counts(self, training: bool | None = None) -> bool:
        """Whether the forward running now is accumulated (see ``forwards``); ``training``: the
        model's mode, where the caller knows it better than ``model.training`` now does."""
        if not self.measuring or _in_backward():
            return False
        return self.forwards == "all" or (self.model.training if training is None else training)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            replica = module.__dict__.get("_is_replica", False)
            if torch.compiler.is_compiling():  # traced: the accumulation runs with the graph
                first = first_output(output)
                if isinstance(first, Tensor) and not _exporting():
                    torch.ops.fastrank.track_output(first, self._key_tensor, name, self.model.training, replica)
                return
            self._accumulate(name, output, replica)

        return hook

    def _accumulate(self, name: str, output: Any, replica: bool = False, training: bool | None = None) -> None:
        """Fold the output of module ``name`` into its accumulators if this forward counts
        (:meth:`_counts`, ``training`` the model's mode if given); ``replica``: the module is an
        ``nn.DataParallel`` replica."""
        if not self._counts(training):
            return
        output = select_tokens(output, self.token_rate, self.seed, self.step_count, self.token_dim)
        rows = _rows(output)
        if rows is None:
            return
        if replica:
            rows = self._replica_rows(name, rows)
        # Not in inference mode (a forward under torch.inference_mode): accumulators made there
        # would be inference tensors, which a later forward outside it may not add to.
        with self._lock, torch.no_grad(), torch.inference_mode(False):
            self._accumulators[name].add(rows)
            if self.num_classes is not None:
                self._add_classes(name, rows)

    def _replica_rows(self, name: str, rows: Tensor) -> Tensor:
        """The rows of an ``nn.DataParallel`` replica of module ``name`` (one slice of the batch,
        on the replica's device) on the model's device, where every replica's rows are summed."""
        if self.num_classes is not None:
            raise ValueError(
                f"RankTracker(num_classes={self.num_classes}): module {name!r} runs in an nn.DataParallel replica, "
                "which sees one slice of the batch that set_labels() labelled, and which slice is not known here; "
                "use DistributedDataParallel (one process per GPU, each calling set_labels with its own batch)"
            )
        home = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return rows.detach().to(home.device) if home is not None else rows

    def set_labels(self, labels: Tensor) -> None:
        """The class of each sample of the next forward (``(B,)`` integers), for ``num_classes``.

        Outputs with more rows than samples (``(B, T, d)`` tokens, ``(B, C, H, W)`` maps) give every
        row of a sample its label.
        """
        if self.num_classes is None:
            raise ValueError("set_labels needs RankTracker(..., num_classes=C)")
        self._labels = _check_labels(labels, None, self.num_classes).detach()

    def _add_classes(self, name: str, rows: Tensor) -> None:
        labels = self._labels
        if labels is None:
            raise ValueError("RankTracker(num_classes=...): call set_labels(labels) before the forward of a measurement step")
        if labels.numel() == 0 or rows.shape[0] % labels.numel():
            raise ValueError(
                f"RankTracker: module {name!r} gave {rows.shape[0]} rows for {labels.numel()} labels; "
                "expected a whole number of rows per sample"
            )
        labels = labels.to(rows.device).repeat_interleave(rows.shape[0] // labels.numel())
        if name not in self._class_stats:
            self._class_stats[name] = ClassStatistics(self.num_classes, rows.shape[1], device=rows.device)
        self._class_stats[name].add(rows, labels)

    def step(self, record_as: int | None = None) -> dict[str, dict[str, float]] | None:
        """End the current step: measure and record it if it is a measurement step, then advance.

        Args:
            record_as: the step number the measurement is recorded under in ``history`` (and
                ``poll``), e.g. a training framework's global step, so that every output uses the
                framework's numbering; default: the tracker's own count (0, 1, ...). Which steps
                are measured depends only on the tracker's count (``every``).
        Returns the measurement, or None (not a measurement step, or ``background=True``).
        """
        result = None
        if self.measuring:
            label = self.step_count if record_as is None else int(record_as)
            if self._executor is None:
                result = self.compute(record_as=label)
            else:
                measure = self._on_own_stream(self._snapshot(copy=True))
                self._pending.append((label, self._executor.submit(measure)))
            for acc in self._accumulators.values():
                acc.reset()
            self._class_stats = {}
        self.step_count += 1
        return result

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measurement so far, one row per (step, name): ``{"step", "name", <metrics>}``."""
        self.flush()
        return self._history

    def flush(self) -> None:
        """Wait for the background measurements still running and record them (in step order).

        An error raised by one of them is raised here.
        """
        while self._pending:
            step, future = self._pending.pop(0)
            self._record(step, future.result())

    def poll(self) -> list[tuple[int, dict[str, dict[str, float]]]]:
        """Measurements recorded since the previous ``poll()``, without waiting: ``[(step, {name:
        metrics})]`` in step order. Background measurements that have finished are recorded first
        (in step order; one still running holds back the later ones). For loggers and callbacks.
        """
        while self._pending and self._pending[0][1].done():
            step, future = self._pending.pop(0)
            self._record(step, future.result())
        fresh = self._history[self._polled :]
        self._polled = len(self._history)
        measurements: dict[int, dict[str, dict[str, float]]] = {}
        for row in fresh:
            metrics = {key: value for key, value in row.items() if key not in ("step", "name")}
            measurements.setdefault(row["step"], {})[row["name"]] = metrics
        return list(measurements.items())

    # ---- measurement ------------------------------------------------------------------------

    @torch.no_grad()
    def _embedding_metrics(self, name: str, step: int, omega: Tensor | None, totals: tuple[Tensor, ...]) -> dict[str, float]:
        """Metrics of embedding ``name`` from its (reduced) totals; ``omega`` is the sketch matrix, or None."""
        gram, column_sum, square_sum, count = totals
        if not math.isfinite(float(square_sum)):  # ||X||_F^2 in fp64: NaN or Inf exactly when a row is
            raise ValueError(
                f"RankTracker: the outputs of module {name!r} are not finite (NaN or Inf) in the forwards of "
                f"measurement step {step} ({int(count)} rows accumulated): the model diverged or its input is not finite"
            )
        if self.center:
            mean = column_sum / count.clamp_min(1)
            right = mean @ omega if omega is not None else mean
            gram = gram - torch.outer(column_sum, right)
            square_sum = square_sum - column_sum @ mean
        if omega is not None:
            bounds = nystrom_entropy(gram, omega, square_sum, return_bounds=True)
            metrics = {
                "effective_rank": math.exp(float(bounds.estimate)),
                "spectral_entropy": float(bounds.estimate),
                "effective_rank_lower": math.exp(float(bounds.lower)),
                "effective_rank_upper": math.exp(float(bounds.upper)),
            }
        else:
            values = rank_metrics(gram, hermitian=True, method=self.method)
            metrics = {key: float(value) for key, value in values.items()}
        metrics["samples"] = float(count)
        return metrics

    @torch.no_grad()
    def _weights(self, copy: bool) -> tuple[list[str], list[Tensor]]:
        """Names and 2-D weights of the measured layers (copies with ``copy``, for a later measurement)."""
        # No grad: over-parameterized layers serve their cached collapsed weight, no graph is built.
        names, matrices = [], []
        skip_inside: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in skip_inside):
                continue
            matrix = weight_matrix(module)
            if matrix is None:
                continue
            if isinstance(module, _OverparamBase):
                skip_inside.append(name)
            names.append(name)
            matrices.append(matrix.clone() if copy else matrix)
        return names, matrices

    @torch.no_grad()
    def _weight_metrics(self, step: int, names: list[str], matrices: list[Tensor]) -> dict[str, dict[str, float]]:
        if not matrices:
            return {}
        for name, matrix in zip(names, matrices):
            if not is_sharded(matrix) and not bool(torch.isfinite(matrix).all()):
                raise ValueError(
                    f"RankTracker: the weight of module {name!r} is not finite (NaN or Inf) at measurement step {step}"
                )
        measured = effective_ranks(
            matrices, metric="all", method=self.method, exact_tolerance=TRACKING_TOLERANCE
        )
        return {
            f"{name}.weight" if name else "weight": {key: float(v) for key, v in values.items()}
            for name, values in zip(names, measured)
        }

    def compute(self, record_as: int | None = None) -> dict[str, dict[str, float]]:
        """Measure now: ``{name: {"effective_rank", "spectral_entropy", "stable_rank", ...}}``.

        Embedding entries carry ``"samples"`` (rows seen, summed over ranks); embeddings wider than
        ``sketch_threshold`` report ``"effective_rank_lower"`` / ``"effective_rank_upper"`` (bounds
        from the sketch and the exact trace, see :func:`fastrank.rank.nystrom_entropy`) instead of
        ``"stable_rank"``. Weight entries are named ``"<module>.weight"``. The measurement is
        appended to ``history`` with its step (``record_as``, default the current step count).
        Under ``torch.distributed`` every rank must call it (it all-reduces).
        """
        self.flush()
        results = self._snapshot(copy=False)()
        self._record(self.step_count if record_as is None else int(record_as), results)
        return results

    def _snapshot(self, copy: bool) -> Callable[[], dict[str, dict[str, float]]]:
        """Everything a measurement needs, taken now; returns the function that measures it.

        The all-reduces happen here, on the calling thread, so that every rank issues them in the
        same order; ``copy`` copies the weights, which the optimizer changes in place afterwards
        (the accumulators are handed over as they are: ``reset`` starts new ones).
        """
        step = self.step_count
        embeddings = [
            (name, acc.omega, acc.totals(self.process_group))
            for name, acc in self._accumulators.items()
            if acc.gram is not None
        ]
        classes = {name: stats.reduced(self.process_group) for name, stats in self._class_stats.items()}
        weights = self._weights(copy) if self.weights else ([], [])
        measured = {}
        if any(is_sharded(matrix) for matrix in weights[1]):  # their collectives run here, in rank order
            with self._solver():
                measured, weights = self._weight_metrics(step, *weights), ([], [])

        def measure() -> dict[str, dict[str, float]]:
            with self._solver():
                results = {name: self._embedding_metrics(name, step, omega, totals) for name, omega, totals in embeddings}
                for name, stats in classes.items():
                    results[name].update({k: v for k, v in stats.metrics().items() if k != "samples"})
                results.update(self._weight_metrics(step, *weights))
            results.update(measured)
            return results

        return measure

    def _solver(self) -> contextlib.AbstractContextManager:
        """Where the spectra of a measurement are solved: on ``host_threads`` host threads, or on
        the matrices' device."""
        return contextlib.nullcontext() if self.host_threads is None else on_host(self.host_threads)

    def _on_own_stream(self, measure: Callable[[], Measurement]) -> Callable[[], Measurement]:
        """``measure`` for the worker thread. For a model on one CUDA device it runs on a stream of
        its own, after what the calling thread's stream has queued so far (the snapshot's copies
        and reductions), and synchronizes that stream before returning, so that the snapshot's
        tensors are freed only after their last use: on the training loop's stream its kernels
        queued between the loop's (on an H200 a 336 M-parameter bf16 loop paid 0.91 s of 1.2 s of
        background measuring, 10.5%, benchmarks/results/h200/README.md)."""
        devices = {p.device for p in self.model.parameters() if p.is_cuda}
        if len(devices) != 1:
            return measure
        device = devices.pop()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        ready = torch.cuda.current_stream(device).record_event()

        def run() -> Measurement:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                try:
                    return measure()
                finally:
                    stream.synchronize()

        return run

    def _record(self, step: int, results: dict[str, dict[str, float]]) -> None:
        for name, metrics in results.items():
            self._history.append({"step": step, "name": name, **metrics})

    # ---- export -------------------------------------------------------------------------------

    def to_csv(self, path: str) -> None:
        """Write ``history`` as CSV: one row per (step, name), a column per metric."""
        columns = ["step", "name"]
        for row in self.history:
            columns += [key for key in row if key not in columns]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)

    def to_json(self, path: str) -> None:
        """Write ``history`` as a JSON list of rows."""
        with open(path, "w") as f:
            json.dump(self.history, f, indent=1)

    def log(self, writer: Any, step: int | None = None) -> None:
        """Send the latest measurement to a SummaryWriter-like object (anything with ``add_scalar``).

        Tags are ``rank/<name>/<metric>``; ``step`` defaults to the measurement's step.
        """
        if not self.history:
            return
        latest = self.history[-1]["step"]
        rows = []
        for row in reversed(self.history):
            if row["step"] != latest:
                break
            rows.append(row)
        for row in reversed(rows):
            for key, value in row.items():
                if key in ("step", "name") or not isinstance(value, (int, float)) or math.isnan(value):
                    continue
                writer.add_scalar(f"rank/{row['name']}/{key}", value, latest if step is None else step)

    def plot(self, path: str, metric: str = "effective_rank") -> None:
        """Draw ``metric`` against step for every measured module and write it to ``path``.

        One line per module up to a dozen modules, a heat map (module x step) beyond; needs
        matplotlib (``pip install "fastrank[plot]"``). See :func:`fastrank.plot.plot_history`.
        """
        from .plot import plot_history

        plot_history(self.history, path, metric=metric)

    def remove(self) -> None:
        """Remove the forward hooks and finish the background measurements; the history stays."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _TRACKERS.pop(self._key, None)  # compiled graphs that still call its op call nothing
        self.flush()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
