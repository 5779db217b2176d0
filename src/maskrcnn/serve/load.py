"""A bounded load test of ``maskrcnn serve``: a few clients, each sending its own image a fixed number of times.

Used by ``maskrcnn bench --only serve`` (whose results JSON records the figures) and by the service's tests
(which also check every answer). Standard library only, so that the bench needs no HTTP client package.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Served:
    """A running ``maskrcnn serve``: its base URL and process id."""

    url: str
    pid: int

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, s) the server process has used so far; None where /proc is unavailable."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        """The server process's peak resident memory (VmHWM, MB); None where /proc is unavailable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(weights: str, *args: str, env: dict[str, str] | None = None, ready_timeout_s: float = 180.0
            ) -> Iterator[Served]:
    """``maskrcnn serve --weights weights *args`` on 127.0.0.1 and a free port, in a child process: yields it
    (:class:`Served`) once /v2/health/ready answers, and stops it with SIGTERM (it drains) on exit. RuntimeError if
    it never gets ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "maskrcnn", "serve", "--weights", weights, "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"maskrcnn serve exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"maskrcnn serve did not become ready in {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        yield Served(url, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def post(url: str, body: bytes, timeout_s: float = 300.0) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` (raw image bytes) to ``url``: (status, headers, response body); HTTP errors are returned too."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0 < q <= 1) of ascending values by the nearest-rank method (a value that occurred)."""
    return sorted_values[max(math.ceil(q * len(sorted_values)) - 1, 0)]


def run_load(url: str, images: Sequence[bytes], requests_per_client: int,
             check: Callable[[int, int, dict[str, str], bytes], None] | None = None,
             query: str = "mask_format=none") -> dict[str, Any]:
    """One client per image, each POSTing its image to ``url``/v1/predict ``requests_per_client`` times in turn.

    ``check(client, status, headers, body)`` sees every answer (it may raise). Returns the figures: clients,
    requests, ok (200), busy (503), other (any other status), wall_s, requests_per_s (answered 200 per second of
    wall time), p50_s and p95_s (latency of every request, nearest rank), latencies_s.
    """
    endpoint = f"{url}/v1/predict" + (f"?{query}" if query else "")
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for _ in range(requests_per_client):
            start = time.perf_counter()
            status, headers, body = post(endpoint, images[c])
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses.append(status)
            if check is not None:
                check(c, status, headers, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(images)) as pool:
        for future in [pool.submit(client, c) for c in range(len(images))]:
            future.result()  # re-raises a failed check
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    ok = statuses.count(200)
    return {"clients": len(images), "requests": len(statuses), "ok": ok, "busy": statuses.count(503),
            "other": len(statuses) - ok - statuses.count(503), "wall_s": wall, "requests_per_s": ok / wall,
            "p50_s": statistics.median(lat), "p95_s": nearest_rank(lat, 0.95), "latencies_s": latencies}
