"""``RankCallback`` for Hugging Face ``transformers.Trainer``: effective rank while ``train`` runs.

GPT-2's ``Conv1D`` layers (weights stored ``(in, out)``) are measured like ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError(
        "fastrank.integrations.transformers needs Hugging Face transformers, which is not installed: "
        'pip install "fastrank[transformers]" (or pip install transformers)'
    ) from None

from ..tracking import RankTracker
from . import metric_items, tracker_options

__all__ = ["RankCallback"]


class RankCallback(TrainerCallback):
    """Measure effective rank during ``Trainer.train`` and put it into the Trainer's log.

    The callback owns a :class:`fastrank.RankTracker` on the model (created at ``on_train_begin``),
    steps it after every optimizer step (``on_step_end``) and logs each measurement as
    ``rank/<module name>/<metric>`` plus ``rank/step`` (the ``global_step`` it was taken at):

    - attached to the Trainer (``RankCallback(...).attach(trainer)``), through ``Trainer.log``:
      into ``trainer.state.log_history`` and to every reporting integration (TensorBoard, W&B, ...);
    - passed only as ``Trainer(callbacks=[...])`` (a callback is not given the Trainer), appended
      to ``state.log_history``, which the integrations do not see.

    Args: as for :class:`fastrank.integrations.lightning.RankCallback` (``every`` counts optimizer
    steps). After training, ``callback.tracker.history`` holds every measurement.
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
        **tracker_options_: Any,
    ) -> None:
        self.options = tracker_options(
            embeddings, weights=weights, every=every, method=method, center=center,
            background=background, **tracker_options_,
        )
        self.prefix = prefix
        self.trainer = None
        self.tracker: RankTracker | None = None
        self._global_steps: dict[int, int] = {}

    def attach(self, trainer) -> RankCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log`` (reaches integrations)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker is None:
            if model is None:
                raise ValueError("RankCallback: the Trainer passed no model to on_train_begin")
            self.tracker = RankTracker(model, **self.options)

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker.measuring:
            self._global_steps[self.tracker.step_count] = state.global_step
        self.tracker.step()
        self._log(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.flush()
        self._log(state)
        self.tracker.remove()

    def _log(self, state) -> None:
        for step, results in self.tracker.poll():
            metrics = metric_items(results, self.prefix)
            metrics[f"{self.prefix}/step"] = float(self._global_steps.pop(step, state.global_step))
            if self.trainer is not None:
                self.trainer.log(metrics)
            else:
                state.log_history.append({**metrics, "step": state.global_step})
