"""Class-conditional geometry of embeddings: the quantities that explain rank collapse.

For embeddings h_i (N x d) with integer labels y_i, mu_c the mean of class c, mu_G the mean of all N
samples and C the number of classes with at least one sample (Papyan, Han & Donoho 2020):

- ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (within-class covariance),
- ``Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T`` (between-class covariance),
- ``nc1 = tr(Sigma_W Sigma_B^+) / C`` with ``^+`` the pseudo-inverse: within-class variability
  relative to the spread of the class means (0 at full neural collapse);
- ``ncc_accuracy``: the fraction of samples whose nearest class mean (Euclidean) is their own;
- ``class_mean_effective_rank``: effective rank (exp of the spectral entropy of the singular values)
  of the C x d matrix of centered class means ``mu_c - mu_G`` (C - 1 for a simplex of equal,
  equiangular means).

Everything is accumulated in float64 from sufficient statistics (per-class counts and sums, the d x
d scatter ``sum_i h_i h_i^T``), so the within-class and between-class parts stream over batches and
sum across ``torch.distributed`` ranks (O(C d + d^2) traffic): :class:`ClassStatistics`.
Degenerate cases: a class without samples is left out of C (``empty_classes`` counts those below
``num_classes``); with one class ``nc1`` is NaN (no between-class spread to compare with),
``ncc_accuracy`` is 1 and ``class_mean_effective_rank`` is 0; d > N is fine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .rank import effective_rank

__all__ = ["ClassStatistics", "class_metrics"]

# Rows per block of the nearest-class-center search: bounds the (rows, C) distance matrix.
_NCC_BLOCK = 65536


def _check_labels(labels: Tensor, rows: int | None, num_classes: int | None) -> Tensor:
    """``labels`` as int64 after checking type, length (when ``rows`` is given) and range."""
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        got = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be a 1-D integer tensor, got {got}")
    if rows is not None and labels.shape[0] != rows:
        raise ValueError(f"labels has {labels.shape[0]} entries, expected one per embedding row ({rows})")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={num_classes}")
    return labels.long()


class ClassStatistics:
    """Streaming float64 sums from which ``nc1`` and the class-mean rank follow exactly.

    Args:
        num_classes: C_max; labels must lie in ``[0, num_classes)``.
        dim: d, the feature size.
        device: where the sums live.

    ``add(rows, labels)`` folds a batch in; ``reduced(group)`` is a copy summed across ranks (every
    rank must call it); ``metrics()`` gives ``{"nc1", "class_mean_effective_rank",
    "classes", "samples"}``.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)  # (C,)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)  # (C, d)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (d, d) sum h h^T

    def add(self, rows: Tensor, labels: Tensor) -> None:
        """Fold in ``rows`` (N, d) with their ``labels`` (N,)."""
        if rows.dim() != 2 or rows.shape[1] != self.sums.shape[1]:
            raise ValueError(f"rows must have shape (N, {self.sums.shape[1]}), got {tuple(rows.shape)}")
        labels = _check_labels(labels, rows.shape[0], self.num_classes).to(self.counts.device)
        rows = rows.detach().to(device=self.counts.device, dtype=torch.float64)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sums.index_add_(0, labels, rows)
        self.scatter.addmm_(rows.T, rows)

    def reduced(self, group=None) -> ClassStatistics:
        """A copy summed over the ranks of ``group`` when ``torch.distributed`` is initialized (three
        all-reduces; every rank must call it); the local sums stay as they are."""
        copy = ClassStatistics.__new__(ClassStatistics)
        copy.num_classes = self.num_classes
        copy.counts, copy.sums, copy.scatter = self.counts.clone(), self.sums.clone(), self.scatter.clone()
        if dist.is_available() and dist.is_initialized():
            for tensor in (copy.counts, copy.sums, copy.scatter):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return copy

    def class_means(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(means (C, d), counts (C,), global mean (d,))`` over the classes with samples."""
        present = self.counts > 0
        counts = self.counts[present]
        means = self.sums[present] / counts[:, None]
        total = self.counts.sum()
        if total == 0:
            raise ValueError("no samples were added")
        return means, counts, self.sums.sum(0) / total

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """``{"nc1", "class_mean_effective_rank", "classes", "empty_classes", "samples"}``."""
        means, counts, global_mean = self.class_means()
        samples = float(counts.sum())
        classes = means.shape[0]
        centered = means - global_mean  # (C, d)
        if classes < 2:
            nc1 = float("nan")
        else:
            # N Sigma_W = sum_i h h^T - sum_c n_c mu_c mu_c^T ; C Sigma_B = sum_c (mu_c - mu_G)(...)^T
            within = (self.scatter - (means.T * counts) @ means) / samples
            between = centered.T @ centered / classes
            nc1 = float(torch.trace(within @ torch.linalg.pinv(between, hermitian=True))) / classes
        return {
            "nc1": nc1,
            "class_mean_effective_rank": float(effective_rank(centered)),
            "classes": float(classes),
            "empty_classes": float(self.num_classes - classes),
            "samples": samples,
        }


def _ncc_accuracy(rows: Tensor, labels: Tensor, stats: ClassStatistics) -> float:
    means, _, _ = stats.class_means()
    present = torch.nonzero(stats.counts > 0).flatten()  # class id of each row of means
    mean_norms = means.square().sum(1)
    correct = 0
    for start in range(0, rows.shape[0], _NCC_BLOCK):
        block = rows[start : start + _NCC_BLOCK].to(torch.float64)
        distances = mean_norms[None, :] - 2.0 * block @ means.T  # + ||h||^2, the same for every class
        nearest = present[distances.argmin(1)]
        correct += int((nearest == labels[start : start + _NCC_BLOCK]).sum())
    return correct / rows.shape[0]


def _one(embeddings: Tensor, labels: Tensor, num_classes: int | None) -> dict[str, float]:
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must have shape (N, d), got {got}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings has no rows")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
    labels = _check_labels(labels, embeddings.shape[0], num_classes).to(embeddings.device)
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    stats = ClassStatistics(classes, embeddings.shape[1], device=embeddings.device)
    stats.add(embeddings, labels)
    result = stats.metrics()
    result["ncc_accuracy"] = _ncc_accuracy(embeddings.detach(), labels, stats)
    return result


def class_metrics(
    embeddings: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    labels: Tensor,
    num_classes: int | None = None,
) -> dict:
    """Neural-collapse metrics of labelled embeddings, in float64.

    Args:
        embeddings: ``(N, d)`` floating tensor, or several (one per layer, any d each) as a list or
            a dict of name -> tensor, all for the same N samples.
        labels: ``(N,)`` integer class of each row, in ``[0, num_classes)``.
        num_classes: the number of classes (default: ``labels.max() + 1``); classes without samples
            are left out and counted in ``empty_classes``.

    Returns:
        ``{"nc1", "ncc_accuracy", "class_mean_effective_rank", "classes", "empty_classes",
        "samples"}`` (floats) for one tensor; a list or dict of those for several. See the module
        docstring for the definitions.
    """
    if isinstance(embeddings, Mapping):
        return {name: _one(value, labels, num_classes) for name, value in embeddings.items()}
    if isinstance(embeddings, (list, tuple)):
        return [_one(value, labels, num_classes) for value in embeddings]
    return _one(embeddings, labels, num_classes)
