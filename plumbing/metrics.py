"""The Prometheus endpoint every daemon can offer: `GET /metrics` in the text exposition format, off
unless the daemon's config has a `[metrics]` table, and then on 127.0.0.1 unless it says otherwise::

    [metrics]
    port = 9464              # required to turn it on
    address = "127.0.0.1"    # default; anything wider exposes the deployment's state to that network

Served by the daemon's own event loop, not by prometheus_client's threaded server: a scrape then reads
the daemon's state on the thread that changes it (no half-updated dict), and a daemon whose loop is stuck
does not answer — Prometheus marks the target down (`up == 0`) instead of reporting a healthy-looking
daemon whose replication stands still. The cost is one collection on the loop per scrape: a few hundred
samples, well under a millisecond per disk.

Each daemon registers its own collector (prometheus_client's custom-collector protocol): it reads the
daemon's current state at scrape time, so there is no second bookkeeping to drift from status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .errors import BadInput, NotStarted

log = logging.getLogger("standby.metrics")
DEFAULT_ADDRESS = "127.0.0.1"
# A scrape request is one line and a few headers: anything longer, or slower, is not Prometheus.
MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0
# Connections served at once: Prometheus scrapes one at a time; more would only cost the daemon's loop.
MAX_CONNECTIONS = 8
# The classic text format, which every Prometheus 2.x reads (generate_latest writes it: our names and labels
# are plain ASCII). Spelled out: prometheus_client's CONTENT_TYPE_LATEST names a newer version with releases.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MetricsConfig:
    port: int
    address: str = DEFAULT_ADDRESS


def parse_metrics(raw: Any) -> MetricsConfig | None:
    """The `[metrics]` table of a daemon's config; None (no endpoint) when there is none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadInput("[metrics] must be a table")
    unknown = set(raw) - {"port", "address"}
    if unknown:
        raise BadInput(f"[metrics] has unknown setting(s) {', '.join(sorted(unknown))} (known: port, address)")
    port, address = raw.get("port"), raw.get("address", DEFAULT_ADDRESS)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise BadInput(f"[metrics] port must be 1..65535, not {port!r}")
    if not isinstance(address, str) or not address:
        raise BadInput(f"[metrics] address must be an IP address or host name, not {address!r}")
    return MetricsConfig(port, address)


# -- building families (for the collectors) ---------------------------------------------------------
Labels = Sequence[str]


Samples = Iterable[tuple[Sequence[str], float | None]]


def gauge(name: str, doc: str, labels: Labels, samples: Samples) -> Metric:
    """A gauge family; samples whose value is None are left out (unknown is absent, never 0)."""
    return _family(GaugeMetricFamily(name, doc, labels=list(labels)), samples)


def counter(name: str, doc: str, labels: Labels, samples: Samples) -> Metric:
    """A counter family (`name` without `_total`: prometheus_client adds it); None values are left out."""
    return _family(CounterMetricFamily(name, doc, labels=list(labels)), samples)


def _family(fam: Metric, samples: Samples) -> Metric:
    for values, value in samples:
        if value is not None:
            fam.add_metric(list(values), float(value))  # type: ignore[attr-defined]
    return fam


# -- serving ----------------------------------------------------------------------------------------
class MetricsEndpoint:
    """`GET /metrics` on the daemon's loop. `collectors`: objects with a `collect()` that yields metric
    families (prometheus_client's custom-collector protocol)."""

    def __init__(self, cfg: MetricsConfig, collectors: Iterable[Any], process: bool = True) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=False)
        for c in collectors:
            self.registry.register(c)
        if process:  # CPU seconds, memory, open files of the daemon itself (read from /proc at scrape time)
            ProcessCollector(registry=self.registry)
        self.server: asyncio.Server | None = None
        self.port = cfg.port
        self._busy = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.cfg.address, self.cfg.port, limit=MAX_REQUEST)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.cfg.address, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def page(self) -> bytes:
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._busy += 1
        try:
            if self._busy > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, ctype, body = self.answer(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status.encode(), ctype.encode(), len(body)))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._busy -= 1
            writer.close()

    def answer(self, request_line: bytes) -> tuple[str, str, bytes]:
        """(status, content type, body) for one request line."""
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", "text/plain", b"not an HTTP/1.x request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
        if target != b"/metrics":
            return "404 Not Found", "text/plain", b"the metrics are at /metrics\n"
        try:
            return "200 OK", CONTENT_TYPE, self.page()
        except Exception:  # a bug in a collector: said here and in the log, the daemon goes on
            log.exception("collecting metrics failed (a bug: please report it with this trace)")
            return "500 Internal Server Error", "text/plain", b"collecting metrics failed: see the daemon's log\n"


async def start_metrics(cfg: MetricsConfig | None, collectors: Iterable[Any]) -> MetricsEndpoint | None:
    """The endpoint, started — or None when the config has no `[metrics]` table."""
    if cfg is None:
        return None
    endpoint = MetricsEndpoint(cfg, collectors)
    try:
        await endpoint.start()
    except OSError as exc:  # the config asked for it: a daemon without its metrics would be silently unwatched
        raise NotStarted(f"cannot serve metrics on {cfg.address}:{cfg.port}: {exc.strerror or exc}") from None
    return endpoint
