"""HTTP load: a fixed number of keep-alive HTTP/1.1 connections, each a closed loop.

``python -m bench.loadgen`` reads a JSON job on stdin's first line (host, port, paths to cycle
through, headers, concurrency, warm-up and duration seconds), waits for ``go`` on the next
line and prints one JSON result: requests completed in the measured window, non-2xx answers,
p50/p90/p99/max latency in milliseconds, requests/s, and its own CPU seconds.

Raw asyncio streams rather than an HTTP client library: the generator shares the two cores
with the server, and httpx spends several times more CPU per request than this loop does.
Requests finished during the warm-up are not counted.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


async def _one_connection(
    job: dict[str, Any],
    worker: int,
    *,
    t_start: float,
    t_end: float,
    lat: list[float],
    status: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(job["host"], job["port"])
    headers = "".join(f"{k}: {v}\r\n" for k, v in job.get("headers", {}).items())
    requests = [
        f"GET {p} HTTP/1.1\r\nHost: {job['host']}:{job['port']}\r\n{headers}\r\n".encode()
        for p in job["paths"]
    ]
    i = worker
    try:
        while True:
            t0 = time.monotonic()
            if t0 >= t_end:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            code = head[9:12].decode()
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            t1 = time.monotonic()
            if t0 >= t_start:
                lat.append(t1 - t0)
                status[code] = status.get(code, 0) + 1
    finally:
        writer.close()


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k] * 1000


async def main() -> None:
    job = json.loads(sys.stdin.readline())
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return
    cpu0 = time.process_time()
    now = time.monotonic()
    t_start = now + job["warmup_s"]
    t_end = t_start + job["duration_s"]
    lat: list[float] = []
    status: dict[str, int] = {}
    results = await asyncio.gather(
        *(
            _one_connection(job, w, t_start=t_start, t_end=t_end, lat=lat, status=status)
            for w in range(job["concurrency"])
        ),
        return_exceptions=True,
    )
    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    lat.sort()
    ok = sum(n for code, n in status.items() if code.startswith("2"))
    print(
        json.dumps(
            {
                "requests": len(lat),
                "ok": ok,
                "status": status,
                "p50_ms": _pct(lat, 50),
                "p90_ms": _pct(lat, 90),
                "p99_ms": _pct(lat, 99),
                "max_ms": lat[-1] * 1000 if lat else float("nan"),
                "rps": len(lat) / job["duration_s"],
                "cpu_s": time.process_time() - cpu0,
                "failures": failures[:3],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
