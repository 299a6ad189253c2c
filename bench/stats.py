"""Samples, their summary statistics and the benchmark table.

Nothing here judges a figure: a row holds what was measured (or why it could not be)
and the table shows it. Percentiles interpolate linearly between the two nearest ranks,
so with few samples p99 sits just under the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

COLUMNS = ("metric", "n", "min", "p50", "p99", "unit")
MISSING = "-"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated.

    Raises ValueError for no values or ``q`` outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    weight = position - low
    return float(ordered[low] * (1 - weight) + ordered[high] * weight)


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    p50: float
    p99: float
    mean: float
    max: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "min": self.min,
            "p50": self.p50,
            "p99": self.p99,
            "mean": self.mean,
            "max": self.max,
        }


def summarize(values: Sequence[float]) -> Summary | None:
    """min/p50/p99/mean/max of ``values``; None when there are none."""
    if not values:
        return None
    return Summary(
        n=len(values),
        min=float(min(values)),
        p50=percentile(values, 50),
        p99=percentile(values, 99),
        mean=float(sum(values) / len(values)),
        max=float(max(values)),
    )


def format_value(value: float | None, decimals: int) -> str:
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.{decimals}f}"


@dataclass
class Row:
    """One line of the table: a metric's samples, or the reason it has none."""

    metric: str
    unit: str
    decimals: int = 1
    samples: list[float] = field(default_factory=list)
    note: str | None = None

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    def summary(self) -> Summary | None:
        return summarize(self.samples)

    def cells(self) -> list[str]:
        stats = self.summary()
        if stats is None:
            return [self.metric, "0", MISSING, MISSING, MISSING, self.unit]
        return [
            self.metric,
            str(stats.n),
            format_value(stats.min, self.decimals),
            format_value(stats.p50, self.decimals),
            format_value(stats.p99, self.decimals),
            self.unit,
        ]

    def to_dict(self) -> dict[str, Any]:
        stats = self.summary()
        return {
            "metric": self.metric,
            "unit": self.unit,
            "samples": list(self.samples),
            "summary": stats.to_dict() if stats else None,
            "note": self.note,
        }


class Table:
    """The rows of one benchmark run, in the order they were declared."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self._by_metric: dict[str, Row] = {}

    def row(self, metric: str, unit: str, decimals: int = 1) -> Row:
        """The row named ``metric``, declared now if it is new (so order is stable)."""
        existing = self._by_metric.get(metric)
        if existing is not None:
            return existing
        created = Row(metric, unit, decimals)
        self.rows.append(created)
        self._by_metric[metric] = created
        return created

    def explain(self, rows: Iterable[Row], reason: str) -> None:
        """Attach ``reason`` to rows that lack samples (or say their samples are partial)."""
        for row in rows:
            if row.note:
                continue
            row.note = reason if not row.samples else f"partial: {reason}"

    def render(self, header: Sequence[str] = ()) -> str:
        """The header lines, then a pipe-separated table; a note column only if needed."""
        body = [row.cells() for row in self.rows]
        titles = list(COLUMNS)
        with_notes = any(row.note for row in self.rows)
        if with_notes:
            titles.append("note")
            for cells, row in zip(body, self.rows, strict=True):
                cells.append(row.note or "")
        widths = [max(len(t), *(len(c[i]) for c in body)) for i, t in enumerate(titles)]
        numeric = {1, 2, 3, 4}

        def line(cells: Sequence[str]) -> str:
            parts = [
                cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                for i, cell in enumerate(cells)
            ]
            return ("| " + " | ".join(parts) + " |").rstrip()

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        out = [*header]
        if header:
            out.append("")
        out += [line(titles), rule, *(line(cells) for cells in body)]
        return "\n".join(out)

    def to_dict(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.rows]
