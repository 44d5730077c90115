"""A hostile connector: a peer holding a valid key that drives a relay process with adversarial
sequences over a real socket, while a second tenant makes ordinary requests beside it.

- :class:`tests.support.hostile_link.HostileLink`: one daemon link spoken by hand (wsproto
  over a raw trio socket, frames from the sans-IO ``protocol`` package), so the test decides
  how and whether it reads: normally, one byte at a time, or never.
- :data:`SCENARIOS` (:mod:`tests.support.hostile_scenarios`): the adversarial sequences, each a
  small async function of a ``Scenario`` (random and mutated frames, floods of each frame type
  with each reading mode, streams reset at random points, malformed HTTP answers, never-ending
  bodies, a big POST answered then reset, WebSocket upgrades sending huge messages).
- :func:`run_fuzz`: a seeded run against a running relay process for a given time, with
  :data:`HOSTILE_SLOTS` hostile links at once, the relay's memory sampled from ``/proc``, its
  ``/health`` checked and its log searched for escaped exceptions (:class:`LogWatch`) after
  every scenario, and the second tenant's requests timed; the outcome is a
  :class:`FuzzReport`. :func:`fuzz_relay_process` sets the whole thing up (relay process,
  keys, the tenant's daemon) in a :class:`tests.support.lab.Lab`.

Everything is on loopback, every loop is bounded by a count and every wait by a deadline. Keys
and cookies stay in memory: nothing here prints them, and reports name scenarios and seeds only.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

from .clients import Address, open_http_stream
from .hostile_link import EXPECTED, KIB, expected_failures, open_hostile_link
from .hostile_link import MIB as MIB
from .hostile_scenarios import SCENARIOS as SCENARIOS
from .hostile_scenarios import WEIGHTS, Scenario, Target
from .lab import Lab
from .processes import RelayProcess
from .sessions import cookie_from, post_key, sign_in
from .stats import percentile

#: Environment variable: seconds of fuzzing (setup not counted).
SECONDS_VARIABLE: Final = "REPOWIRE_FUZZ_SECONDS"
#: Environment variable: the seed of the run.
SEED_VARIABLE: Final = "REPOWIRE_FUZZ_SEED"
#: Seconds of fuzzing when :data:`SECONDS_VARIABLE` is not set (what CI runs).
DEFAULT_SECONDS: Final = 60.0
#: The seed when :data:`SEED_VARIABLE` is not set (CI's fixed seed).
DEFAULT_SEED: Final = 20261205
#: Hostile links driving the relay at the same time (each runs one scenario after another).
HOSTILE_SLOTS: Final = 3
#: Longest a scenario may run, seconds; it is cancelled then, as a normal end.
SCENARIO_TIMEOUT: Final = 4.0
#: Most scenarios one slot runs (a backstop: the run's duration ends it first).
MAX_SCENARIOS_PER_SLOT: Final = 10_000
#: Seconds between two requests of the second tenant.
TENANT_INTERVAL: Final = 0.02
#: Seconds one request of the second tenant may take before it counts as failed.
TENANT_TIMEOUT: Final = 5.0
#: Most requests the second tenant makes (a backstop behind the run's duration).
MAX_TENANT_REQUESTS: Final = 100_000
#: Seconds between two samples of the relay's memory.
RSS_INTERVAL: Final = 0.1
#: Seconds the relay's ``/health`` may take after a scenario.
HEALTH_TIMEOUT: Final = 3.0
#: Most bytes of the relay's log read per check.
MAX_LOG_READ: Final = 8 * MIB
#: Sign-in attempts while the hostile link comes up, and the seconds between them (the
#: relay's auth limit allows a burst of 10 per address).
SIGN_IN_TRIES: Final = 5
SIGN_IN_INTERVAL: Final = 0.3
#: Most failures a report keeps (each names the seed and scenario).
MAX_FAILURES: Final = 50


@attrs.define(kw_only=True)
class FuzzReport:
    """What one run saw. :meth:`summary` is the line printed and attached to failures."""

    seed: int
    seconds: float
    scenarios: Counter[str] = attrs.Factory(Counter)
    #: Each failure names the seed and the scenarios running when it was seen.
    failures: list[str] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    tenant_failures: list[str] = attrs.Factory(list)
    rss_start: int = 0
    rss_peak: int = 0
    rss_peak_during: tuple[str, ...] = ()
    rss_end: int = 0
    hwm: int = 0
    health_checks: int = 0
    #: Exceptions that escaped a request's or a link's task in the relay (its log shows their
    #: tracebacks), by "type at file:line", with how often each was seen.
    escaped: Counter[str] = attrs.Factory(Counter)
    #: Browser requests of the hostile scope, and how many got a response head.
    browsed: int = 0
    answered: int = 0
    relay_exit: int | None = None

    def fail(self, what: str, running: Sequence[str]) -> None:
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(f"seed {self.seed}: {what} (running: {', '.join(running)})")

    @property
    def growth(self) -> int:
        return max(0, self.rss_peak - self.rss_start)

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) if self.latencies else float("nan")

    def summary(self) -> str:
        return (
            f"hostile fuzz: seed={self.seed} seconds={self.seconds:g} "
            f"scenarios={sum(self.scenarios.values())} ({len(self.scenarios)} kinds) "
            f"tenant requests={len(self.latencies) + len(self.tenant_failures)} "
            f"failed={len(self.tenant_failures)} p50={self.p(0.5) * 1000:.1f}ms "
            f"p99={self.p(0.99) * 1000:.1f}ms max={max(self.latencies, default=0) * 1000:.1f}ms "
            f"rss start={self.rss_start / MIB:.1f}MiB peak={self.rss_peak / MIB:.1f}MiB "
            f"(+{self.growth / MIB:.1f}MiB during {', '.join(self.rss_peak_during) or '-'}) "
            f"end={self.rss_end / MIB:.1f}MiB hwm={self.hwm / MIB:.1f}MiB "
            f"hostile browsing={self.answered}/{self.browsed} answered "
            f"health checks={self.health_checks} relay exit={self.relay_exit} "
            f"escaped exceptions={sum(self.escaped.values())} failures={len(self.failures)}"
        )


class LogWatch:
    """Reads a relay's log (its stderr file) as it grows and finds the tracebacks in it: an
    exception that reached hypercorn or trio's top level rather than ending in its own
    request's or link's task. Reads at most :data:`MAX_LOG_READ` bytes per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_tracebacks(self, *, final: bool = False) -> list[str]:
        """``"Type at file:line"`` for each traceback logged since the last call: the last
        exception of the traceback (for a group, its last leaf) and the innermost frame
        above it (and the innermost frame of the project's own code). The exception's
        message is left out: it could quote anything. ``final`` reads the log to its end
        (the relay has stopped writing)."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read(MAX_LOG_READ)
        except OSError:
            return []
        # Consume only whole records: a traceback still being written is read next time.
        cut = len(data) - 1 if final else data.rfind(b"\n20")
        if cut < 0:
            return []
        self._offset += cut + 1
        text = data[: cut + 1].decode(errors="replace")
        found: list[str] = []
        for record in _LOG_RECORD.split(text):
            if "Traceback (most recent call last)" in record:
                found.append(_last_exception(record))
        return found


#: Where a new record starts in the relay's log (a timestamp at the start of a line).
_LOG_RECORD: Final = re.compile(r"\n(?=\d{4}-\d\d-\d\d )")
#: The frame decorations of an exception group's traceback.
_GROUP_PREFIX: Final = re.compile(r"^[ |+-]*")
#: A traceback's exception line: a dotted name, then ``:`` or the end of the line.
_EXCEPTION_LINE: Final = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")
_NOT_EXCEPTIONS: Final = ("Traceback", "During", "The", "Exception")


def _last_exception(record: str) -> str:
    """``"Type at file:line"`` of the last exception in one log record's traceback."""
    where = ours = "?"
    last = "?"
    for raw in record.splitlines()[1:]:
        line = _GROUP_PREFIX.sub("", raw) if raw[:1] in (" ", "+", "|") else raw
        stripped = raw.strip(" |+-")
        if stripped.startswith('File "'):
            parts = stripped.split('"')
            number = stripped.rsplit("line ", 1)[-1].split(",")[0]
            where = f"{_short(parts[1])}:{number}"
            if "site-packages" not in where:
                ours = where
            continue
        if raw.startswith(" " * 4) and not raw.lstrip(" ").startswith("|"):
            continue  # source lines and carets under a frame of a plain traceback
        match = _EXCEPTION_LINE.match(line)
        if match and not line.startswith(_NOT_EXCEPTIONS) and "Group" not in match.group(1):
            last = f"{match.group(1)} at {where}"
            if ours != where:
                last += f" (from {ours})"
    return last


