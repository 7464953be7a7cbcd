"""Statistics over rounds: each figure is measured once per round, a ratio
is taken within a round (both sides ran minutes apart at most, under the
same load), and what is reported is the median with its spread (min-max)
over the rounds. A target is met when the median meets it; the count of
rounds that met it is printed beside, so a median that just scrapes by
shows as such.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values")
        return cls(statistics.median(values), min(values), max(values), len(values))


def ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """Round-by-round ratios; a round where either side failed (None) or
    the denominator is 0 has no ratio."""
    return [
        n / d
        for n, d in zip(numerators, denominators, strict=True)
        if n is not None and d is not None and d != 0
    ]


@dataclass(frozen=True)
class Goal:
    """``value >= threshold`` (``at_least``) or ``value <= threshold``."""

    threshold: float
    at_least: bool = True

    def met_by(self, value: float) -> bool:
        return value >= self.threshold if self.at_least else value <= self.threshold

    def verdict(self, values: Sequence[float]) -> str:
        if not values:
            return "no data"
        spread = Spread.of(values)
        rounds = sum(self.met_by(v) for v in values)
        word = "met" if self.met_by(spread.median) else "missed"
        return f"{word} ({rounds}/{len(values)} rounds)"


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def fmt_spread(values: Sequence[float], digits: int = 2, suffix: str = "") -> tuple[str, str]:
    """(median, "low-high") as table cells."""
    if not values:
        return "-", "-"
    s = Spread.of(values)
    return f"{fmt(s.median, digits)}{suffix}", f"{fmt(s.low, digits)}-{fmt(s.high, digits)}{suffix}"
