"""wrk, the HTTP load generator of the small-request benches.

:func:`run_wrk` runs it once and returns its figures (:class:`WrkResult`): a Lua ``done`` hook
prints them as one JSON line. The session cookie, a secret, reaches wrk through a private Lua
script, never its command line. wrk speaks HTTPS too; it does not verify certificates.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import attrs

from bench.processes import WorkerError, write_secret_file


@attrs.frozen(kw_only=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles and every kind of error it counted."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    #: Connect, read, write and timeout errors plus non-2xx/3xx answers.
    errors: int


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, "
    .. "\\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %.1f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    workdir: Path,
    cookie: str | None = None,
    host: str | None = None,
    threads: int = 1,
    timeout: float = 10.0,
) -> WrkResult:
    """Run wrk against ``url`` and return its figures.

    The cookie (a secret) goes into a private Lua script, not onto wrk's command line; so does
    ``host``, a Host header other than the URL's. Raises
    :class:`WorkerError` if wrk is missing or fails.
    """
    path = shutil.which("wrk")
    if path is None:
        raise WorkerError("wrk is not installed (Debian: apt-get install wrk)")
    script = _WRK_DONE
    if cookie is not None:
        if not re.fullmatch(r"[A-Za-z0-9_=.-]+", cookie):
            raise ValueError("unexpected characters in the cookie")
        script = f'wrk.headers["Cookie"] = "{cookie}"\n' + script
    if host is not None:
        if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
            raise ValueError("unexpected characters in the host")
        script = f'wrk.headers["Host"] = "{host}"\n' + script
    script_path = write_secret_file(workdir / "wrk-bench.lua", script)
    argv = [
        path,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(script_path),
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=duration + timeout + 30
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            data = json.loads(line[len("BENCH-JSON ") :])
            seconds = data["duration_us"] / 1e6
            errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            return WrkResult(
                requests=int(data["requests"]),
                seconds=seconds,
                requests_per_s=data["requests"] / seconds if seconds > 0 else math.nan,
                p50_ms=data["p50_us"] / 1000.0,
                p99_ms=data["p99_us"] / 1000.0,
                mean_ms=data["mean_us"] / 1000.0,
                errors=int(errors),
            )
    raise WorkerError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[:300]}")