def _short(path: str) -> str:
    """A source path relative to the repository (or its file name)."""
    for root in ("/site-packages/", "/relay/", "/mux/", "/protocol/", "/repowire/"):
        if root in path:
            return root.strip("/") + "/" + path.split(root, 1)[1]
    return Path(path).name


def read_memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of process ``pid`` in bytes, from ``/proc/<pid>/status``; (0, 0)
    once the process is gone."""
    rss = hwm = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            amount = int(value.split()[0]) * KIB
            if name == "VmRSS":
                rss = amount
            else:
                hwm = amount
    return rss, hwm


@attrs.define(kw_only=True)
class Tenant:
    """The second tenant: a daemon path requested through the relay with its own cookie."""

    address: Address
    cookie: tuple[str, str]
    path: str


class _FuzzRun:
    """The state of one :func:`run_fuzz`, shared by its tasks: the hostile slots, the
    tenant's loop and the memory sampler."""

    def __init__(
        self,
        relay: RelayProcess,
        target: Target,
        tenant: Tenant,
        *,
        seed: int,
        seconds: float,
        slots: int,
        names: Sequence[str] | None,
    ) -> None:
        assert relay.child is not None
        self.relay = relay
        self.target = target
        self.tenant = tenant
        self.slots = slots
        self.pid = relay.child.process.pid
        self.report = FuzzReport(seed=seed, seconds=seconds)
        self.report.rss_start, _ = read_memory(self.pid)
        self.report.rss_peak = self.report.rss_start
        self.running: dict[int, str] = {}
        self.master = random.Random(seed)
        self.choices = sorted(names if names is not None else SCENARIOS)
        self.weights = [WEIGHTS[name] for name in self.choices]
        self.deadline = trio.current_time() + seconds
        self.stop = trio.Event()
        self.watch = LogWatch(relay.child.stderr_path)
        # Every scenario first runs once (a seeded deck dealt to the slots), so a short run
        # still covers them all; then the slots pick at random, as WEIGHTS says.
        self.deck = list(self.choices)
        self.master.shuffle(self.deck)

    def now_running(self) -> tuple[str, ...]:
        return tuple(self.running[slot] for slot in sorted(self.running)) or ("between scenarios",)

    def relay_gone(self) -> bool:
        child = self.relay.child
        if child is not None and child.process.poll() is not None:
            if self.report.relay_exit is None:
                self.report.relay_exit = child.process.returncode
                self.report.fail(
                    f"the relay exited with {self.report.relay_exit}", self.now_running()
                )
            self.stop.set()
            return True
        return False

    def check_log(self, *, final: bool = False) -> None:
        for escaped in self.watch.new_tracebacks(final=final):
            if escaped not in self.report.escaped:
                self.report.fail(
                    f"an exception escaped in the relay: {escaped}", self.now_running()
                )
            self.report.escaped[escaped] += 1

    async def health(self, after: str) -> None:
        self.check_log()
        if self.relay_gone():
            return
        self.report.health_checks += 1
        outcome: int | str = f"no answer within {HEALTH_TIMEOUT:g} s"
        with trio.move_on_after(HEALTH_TIMEOUT):
            outcome = await get_status(self.relay.address, "/health")
        if outcome != 200 and not self.relay_gone():
            self.report.fail(f"/health failed after {after}: {outcome}", self.now_running())

    async def slot(self, index: int, rng: random.Random) -> None:
        dealt = self.deck[index :: self.slots]
        for number in range(MAX_SCENARIOS_PER_SLOT):
            if self.stop.is_set() or trio.current_time() >= self.deadline:
                return
            if number < len(dealt):
                name = dealt[number]
            else:
                name = rng.choices(self.choices, self.weights)[0]
            self.running[index] = f"{name}#{index}.{number}"
            await self.one_scenario(index, name, random.Random(rng.randrange(2**63)))
            await self.health(self.running[index])
            del self.running[index]

    async def one_scenario(self, index: int, name: str, rng: random.Random) -> None:
        scenario = Scenario(rng=rng, target=self.target, daemon_id=f"hostile-{index}")
        with trio.move_on_after(
            min(SCENARIO_TIMEOUT, max(self.deadline - trio.current_time(), 0.1))
        ):
            try:
                with expected_failures():
                    await SCENARIOS[name](scenario)
            except Exception as exc:  # a harness bug: reported with its seed
                what = f"harness error {exc!r} in {self.running[index]}"
                self.report.fail(what, self.now_running())
        self.report.scenarios[name] += 1
        self.report.browsed += scenario.browsed
        self.report.answered += scenario.answered

    async def tenant_loop(self) -> None:
        tenant = self.tenant
        for _ in range(MAX_TENANT_REQUESTS):
            if self.stop.is_set():
                return
            started = time.monotonic()
            outcome: int | str = f"no answer within {TENANT_TIMEOUT:g} s"
            with trio.move_on_after(TENANT_TIMEOUT):
                outcome = await get_status(tenant.address, tenant.path, [tenant.cookie])
            elapsed = time.monotonic() - started
            if outcome == 200:
                self.report.latencies.append(elapsed)
            elif len(self.report.tenant_failures) < MAX_FAILURES:
                self.report.tenant_failures.append(
                    f"seed {self.report.seed}: tenant request failed ({outcome}) after "
                    f"{elapsed:.3f}s (running: {', '.join(self.now_running())})"
                )
            await trio.sleep(TENANT_INTERVAL)

    async def memory_loop(self) -> None:
        report = self.report
        while not self.stop.is_set():
            rss, hwm = read_memory(self.pid)
            if self.relay_gone():
                return
            report.hwm = max(report.hwm, hwm)
            if rss > report.rss_peak:
                report.rss_peak = rss
                report.rss_peak_during = self.now_running()
            await trio.sleep(RSS_INTERVAL)

    async def run(self) -> FuzzReport:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.tenant_loop)
            nursery.start_soon(self.memory_loop)
            async with trio.open_nursery() as slots_nursery:
                for index in range(self.slots):
                    rng = random.Random(self.master.randrange(2**63))
                    slots_nursery.start_soon(self.slot, index, rng)
            self.stop.set()
        report = self.report
        report.rss_end, hwm = read_memory(self.pid)
        report.hwm = max(report.hwm, hwm)
        self.relay_gone()
        self.check_log(final=report.relay_exit is not None)
        return report


