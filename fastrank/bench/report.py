"""Result rows on screen and on disk: the table, the plot, JSON-safe numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._extras import MissingExtra, pyplot  # noqa: F401  (MissingExtra: the CLI catches it from here)

__all__ = ["ROW_FIELDS", "finite_or_none", "format_table", "plot_rows"]

# Columns of a result row besides the environment fields, in table order.
ROW_FIELDS = (
    "suite", "case", "variant", "baseline", "shape", "dtype", "device",
    "median_s", "q25_s", "q75_s", "repeats", "timer", "ratio", "ratio_to_floor", "tflops",
    "error", "bound_width", "bounds_contain_reference", "note",
)



# ----------------------------------------------------------------------------- output
def _milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cells(row: dict) -> list[str]:
    spread = (
        f"{_milliseconds(row['q25_s'])}-{_milliseconds(row['q75_s'])}" if row["q25_s"] is not None else "-"
    )
    bound = "-"
    if row.get("bound_width") is not None:
        percent = 100 * row["bound_width"]
        bound = f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"
        if row.get("bounds_contain_reference") is False:
            bound += " MISSES"
    return [
        row["case"],
        row["variant"],
        row["shape"],
        row["dtype"],
        _milliseconds(row["median_s"]),
        spread,
        f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
        f"{row['ratio_to_floor']:.2f}" if row.get("ratio_to_floor") is not None else "-",
        f"{row['tflops']:.3g}" if row["tflops"] is not None else "-",
        f"{row['error']:.1e}" if row.get("error") is not None else "-",
        bound,
    ]


TABLE_HEADER = [
    "case", "variant", "shape", "dtype", "median ms", "q25-q75 ms", "x base", "x floor", "TFLOP/s", "error",
    "bounds",
]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one block per suite; skipped variants are listed under their block."""
    lines = []
    for suite in dict.fromkeys(row["suite"] for row in rows):
        block = [row for row in rows if row["suite"] == suite]
        cells = [_cells(row) for row in block]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(TABLE_HEADER)]
        numeric = range(4, len(TABLE_HEADER))

        def line(values):
            return "  ".join(
                v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
            ).rstrip()

        lines.append(f"suite {suite}")
        lines.append(line(TABLE_HEADER))
        lines.append("-" * len(line(TABLE_HEADER)))
        previous = None
        for row, values in zip(block, cells):
            if previous is not None and row["case"] != previous:
                lines.append("")
            previous = row["case"]
            lines.append(line(values))
        notes = dict.fromkeys(
            f"{row['case']} / {row['variant']}: {row['note']}"
            for row in block
            if row["note"] and row["median_s"] is None
        )
        lines += [f"  skipped {note}" for note in notes]
        lines.append("")
    lines.append(
        "x base: median time / the baseline's median in the same run (the first row of each case; "
        "below 1 is faster). x floor: the same against the case's floor (marked \"(floor)\": the least "
        "work any method must do on this machine, e.g. one matmul of the same FLOPs, or fp64 eigvalsh "
        "of the same Gram), which moves less between machines than x base. error: relative error against the exact or fp64 reference; "
        "bounds: width of the returned interval, relative to the estimate."
    )
    return "\n".join(lines)


def _pyplot():
    return pyplot("--plot")


def plot_rows(rows: Sequence[dict], path: str) -> None:
    """Horizontal bars of each variant's time relative to its case's baseline, log scale, per suite."""
    plt = _pyplot()
    timed = [row for row in rows if row["ratio"] is not None]
    suites = list(dict.fromkeys(row["suite"] for row in timed))
    counts = [sum(row["suite"] == s for row in timed) for s in suites]
    fig, axes = plt.subplots(
        len(suites), 1, figsize=(9, 1.2 + 0.19 * sum(counts) + 0.6 * len(suites)),
        gridspec_kw={"height_ratios": counts}, squeeze=False, dpi=90,
    )
    variants = list(dict.fromkeys(row["variant"] for row in timed))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(variants)}
    for axis, suite in zip(axes[:, 0], suites):
        block = [row for row in timed if row["suite"] == suite]
        positions, labels, position = [], [], 0.0
        previous = None
        for row in block:
            if previous is not None and row["case"] != previous:
                position += 0.6
            previous = row["case"]
            positions.append(position)
            labels.append(f"{row['case']}  {row['variant']}")
            position += 1
        ratios = [row["ratio"] for row in block]
        axis.barh(positions, ratios, color=[colors[row["variant"]] for row in block], height=0.8)
        axis.set_xscale("log")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_yticks(positions, labels, fontsize=7)
        axis.invert_yaxis()
        for y, ratio in zip(positions, ratios):
            axis.text(ratio, y, f" {ratio:.2g}", va="center", fontsize=6)
        low, high = min(ratios), max(ratios)
        axis.set_xlim(min(low, 1.0) / 1.5, max(high, 1.0) * 3)
        axis.set_title(f"suite {suite}: time / baseline time (first bar of each case; log scale)", fontsize=9)
        axis.tick_params(axis="x", labelsize=7)
    env = rows[0]
    fig.suptitle(
        f"fastrank {env.get('fastrank')} bench on {env.get('device_name')}, torch {env.get('torch')}, "
        f"{str(env.get('date'))[:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf/NaN: map them to None."""
    if value is None or not isinstance(value, float):
        return value
    return value if math.isfinite(value) else None

