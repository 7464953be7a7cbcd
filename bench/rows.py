"""The rows of the benchmark's table: what each compares, its target from
issue 13, and how its value comes out of one round's measures. Kept apart
from the code that runs the servers so that the arithmetic (which measure
is divided by which, which way a target points) can be tested without
them.

A round is ``{measure name: {figure: value}}``, or ``{measure name:
"skipped: why" | "failed: why"}`` for a measure that did not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bench.stats import Goal, fmt_spread

Round = Mapping[str, "Mapping[str, float] | str"]
MB = 1e6


def get(round_: Round, measure: str, key: str) -> float | None:
    value = round_.get(measure)
    return value.get(key) if isinstance(value, Mapping) else None


def ratio(a: str, b: str, key: str) -> Callable[[Round], float | None]:
    """``a`` over ``b`` in one round (speeds, rates: higher is better)."""

    def value(r: Round) -> float | None:
        x, y = get(r, a, key), get(r, b, key)
        return x / y if x is not None and y else None

    return value


def one(measure: str, key: str) -> Callable[[Round], float | None]:
    return lambda r: get(r, measure, key)


@dataclass(frozen=True)
class Figure:
    """An absolute figure printed beside a row's result (its median over
    the rounds; with its spread when ``spread``)."""

    label: str
    value: Callable[[Round], float | None]
    unit: str = ""
    scale: float = 1.0
    digits: int = 0
    spread: bool = False

    def text(self, rounds: Sequence[Round]) -> str | None:
        values = [v / self.scale for r in rounds if (v := self.value(r)) is not None]
        if not values:
            return None
        median, low_high = fmt_spread(values, self.digits, self.unit)
        return f"{self.label} {median}" + (f" ({low_high})" if self.spread else "")


def speed(label: str, measure: str) -> Figure:
    return Figure(label, one(measure, "speed"), " MB/s", MB)


def rate(label: str, measure: str) -> Figure:
    return Figure(label, one(measure, "rate"), "/s")


@dataclass(frozen=True)
class Row:
    """``goal`` None: a figure the issue asks for without a target."""

    key: str
    label: str
    target: str
    goal: Goal | None
    value: Callable[[Round], float | None]
    needs: tuple[str, ...]
    figures: tuple[Figure, ...] = ()
    unit: str = "x"
    digits: int = 2


def _largest(*figures: tuple[str, str]) -> Callable[[Round], float | None]:
    def value(r: Round) -> float | None:
        found = [v for m, k in figures if (v := get(r, m, k)) is not None]
        return max(found) if found else None

    return value


def _wall_ratio(reference: str, ours: str) -> Callable[[Round], float | None]:
    """Reference wall time over ours: above 1 when ours finished sooner."""
    return ratio(reference, ours, "wall")


def within(measure: str, a: str, b: str) -> Callable[[Round], float | None]:
    """Figure ``a`` over figure ``b`` of one measure (two figures taken
    back to back on the same server)."""

    def value(r: Round) -> float | None:
        x, y = get(r, measure, a), get(r, measure, b)
        return x / y if x is not None and y else None

    return value


ROWS: tuple[Row, ...] = (
    Row(
        "proxy",
        "streaming proxy (cache off), plain upstream, single stream",
        ">= 1.0x tuned nginx",
        Goal(1.0),
        ratio("mirrord proxy", "tuned", "speed"),
        ("mirrord proxy", "tuned", "seed"),
        (
            speed("mirrord", "mirrord proxy"),
            Figure("CPU s/GiB", one("mirrord proxy", "cpu"), digits=2),
            speed("tuned nginx", "tuned"),
            speed("seed nginx", "seed"),
        ),
    ),
    Row(
        "proxy-tls",
        "streaming proxy (cache off), TLS upstream, single stream",
        ">= 1.0x tuned nginx",
        Goal(1.0),
        ratio("mirrord proxy tls", "tuned tls", "speed"),
        ("mirrord proxy tls", "tuned tls"),
        (
            speed("mirrord", "mirrord proxy tls"),
            Figure("CPU s/GiB", one("mirrord proxy tls", "cpu"), digits=2),
            speed("tuned nginx", "tuned tls"),
        ),
    ),
    Row(
        "cold",
        "cold fill (empty cache), single stream",
        ">= 1.0x tuned nginx",
        Goal(1.0),
        ratio("mirrord cold", "tuned", "speed"),
        ("mirrord cold", "tuned", "nginx cold"),
        (
            speed("mirrord", "mirrord cold"),
            Figure("CPU s/GiB", one("mirrord cold", "cpu"), digits=2),
            speed("tuned nginx", "tuned"),
            speed("nginx proxy_cache cold", "nginx cold"),
        ),
    ),
    Row(
        "warm",
        "warm hit (from the cache), single stream",
        ">= 1.2x tuned nginx",
        Goal(1.2),
        ratio("mirrord warm", "tuned", "speed"),
        ("mirrord warm", "tuned", "nginx warm"),
        (
            speed("mirrord", "mirrord warm"),
            Figure("CPU s/GiB", one("mirrord warm", "cpu"), digits=2),
            speed("tuned nginx", "tuned"),
            speed("nginx proxy_cache hit", "nginx warm"),
        ),
    ),
    Row(
        "cold16",
        "16 concurrent cold clients of one blob: wall time",
        "shorter than tuned nginx's 16 (ratio of walls >= 1.0x)",
        Goal(1.0),
        _wall_ratio("tuned x16", "mirrord cold x16"),
        ("mirrord cold x16", "tuned x16"),
        (
            Figure("mirrord", one("mirrord cold x16", "wall"), " s", digits=1),
            Figure("tuned nginx", one("tuned x16", "wall"), " s", digits=1),
        ),
    ),
    Row(
        "cold16-fetches",
        "16 concurrent cold clients of one blob: upstream fetches",
        "1 (tuned nginx: 16)",
        Goal(1.0, at_least=False),
        one("mirrord cold x16", "fetches"),
        ("mirrord cold x16", "tuned x16"),
        (Figure("tuned nginx", one("tuned x16", "fetches"), " fetches"),),
        unit="",
        digits=0,
    ),
    Row(
        "manifest",
        "cached manifest by digest, keep-alive TLS (wrk, 32 connections)",
        ">= 0.8x the bare Twisted TLS site",
        Goal(0.8),
        ratio("mirrord digest", "bare digest", "rate"),
        ("mirrord digest", "bare digest", "tuned digest", "nginx digest"),
        (
            rate("mirrord", "mirrord digest"),
            rate("bare Twisted site", "bare digest"),
            rate("tuned nginx (proxy)", "tuned digest"),
            rate("nginx proxy_cache hit", "nginx digest"),
            Figure(
                "mirrord vs tuned nginx",
                ratio("mirrord digest", "tuned digest", "rate"),
                "x",
                digits=2,
                spread=True,
            ),
        ),
    ),
    Row(
        "tag",
        "manifest by tag within tag_ttl, keep-alive TLS (wrk, 32 connections)",
        ">= 0.8x the bare Twisted TLS site",
        Goal(0.8),
        ratio("mirrord tag", "bare digest", "rate"),
        ("mirrord tag", "bare digest", "tuned digest"),
        (
            rate("mirrord", "mirrord tag"),
            rate("bare Twisted site", "bare digest"),
            rate("tuned nginx (proxy)", "tuned digest"),
            Figure(
                "mirrord vs tuned nginx",
                ratio("mirrord tag", "tuned digest", "rate"),
                "x",
                digits=2,
                spread=True,
            ),
        ),
    ),
    Row(
        "ab",
        "manifest by digest, HTTP/1.0 keep-alive (ab -k, 32 connections)",
        ">= 0.8x the bare site's keep-alive rate (wrk)",
        Goal(0.8),
        ratio("ab mirrord", "bare digest", "rate"),
        ("ab mirrord", "bare digest", "ab bare", "ab nginx"),
        (
            rate("mirrord", "ab mirrord"),
            rate("bare Twisted site (ab -k)", "ab bare"),
            rate("nginx proxy_cache hit (ab -k)", "ab nginx"),
        ),
    ),
    Row(
        "ab-keepalive",
        "share of ab -k requests answered on a kept-alive connection",
        ">= 0.99 (every HTTP/1.0 keep-alive honoured)",
        Goal(0.99),
        one("ab mirrord", "keep_alive"),
        ("ab mirrord", "ab bare"),
        (Figure("bare Twisted site", one("ab bare", "keep_alive"), digits=2),),
        unit="",
    ),
    Row(
        "workers-warm16",
        "workers = 2: 16 warm clients' aggregate vs workers = 1",
        ">= 1.7x",
        Goal(1.7),
        _wall_ratio("w1 x16", "w2 x16"),
        ("w1 x16", "w2 x16", "nginx1 x16", "nginx2 x16"),
        (
            Figure("workers = 2", one("w2 x16", "aggregate"), " MB/s", MB),
            Figure("workers = 1", one("w1 x16", "aggregate"), " MB/s", MB),
            Figure("nginx proxy_cache 2 workers", one("nginx2 x16", "aggregate"), " MB/s", MB),
            Figure("1 worker", one("nginx1 x16", "aggregate"), " MB/s", MB),
            Figure(
                "nginx 2 vs 1", _wall_ratio("nginx1 x16", "nginx2 x16"), "x", digits=2, spread=True
            ),
        ),
    ),
    Row(
        "workers-manifest",
        "workers = 2: manifest by digest GET/s vs workers = 1 (wrk)",
        ">= 1.7x",
        Goal(1.7),
        ratio("w2 digest", "mirrord digest", "rate"),
        ("w2 digest", "mirrord digest", "nginx2 digest", "nginx digest"),
        (
            rate("workers = 2", "w2 digest"),
            rate("workers = 1", "mirrord digest"),
            rate("nginx proxy_cache 2 workers", "nginx2 digest"),
            rate("1 worker", "nginx digest"),
            Figure(
                "nginx 2 vs 1",
                ratio("nginx2 digest", "nginx digest", "rate"),
                "x",
                digits=2,
                spread=True,
            ),
        ),
    ),
    Row(
        "workers-cold16-fetches",
        "workers = 2: 16 concurrent cold clients of one blob: upstream fetches",
        "1 (one fill per digest across workers)",
        Goal(1.0, at_least=False),
        one("w2 cold x16", "fetches"),
        ("w2 cold x16",),
        (
            Figure("wall", one("w2 cold x16", "wall"), " s", digits=1),
            Figure("peak RSS per worker", one("w2 cold x16", "peak_rss"), " MiB"),
        ),
        unit="",
        digits=0,
    ),
    Row(
        "rss16",
        "peak RSS per worker with 16 clients (cold; warm with workers = 1 and 2)",
        "< 128 MiB",
        Goal(128.0, at_least=False),
        _largest(("mirrord cold x16", "peak_rss"), ("w1 x16", "peak_rss"), ("w2 x16", "peak_rss")),
        ("mirrord cold x16", "w1 x16", "w2 x16"),
        (
            Figure("cold", one("mirrord cold x16", "peak_rss"), " MiB"),
            Figure("warm, workers = 1", one("w1 x16", "peak_rss"), " MiB"),
            Figure("warm, workers = 2", one("w2 x16", "peak_rss"), " MiB"),
        ),
        unit=" MiB",
        digits=0,
    ),
    Row(
        "rss-slow",
        "RSS rise under one slow client, streaming proxy (cache off)",
        "flat: +10 MiB at most",
        Goal(10.0, at_least=False),
        one("slow proxy", "growth"),
        ("slow proxy",),
        (
            Figure("RSS before", one("slow proxy", "before"), " MiB"),
            Figure("rise after the first second", one("slow proxy", "late"), " MiB", digits=1),
        ),
        unit=" MiB",
        digits=1,
    ),
    Row(
        "rss-slow-cold",
        "RSS rise under one slow client of a cold fill",
        "flat: +10 MiB at most",
        Goal(10.0, at_least=False),
        one("slow cold", "growth"),
        ("slow cold",),
        (
            Figure("RSS before", one("slow cold", "before"), " MiB"),
            Figure("rise after the first second", one("slow cold", "late"), " MiB", digits=1),
        ),
        unit=" MiB",
        digits=1,
    ),
    Row(
        "fleet-s3",
        "fleet: a hit from S3 (the bucket has it, the member's disk not), single stream, "
        "vs a local hit of it on the same member",
        "none set (issue 11 asks for the figure)",
        None,
        within("fleet hit", "speed", "local_speed"),
        ("fleet hit",),
        (
            Figure("from S3", one("fleet hit", "speed"), " MB/s", MB, spread=True),
            Figure("CPU s/GiB", one("fleet hit", "cpu"), digits=2),
            Figure("local hit", one("fleet hit", "local_speed"), " MB/s", MB, spread=True),
            Figure("CPU s/GiB", one("fleet hit", "local_cpu"), digits=2),
        ),
    ),
    Row(
        "fleet-cold32",
        "fleet: 2 members x 16 cold clients of one blob vs 32 on one member: wall time",
        "none set (one member's wall over two members'; above 1: the fleet is faster)",
        None,
        _wall_ratio("fleet cold one", "fleet cold two"),
        ("fleet cold two", "fleet cold one"),
        (
            Figure("two members", one("fleet cold two", "wall"), " s", digits=1, spread=True),
            Figure("one member", one("fleet cold one", "wall"), " s", digits=1, spread=True),
            Figure("peak RSS of a member: two", one("fleet cold two", "peak_rss"), " MiB"),
            Figure("one", one("fleet cold one", "peak_rss"), " MiB"),
        ),
    ),
    Row(
        "fleet-cold32-fetches",
        "fleet: 2 members x 16 cold clients of one blob: upstream fetches",
        "1 (one fetch per fleet; one member: 1)",
        Goal(1.0, at_least=False),
        one("fleet cold two", "fetches"),
        ("fleet cold two", "fleet cold one"),
        (Figure("one member", one("fleet cold one", "fetches"), " fetches"),),
        unit="",
        digits=0,
    ),
)


def measures_for(rows: Sequence[Row]) -> set[str]:
    return {name for row in rows for name in row.needs}


def _row_cells(row: Row, rounds: Sequence[Round]) -> list[str]:
    values = [v for r in rounds if (v := row.value(r)) is not None]
    median, spread = fmt_spread(values, row.digits, row.unit)
    figures = "; ".join(t for f in row.figures if (t := f.text(rounds)))
    if not values:
        verdict = "skipped" if _all_skipped(row, rounds) else "no data"
    elif row.goal is None:
        verdict = "-"
    else:
        verdict = row.goal.verdict(values)
    return [row.label, row.target, figures or "-", median, spread, verdict]


def _all_skipped(row: Row, rounds: Sequence[Round]) -> bool:
    outcomes = [r.get(m) for r in rounds for m in row.needs]
    return any(isinstance(o, str) and o.startswith("skipped") for o in outcomes)


def render(
    rows: Sequence[Row],
    rounds: Sequence[Round],
    machine: Sequence[tuple[str, str]],
    settings: str,
    skipped: Mapping[str, str],
) -> str:
    """The results as Markdown: the machine, the settings, one table row
    per benchmark row, then every measure that did not run and why."""
    lines = ["# mirrord benchmark", "", "| machine | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in machine]
    lines += ["", settings + ".", ""]
    lines += [
        "| row | target | absolute figures (median over rounds) | result (median) "
        "| spread (min-max) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_row_cells(row, rounds)) + " |" for row in rows]
    notes = [f"- {name} not started: {why}" for name, why in skipped.items()]
    for i, r in enumerate(rounds, 1):
        for name, outcome in r.items():
            if isinstance(outcome, str) and not outcome.startswith("skipped"):
                notes.append(f"- round {i}, {name}: {outcome}")
            elif isinstance(outcome, Mapping) and outcome.get("timeouts"):
                notes.append(
                    f"- round {i}, {name}: {outcome['timeouts']:.0f} wrk timeouts "
                    "(tolerated: under 0.1 % of its requests)"
                )
    if notes:
        lines += ["", "Not measured, or measured with a caveat:", "", *notes]
    return "\n".join(lines)