async def run_fuzz(
    relay: RelayProcess,
    target: Target,
    tenant: Tenant,
    *,
    seed: int,
    seconds: float,
    slots: int = HOSTILE_SLOTS,
    names: Sequence[str] | None = None,
) -> FuzzReport:
    """Drive ``relay`` with ``slots`` hostile links, each running scenarios picked by a
    ``random.Random`` seeded from ``seed`` (from ``names``, by default all of
    :data:`SCENARIOS`, as :data:`WEIGHTS` says) for ``seconds``, while ``tenant`` is
    requested in a loop. Returns the report; the caller asserts on it. Stops early if the
    relay process exits."""
    run = _FuzzRun(relay, target, tenant, seed=seed, seconds=seconds, slots=slots, names=names)
    return await run.run()


async def _sign_in_with_link(address: Address, key: str) -> tuple[str, str]:
    """The hostile scope's browser cookie. Signing in needs a daemon of the scope online, so
    a well-behaved hostile link is held up (and read) until the sign-in succeeds."""
    async with (
        open_hostile_link(address, key, "hostile-anchor") as link,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(link.read_forever)
        for _ in range(SIGN_IN_TRIES):
            response = await post_key(address, key)
            if response.status == 303 and response.header("set-cookie") is not None:
                nursery.cancel_scope.cancel()
                return cookie_from(response)
            await trio.sleep(SIGN_IN_INTERVAL)
    raise AssertionError(f"the hostile scope could not sign in ({response.status})")


async def get_status(
    address: Address, path: str, headers: Sequence[tuple[str, str]] = ()
) -> int | str:
    """``GET path`` with the whole body read: the status, or the name of what went wrong
    (raised alone or in a group). The caller bounds the time."""
    outcome: int | str = "no answer"
    try:
        async with open_http_stream(address, "GET", path, headers=headers) as response:
            await response.read_all()
            outcome = response.status
    except* EXPECTED as group:
        outcome = " + ".join(type(exc).__name__ for exc in group.exceptions)
    return outcome


def fuzz_settings() -> tuple[int, float]:
    """``(seed, seconds)`` from :data:`SEED_VARIABLE` and :data:`SECONDS_VARIABLE`."""
    seed = int(os.environ.get(SEED_VARIABLE, DEFAULT_SEED))
    seconds = float(os.environ.get(SECONDS_VARIABLE, DEFAULT_SECONDS))
    return seed, seconds


async def fuzz_relay_process(
    lab: Lab,
    *,
    seed: int,
    seconds: float,
    names: Sequence[str] | None = None,
) -> FuzzReport:
    """Start a relay process, a hostile key and a second tenant (a fault daemon with the
    real connector, its ``/hello`` requested through the relay) in ``lab``; run
    :func:`run_fuzz`; return its report."""
    relay = await lab.relay()
    hostile_key = await lab.key(relay, "hostile")
    tenant_key = await lab.key(relay, "tenant")
    await lab.fault_daemon(relay.ws_url, tenant_key, "steady")
    hostile_cookie = await _sign_in_with_link(relay.address, hostile_key)
    _, tenant_cookie = await sign_in(relay.address, tenant_key)
    target = Target(
        address=relay.address,
        key=hostile_key,
        cookie=hostile_cookie,
        origin=("Origin", relay.url),
    )
    tenant = Tenant(address=relay.address, cookie=tenant_cookie, path="/d/steady/hello")
    return await run_fuzz(relay, target, tenant, seed=seed, seconds=seconds, names=names)
