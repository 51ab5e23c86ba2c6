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
from collections.abc import Iterable, Iterator
from typing import Any

from ..tracking import RankTracker, check_options, embedding_names


class TrackerCallback:
    """What both framework callbacks share: a ``RankTracker`` built from the callback's arguments,
    stepped once per training step, and its measurements turned into ``<prefix>/<name>/<metric>``
    values with the framework step each was taken at. Mixed in before the framework's base class.

    The tracker accumulates training forwards only (``RankTracker(..., forwards="training")``):
    the sanity check, validation and evaluation loops run the model in eval mode and stay out of
    the measurement, and gradient checkpointing's recompute in backward counts no row twice. The
    arguments are checked here, at construction, with the errors ``RankTracker`` would raise.
    """

    def __init__(
        self,
        embeddings: Iterable[str] | str = (),
        weights: bool = True,
        every: int = 100,
        method: str = "auto",
        center: bool = False,
        background: bool = True,
        prefix: str = "rank",
        **tracker_options: Any,
    ) -> None:
        super().__init__()
        if "forwards" in tracker_options:
            raise ValueError(
                f"RankCallback: forwards={tracker_options['forwards']!r} given; the callback measures training "
                "forwards only (forwards='training'); use a RankTracker for other forwards"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"RankCallback: prefix must be a non-empty str, got {prefix!r}")
        self.options = {
            "embeddings": embedding_names(embeddings),
            "weights": weights, "every": every, "method": method, "center": center,
            "background": background, **tracker_options,
        }
        check_options("RankCallback", self.options)
        self.options["forwards"] = "training"
        self.prefix = prefix
        self.tracker: RankTracker | None = None
        self._finished = False  # the tracker's run ended (its hooks removed)

    def _start(self, model) -> None:
        """A tracker on ``model`` for the run that starts: a new one where a run already ended,
        as when the callback is reused (a second ``fit`` / ``train``, hyperparameter-search
        trials), whose tracker's hooks came off at its end; ``tracker`` is the latest run's."""
        if self.tracker is None or self._finished:
            self.tracker = RankTracker(model, **self.options)
            self._finished = False

    def _finish(self) -> None:
        """End the run: hooks off, background work finished; the history stays."""
        self.tracker.remove()
        self._finished = True

    def _step(self, global_step: int) -> None:
        """End a training step that the framework counts as ``global_step``."""
        self.tracker.step(record_as=global_step)  # the history numbers steps as the framework

    def _ready(self, global_step: int) -> Iterator[tuple[int, dict[str, float]]]:
        """``(framework step when measured, {"<prefix>/<name>/<metric>": value})`` of every
        measurement finished since the last call; finite numbers only."""
        for step, results in self.tracker.poll():
            metrics = {
                f"{self.prefix}/{name}/{key}": float(value)
                for name, values in results.items()
                for key, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            }
            yield step, metrics
