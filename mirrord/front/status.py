"""The status section of ``/`` in human terms, and who may see it.

Cache used of its limit, hit ratio and bytes by source over the last hour
and day (with the server-rendered chart), each upstream's state and the
fills in progress. Only clients in ``[metrics] allow`` see it, and only
they may read ``/metrics``: the figures name the upstreams and the
traffic, which is the operator's business, while the client setup above
it stays public.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from html import escape
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from mirrord.front.chart import bars, human_bytes
from mirrord.front.history import History, Sample, Totals
from mirrord.metrics import Metrics
from mirrord.registry.respond import client_address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FiguresAccess:
    """``[metrics] allow``: the networks whose clients see the figures."""

    def __init__(self, allow: Sequence[str]) -> None:
        self._networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in allow]

    def allows(self, request: Request) -> bool:
        """Checked against the client address the guard established
        (``X-Forwarded-For`` only from trusted proxies)."""
        try:
            ip = ipaddress.ip_address(client_address(request))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)


class _Store(Protocol):
    size: int
    max_size: int
    entries: Mapping[str, object]


class _Upstream(Protocol):
    url: str
    limited_until: float


class _Chain(Protocol):
    upstreams: Sequence[_Upstream]


def totals(metrics: Metrics) -> Totals:
    """The counters the history samples. A hit is anything served without
    a fetch of its own (HIT, COALESCED, STALE); a miss started one."""
    value = metrics.reader()
    results = {
        r: value("mirrord_cache_results_total", result=r)
        for r in ("HIT", "COALESCED", "STALE", "MISS")
    }
    return Totals(
        hits=results["HIT"] + results["COALESCED"] + results["STALE"],
        misses=results["MISS"],
        cache_bytes=value("mirrord_served_bytes_total", source="cache"),
        upstream_bytes=value("mirrord_served_bytes_total", source="upstream"),
    )


@dataclass
class StatusSource:
    """Where the figures come from: read at each render, never copied."""

    metrics: Metrics
    history: History
    clock: IReactorTime
    chains: Mapping[str, _Chain]
    store: _Store | None
    fills: Sized
    # The shared store's and the fleet's state (``mirrord.fleet.status``).
    fleet: Any = None

    def render(self, t: Mapping[str, str]) -> str:
        """The section's HTML in the language of ``t`` (see ``texts``)."""
        rows = [self._cache_row(t)]
        hour, day = self.history.total(60), self.history.total(24 * 60)
        table = [
            f"<tr><th>{t['window']}</th><th>{t['hit_ratio']}</th>"
            f"<th>{t['from_cache']}</th><th>{t['from_upstream']}</th></tr>"
        ]
        for name, window in (("last_hour", hour), ("last_day", day)):
            table.append(
                f"<tr><td>{t[name]}</td><td>{_ratio(window, t)}</td>"
                f"<td>{human_bytes(window.cache_bytes)}</td>"
                f"<td>{human_bytes(window.upstream_bytes)}</td></tr>"
            )
        charts = [
            _chart(self.history.buckets(60, 1), t["chart_hour"], t["hour_ago"], t["now"]),
            _chart(self.history.buckets(24 * 60, 60), t["chart_day"], t["day_ago"], t["now"]),
        ]
        legend = (
            '<p class="legend"><span class="swatch cache"></span>'
            f'{t["from_cache"]} <span class="swatch upstream"></span>{t["from_upstream"]}</p>'
        )
        # With workers, the sum over all of them.
        fills = (
            int(self.metrics.value("mirrord_fills_in_progress"))
            if self.metrics.shared
            else len(self.fills)
        )
        rows.append(f"<tr><th>{t['fills']}</th><td>{fills}</td></tr>")
        return (
            f'<section id="status"><h2>{t["status"]}</h2>'
            f'<table class="figures">{"".join(rows)}</table>'
            f'<table class="figures">{"".join(table)}</table>'
            f"{legend}{''.join(charts)}"
            f"<h3>{t['upstreams']}</h3>{self._upstreams(t)}"
            f"{self._fleet(t)}"
            f"<p><small>{t['since_start'].format(minutes=len(self.history.samples))} "
            f"{t['metrics_hint']}</small></p></section>"
        )

    def _cache_row(self, t: Mapping[str, str]) -> str:
        store = self.store
        if store is None:
            return f"<tr><th>{t['cache']}</th><td>{t['cache_off']}</td></tr>"
        # The shared index's figures with workers: the same in each.
        size, entries = store.figures()
        percent = f"{100 * size / store.max_size:.1f} %" if store.max_size else "-"
        used = t["cache_used"].format(
            used=human_bytes(size),
            limit=human_bytes(store.max_size),
            percent=percent,
            entries=entries,
        )
        meter = (
            f'<meter min="0" max="{store.max_size}" value="{size}" '
            f'high="{0.9 * store.max_size:.0f}"></meter>'
        )
        return f"<tr><th>{t['cache']}</th><td>{meter} {used}</td></tr>"

    def _fleet(self, t: Mapping[str, str]) -> str:
        """The shared store and the fleet, as last polled (never waits on them)."""
        if self.fleet is None:
            return ""
        state = self.fleet.as_dict()
        rows = []
        store, fleet = state["store"], state["fleet"]
        if store["up"] is not None:
            health = t["up"] if store["up"] else t["down"]
            kind = "healthy" if store["up"] else "resting"
            used = t["shared_used"].format(
                used=human_bytes(max(store["bytes"], 0)) if store["bytes"] >= 0 else "?",
                blobs=store["blobs"] if store["blobs"] >= 0 else "?",
                limit=human_bytes(store["max_size"]) if store["max_size"] else "-",
                uploads=store["uploads"],
            )
            rows.append(
                f'<tr><th>{t["shared_store"]}</th><td><span class="{kind}">{health}</span>; '
                f"{used}</td></tr>"
            )
        if fleet["redis_up"] is not None:
            health = t["up"] if fleet["redis_up"] else t["down"]
            kind = "healthy" if fleet["redis_up"] else "resting"
            rows.append(
                f'<tr><th>{t["redis"]}</th><td><span class="{kind}">{health}</span></td></tr>'
            )
            members = ", ".join(
                f"{escape(name)} (<code>{escape(url)}</code>)"
                for name, url in sorted(fleet["members"].items())
            )
            rows.append(f"<tr><th>{t['members']}</th><td>{members or '-'}</td></tr>")
            rows.append(f"<tr><th>{t['leases']}</th><td>{len(fleet['leases'])}</td></tr>")
        return f'<h3>{t["fleet"]}</h3><table class="figures" id="fleet">{"".join(rows)}</table>'

    def _upstreams(self, t: Mapping[str, str]) -> str:
        now = self.clock.seconds()
        # With workers, the quota any of them saw last, not only this one.
        quotas = self.metrics.quotas() if self.metrics.shared else None
        items = []
        for registry, chain in self.chains.items():
            states = []
            for upstream in chain.upstreams:
                if upstream.limited_until > now:
                    until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(upstream.limited_until))
                    state = t["resting"].format(
                        until=until, seconds=int(upstream.limited_until - now + 0.999)
                    )
                    kind = "resting"
                else:
                    state, kind = t["healthy"], "healthy"
                # Pulls left in the upstream's window, by whom they count
                # against: the mirror's account, or "anonymous".
                quota = upstream.quota
                if quotas is not None:
                    quota = {i: n for (url, i), n in quotas.items() if url == upstream.url}
                for identity, left in sorted(quota.items()):
                    state += "; " + t["quota"].format(quota=left, identity=escape(identity))
                states.append(
                    f'<li><code>{escape(upstream.url)}</code>: <span class="{kind}">'
                    f"{state}</span></li>"
                )
            items.append(f"<li><b>{escape(registry)}</b><ul>{''.join(states)}</ul></li>")
        return f'<ul class="upstreams">{"".join(items)}</ul>'


def _ratio(window: Sample, t: Mapping[str, str]) -> str:
    requests = window.hits + window.misses
    if not requests:
        return t["no_requests"]
    return t["hits_of"].format(
        ratio=f"{100 * window.hits / requests:.0f} %",
        hits=f"{window.hits:.0f}",
        requests=f"{requests:.0f}",
    )


def _chart(buckets: Sequence[Sample], label: str, left: str, right: str) -> str:
    svg = bars(
        [(b.cache_bytes, b.upstream_bytes) for b in buckets], label=label, left=left, right=right
    )
    return f"<figure><figcaption>{escape(label)}</figcaption>{svg}</figure>"
