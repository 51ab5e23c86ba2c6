"""Rank tracking inside the training frameworks users already run.

- :mod:`fastrank.integrations.lightning`: ``RankCallback`` for PyTorch Lightning's ``Trainer``
  (``pip install "fastrank[lightning]"``).
- :mod:`fastrank.integrations.transformers`: ``RankCallback`` for Hugging Face's ``Trainer``
  (``pip install "fastrank[transformers]"``).

Importing ``fastrank`` (or this package) imports neither framework; each submodule imports its
own and raises an ImportError naming the extra when it is missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def metric_items(results: dict[str, dict[str, Any]], prefix: str) -> dict[str, float]:
    """``{name: {metric: value}}`` -> ``{"<prefix>/<name>/<metric>": value}``, finite numbers only."""
    return {
        f"{prefix}/{name}/{key}": float(value)
        for name, values in results.items()
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def tracker_options(embeddings: Iterable[str] | str, **options: Any) -> dict[str, Any]:
    """Keyword arguments of ``RankTracker`` from a callback's arguments (one place for both callbacks)."""
    return {"embeddings": (embeddings,) if isinstance(embeddings, str) else tuple(embeddings), **options}
