"""``RankCallback`` for Hugging Face ``transformers.Trainer``: effective rank while ``train`` runs.

GPT-2's ``Conv1D`` layers (weights stored ``(in, out)``) are measured like ``nn.Linear``.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
except ImportError:
    raise ImportError(
        "fastrank.integrations.transformers needs Hugging Face transformers, which is not installed: "
        'pip install "fastrank[transformers]" (or pip install transformers)'
    ) from None

from . import TrackerCallback

__all__ = ["RankCallback"]


class RankCallback(TrackerCallback, TrainerCallback):
    """Measure effective rank during ``Trainer.train`` and put it into the Trainer's log.

    The callback owns a :class:`fastrank.RankTracker` on the model (created at ``on_train_begin``),
    steps it after every optimizer step (``on_step_end``) and logs each measurement as
    ``rank/<module name>/<metric>`` plus ``rank/step`` (the ``global_step`` it was taken at):

    - attached to the Trainer (``RankCallback(...).attach(trainer)``), as ``Trainer.log`` does:
      into ``trainer.state.log_history`` and to every reporting integration (TensorBoard, W&B, ...),
      while the console (the Trainer's progress bar or printer) gets a short summary of each
      measurement (:meth:`summary`) instead of every key;
    - passed only as ``Trainer(callbacks=[...])`` (a callback is not given the Trainer), appended
      to ``state.log_history``, which the integrations do not see.

    Args: as for :class:`fastrank.integrations.lightning.RankCallback` (``every`` counts optimizer
    steps). After training, ``callback.tracker.history`` holds every measurement (of the
    latest ``train()``: a reused callback starts a new tracker for each).
    """

    trainer = None  # set by attach()

    def attach(self, trainer) -> RankCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log`` (reaches integrations)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker is None and model is None:
            raise ValueError("RankCallback: the Trainer passed no model to on_train_begin")
        self._start(model)

    def on_step_end(self, args, state, control, **kwargs):
        self._step(state.global_step)
        self._log(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.tracker.flush()
        self._log(state)
        self._finish()

    def summary(self, metrics: dict[str, float]) -> dict[str, float]:
        """What the console shows of a measurement: ``<prefix>/step``, each embedding's effective
        rank, and the mean effective rank of the weights with their count."""
        prefix = self.prefix
        shown = {f"{prefix}/step": metrics[f"{prefix}/step"]}
        weights = []
        for key, value in metrics.items():
            if not key.endswith("/effective_rank"):
                continue
            name = key[len(prefix) + 1 : -len("/effective_rank")]
            if name.endswith("weight"):
                weights.append(value)
            else:
                shown[key] = value
        if weights:
            shown[f"{prefix}/weights/mean_effective_rank"] = sum(weights) / len(weights)
            shown[f"{prefix}/weights/count"] = float(len(weights))
        return shown

    def _log(self, state) -> None:
        for measured_at, metrics in self._ready(state.global_step):
            metrics[f"{self.prefix}/step"] = float(measured_at)
            if self.trainer is None:
                state.log_history.append({**metrics, "step": state.global_step})
                continue
            # Trainer.log, but the console callbacks get the summary: 50 keys a measurement
            # would bury the training loss
            trainer = self.trainer
            if state.epoch is not None:
                metrics["epoch"] = state.epoch
            state.log_history.append({**metrics, "step": state.global_step})
            handler = trainer.callback_handler
            everyone = handler.callbacks
            console = [cb for cb in everyone if isinstance(cb, (PrinterCallback, ProgressCallback))]
            try:
                for group, logs in (([cb for cb in everyone if cb not in console], metrics), (console, self.summary(metrics))):
                    handler.callbacks = group
                    trainer.control = handler.on_log(trainer.args, state, trainer.control, logs)
            finally:
                handler.callbacks = everyone
