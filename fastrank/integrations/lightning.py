"""``RankCallback`` for PyTorch Lightning: effective rank of embeddings and weights while ``fit`` runs.

Works with the ``lightning`` package (``lightning.pytorch``) and, where that is not installed, with
``pytorch_lightning``; use the callback with the Trainer of the same package.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError(
            "fastrank.integrations.lightning needs PyTorch Lightning, which is not installed: "
            'pip install "fastrank[lightning]" (or pip install lightning)'
        ) from None

from . import TrackerCallback

__all__ = ["RankCallback"]


class RankCallback(TrackerCallback, Callback):
    """Measure effective rank during ``Trainer.fit`` and log it through the Trainer's loggers.

    The callback owns a :class:`fastrank.RankTracker` on the LightningModule, steps it after every
    training batch (``on_train_batch_end``), and sends each measurement to every logger of the
    Trainer (``logger.log_metrics``) as ``rank/<module name>/<metric>`` (metrics:
    ``effective_rank``, ``spectral_entropy``, ``stable_rank``, ``samples`` for embeddings, bounds
    for sketched ones), at the Trainer's ``global_step`` when the measurement was taken (the
    optimizer steps done, counting the one of that batch). Under DDP every process
    steps its tracker (the accumulators are all-reduced) and Lightning's loggers write on rank 0.

    Args:
        embeddings: names of modules of the LightningModule (``dict(module.named_modules())`` keys)
            whose outputs are measured.
        weights: also measure the weight of every linear / conv / over-parameterized layer.
        every: measure every ``every`` training batches (batches 0, every, 2*every, ...).
        method, center, background: as for :class:`fastrank.RankTracker`; ``background=True``
            computes spectra on a worker thread and logs each measurement when it is ready.
        prefix: first part of every logged name.
        **tracker_options: further ``RankTracker`` arguments (``sketch_threshold``, ``seed``, ...).

    After ``fit``, ``callback.tracker.history`` holds every measurement (``to_csv``, ``plot``) of
    that ``fit``: a reused callback starts a new tracker for each.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step(trainer.global_step)
        self._log(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.tracker.flush()
        self._log(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.tracker is not None:
            self._finish()

    def _log(self, trainer) -> None:
        for global_step, metrics in self._ready(trainer.global_step):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=global_step)
