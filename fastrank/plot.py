"""Rank over training steps, drawn from ``RankTracker.history`` rows (or their CSV / JSON export).

Few modules: one line per module against step. Many modules (more than
:data:`MAX_LINES`): a heat map of module x step, which stays readable for hundreds of modules.
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._extras import pyplot

__all__ = ["HISTORY_FORMATS", "MAX_LINES", "load_history", "plot_history"]

# Above this many modules a line plot's legend and colours stop being told apart: heat map.
MAX_LINES = 12


# What `fastrank plot` and load_history read, named in every error about a file that is not one.
HISTORY_FORMATS = (
    "the CSV written by RankTracker.to_csv (a header row with step and name columns), the JSON "
    "list of rows written by RankTracker.to_json, a Lightning CSVLogger metrics.csv or a Hugging "
    "Face trainer_state.json holding the rank callbacks' <prefix>/<name>/<metric> values"
)


def _logged_key(key: str) -> tuple[str, str] | None:
    """``(name, metric)`` of a callback's logged key ``<prefix>/<name>/<metric>``, else None."""
    parts = key.split("/")
    if len(parts) < 3:  # also <prefix>/step
        return None
    return "/".join(parts[1:-1]), parts[-1]


def _from_logged(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History rows from a framework's logged records (Lightning CSV rows, Hugging Face
    ``log_history``): each ``<prefix>/<name>/<metric>`` value goes to the row of its name at the
    step it was measured (``<prefix>/step`` where logged, else the record's ``step``)."""
    rows: dict[tuple[float, str], dict[str, Any]] = {}
    for record in records:
        logged = {key: value for key, value in record.items() if _logged_key(key) and value not in ("", None)}
        if not logged:
            continue
        measured = [v for k, v in record.items() if k.endswith("/step") and k.count("/") == 1 and v not in ("", None)]
        step = float(measured[0] if measured else record["step"])
        for key, value in logged.items():
            name, metric = _logged_key(key)
            rows.setdefault((step, name), {"step": step, "name": name})[metric] = float(value)
    return sorted(rows.values(), key=lambda row: (row["step"], row["name"]))


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path``; ValueError saying how it differs from a history."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or ())
            if "step" in fields and "name" not in fields and any(_logged_key(k) for k in fields):
                return _from_logged(list(reader))  # a Lightning CSVLogger metrics.csv
            if not {"step", "name"} <= fields:
                raise ValueError(f"its header row is {reader.fieldnames}" if reader.fieldnames else "it is empty")
            return [
                {key: value if key == "name" or value in ("", None) else _number_or_text(value)
                 for key, value in row.items()}
                for row in reader
            ]
    with open(path) as f:
        rows = json.load(f)
    if isinstance(rows, Mapping) and isinstance(rows.get("log_history"), list):  # trainer_state.json
        records = [r for r in rows["log_history"] if isinstance(r, Mapping) and "step" in r]
        return _from_logged(records)
    if not isinstance(rows, list):
        raise ValueError(f"the JSON holds a {type(rows).__name__}, not a list of rows")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {index} is {str(row)[:80]}, not an object")
        missing = [key for key in ("step", "name") if key not in row]
        if missing:
            raise ValueError(f"row {index} is {str(row)[:80]}, without {' and '.join(missing)}")
    return rows


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by ``RankTracker.to_csv`` (``.csv``) or ``RankTracker.to_json`` (anything else),
    or logged by the rank callbacks: a Lightning ``CSVLogger`` ``metrics.csv`` and a Hugging Face
    ``trainer_state.json`` (``log_history``), whose ``<prefix>/<name>/<metric>`` values become the
    rows of their step (``<prefix>/step``, the step measured, where logged).

    Returns:
        ``[{"step": float, "name": str, <metric>: float, ...}, ...]``; CSV cells that are not
        numbers stay strings, empty CSV cells stay ``""``.

    Raises:
        ValueError: the file is not such a history (not UTF-8 text, not CSV / JSON, or rows
            without ``step`` and ``name``); the message names the file and :data:`HISTORY_FORMATS`.
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        return _read_rows(path)
    except UnicodeDecodeError as error:
        detail = f"not UTF-8 text: {error.reason} at byte {error.start}"
    except json.JSONDecodeError as error:
        detail = (
            f"not JSON: {error.msg} at line {error.lineno} column {error.colno}; a name not ending "
            f"in .csv is read as JSON"
        )
    except (csv.Error, ValueError) as error:
        detail = str(error)
    raise ValueError(f"{path} is not a RankTracker history ({detail}); expected {HISTORY_FORMATS}")


def plot_history(rows: Iterable[Mapping[str, Any]], path: str | Path, metric: str = "effective_rank") -> None:
    """Draw ``metric`` against step for every module in ``rows`` and write the figure to ``path``.

    Args:
        rows: ``{"step", "name", <metric>: value, ...}`` rows, as in ``RankTracker.history``.
        path: output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        metric: the column to draw (``effective_rank``, ``spectral_entropy``, ``stable_rank``, ...).

    Raises:
        ValueError: no row carries ``metric`` (the message lists the metrics present).
        fastrank._extras.MissingExtra: matplotlib is not installed.
    """
    rows = [row for row in rows]
    series: dict[str, dict[float, float]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            continue
        series.setdefault(str(row["name"]), {})[float(row["step"])] = float(value)
    if not series:
        present = sorted({key for row in rows for key in row if key not in ("step", "name")})
        raise ValueError(f"no row has a value for metric {metric!r}; the rows have {present}")
    plt = pyplot("plotting rank history")
    names = list(series)
    steps = sorted({step for values in series.values() for step in values})
    if len(names) <= MAX_LINES:
        fig, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
        for name in names:
            xs = sorted(series[name])
            axis.plot(xs, [series[name][x] for x in xs], marker="o", markersize=3, label=name)
        axis.set_xlabel("step")
        axis.set_ylabel(metric.replace("_", " "))
        axis.legend(fontsize=7, loc="best")
        axis.grid(alpha=0.3)
    else:
        import numpy as np

        grid = np.full((len(names), len(steps)), np.nan)
        column = {step: j for j, step in enumerate(steps)}
        for i, name in enumerate(names):
            for step, value in series[name].items():
                grid[i, column[step]] = value
        height = min(0.5 + 0.16 * len(names), 40.0)
        fig, axis = plt.subplots(figsize=(9, max(height, 3.0)), dpi=100)
        image = axis.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        axis.set_yticks(range(len(names)), names, fontsize=max(3, min(7, 400 // len(names))))
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)
        axis.set_xticks(ticks, [f"{steps[t]:g}" for t in ticks], fontsize=7)
        axis.set_xlabel("step")
        fig.colorbar(image, ax=axis, label=metric.replace("_", " "))
    axis.set_title(f"{metric.replace('_', ' ')} of {len(names)} modules over {len(steps)} measurements", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
