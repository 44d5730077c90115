"""``scripts/run-local.sh`` (the quick start) stops its relay and its daemon on any signal: the
script returns only once both are gone and their ports are free, so it can run again at once.

The script runs as a subprocess on free ports (its environment overrides), with a home of its
own; its relay registers the daemon's key there, exactly as on a user's first run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import h11
import pytest
import trio

from tests.support.blocking_processes import Budget, http, json_object
from tests.support.processes import LOOPBACK, cli_environment, free_port

#: The script under test.
SCRIPT: Final = Path(__file__).resolve().parents[2] / "scripts" / "run-local.sh"
#: Seconds the script gets to bring its daemon's relay link up (install already done).
STARTUP_LIMIT: Final = 30.0
#: Seconds the script gets to stop both children after a signal.
STOP_LIMIT: Final = 15.0
#: Seconds between two polls.
POLL: Final = 0.1
#: The exit status of the script for each signal (128 + the signal's number).
SIGNALS: Final = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux: /proc/<pid>/task/*/children)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _link_up(port: int, budget: Budget) -> bool:
    try:
        answer = http((LOOPBACK, port), "GET", "/health", budget=budget, cap=1.0)
    except (OSError, trio.TooSlowError, h11.ProtocolError):
        return False
    if answer.status != 200:
        return False
    relay = json_object(answer).get("relay")
    return isinstance(relay, dict) and relay.get("state") == "connected"


def _default_signals() -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


@pytest.fixture
def script_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """The script started on free ports; its process group is killed after the test."""
    relay_port, daemon_port = free_port(), free_port()
    env = cli_environment(tmp_path / "home")
    env.update(
        RUN_LOCAL_RELAY_PORT=str(relay_port),
        RUN_LOCAL_DAEMON_PORT=str(daemon_port),
        RUN_LOCAL_METRICS_LISTEN="off",
        RUN_LOCAL_STOP_TIMEOUT="5",
    )
    with (tmp_path / "out").open("wb") as out, (tmp_path / "err").open("wb") as err:
        process = subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a group of its own, for the cleanup below
            # As a terminal starts it: a signal ignored on entry cannot be trapped by bash,
            # and a suite run under nohup or as a background job inherits SIGHUP or SIGINT
            # ignored.
            preexec_fn=_default_signals,
        )
    try:
        yield process, relay_port, daemon_port
    finally:
        # The whole group, the script's orphans included should it have left any.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_LIMIT)


@pytest.mark.parametrize("signum", list(SIGNALS), ids=lambda s: signal.Signals(s).name)
def test_a_signal_stops_the_relay_and_the_daemon(
    script_run: tuple[subprocess.Popen[bytes], int, int], signum: signal.Signals
) -> None:
    process, relay_port, daemon_port = script_run
    budget = Budget(STARTUP_LIMIT + STOP_LIMIT)
    deadline = time.monotonic() + STARTUP_LIMIT
    while not _link_up(daemon_port, budget):
        assert process.poll() is None, f"run-local.sh exited early ({process.returncode})"
        assert time.monotonic() < deadline, "the daemon's relay link never came up"
        time.sleep(POLL)
    children = _descendants(process.pid)
    assert len(children) >= 2, "expected the relay and the daemon below the script"

    process.send_signal(signum)
    assert process.wait(timeout=STOP_LIMIT) == SIGNALS[signum]
    left = sorted(pid for pid in children if _alive(pid))
    assert not left, f"processes left running after the script stopped: {left}"
    assert _port_free(relay_port) and _port_free(daemon_port)
