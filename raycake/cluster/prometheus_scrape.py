"""raycake's series from Ray's Prometheus export, for the HTTP server's ``GET /metrics``.

Every Ray node runs a metrics agent that exports, in Prometheus text, the ``ray.util.metrics``
series of the processes on that node, with a ``ray_`` prefix: raycake's are ``ray_raycake_*``.
The instances may run on other nodes than the HTTP replica, so every live node is scraped (the
replica's own node over loopback) and the families merged: one ``# HELP`` / ``# TYPE`` each, the
samples of every node (Ray labels them with the node's address).
"""

from __future__ import annotations

import asyncio
import urllib.request

import ray

SERIES_PREFIX = "ray_raycake_"
SCRAPE_TIMEOUT_S = 5.0


class MetricsUnavailable(RuntimeError):
    """No node's metrics agent could be read."""


def _metrics_urls() -> list[str]:
    here = ray.get_runtime_context().get_node_id()
    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        # The agent listens on every interface: its own node is read over loopback.
        host = "127.0.0.1" if node.get("NodeID") == here else node.get("NodeManagerAddress")
        urls.append(f"http://{host}:{port}/metrics")
    return urls


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
        return reply.read().decode("utf-8")


def _family(line: str) -> str | None:
    """The family a ``# HELP``/``# TYPE`` line declares, else None."""
    parts = line.split(maxsplit=3)
    if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
        return parts[2]
    return None


def merge_raycake_series(texts: list[str]) -> str:
    """The ``ray_raycake_*`` families of several exports, merged into one exposition."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        current = None
        for line in text.splitlines():
            family = _family(line)
            if family is not None:
                current = family
                if family.startswith(SERIES_PREFIX):
                    headers.setdefault(family, [])
                    if len(headers[family]) < 2 and line not in headers[family]:
                        headers[family].append(line)
                    samples.setdefault(family, [])
                continue
            if line.startswith("#") or not line.strip():
                continue
            # Histogram samples (_bucket, _sum, _count) follow their family's TYPE line.
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = current if current and name.startswith(current) else name
            if family.startswith(SERIES_PREFIX):
                headers.setdefault(family, [])
                samples.setdefault(family, []).append(line)
    lines = []
    for family in sorted(samples):
        lines.extend(headers[family])
        lines.extend(samples[family])
    return "\n".join(lines) + "\n" if lines else ""


async def raycake_metrics() -> str:
    """raycake's series across the cluster's nodes; ``MetricsUnavailable`` if none answers."""
    urls = await asyncio.to_thread(_metrics_urls)
    results = await asyncio.gather(
        *(asyncio.to_thread(_fetch, url) for url in urls), return_exceptions=True
    )
    texts = [r for r in results if isinstance(r, str)]
    if not texts:
        errors = [f"{url}: {r}" for url, r in zip(urls, results, strict=True)]
        raise MetricsUnavailable(
            "no Ray metrics agent answered" + (f" ({'; '.join(errors)})" if errors else "")
        )
    return merge_raycake_series(texts)
