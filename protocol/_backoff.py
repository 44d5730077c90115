"""The reconnect backoff machine of the connector: when to dial the relay again, and what to say.

Sans-IO like the rest of the package: the caller passes the time (``now``, seconds on any
monotonic clock) and the entropy (``rand``, uniform in [0, 1)). The machine never sleeps; it
returns a :class:`Decision` and the driver waits ``delay`` seconds before dialling.

Jitter: *full jitter*. After the ``n``-th consecutive failure (``n`` counted from 0) the delay is
``rand * min(cap, base * multiplier ** n)``, uniform over the whole window. Of the usual schemes it
spreads a herd of daemons that lost the same relay at the same instant the most evenly, so their
redials do not arrive in waves; and each delay is a pure function of the failure count and one
draw, so every bound is exact and testable. Decorrelated jitter (each delay drawn from
``[base, 3 * previous]``) would make the delay depend on the previous draw as well, with no gain
in spread for this use.

The rules, in the order :meth:`Backoff.disconnected` applies them:

1. A link that was up for at least ``stable_after`` seconds (from :meth:`Backoff.connected` to
   this call) first resets the failure count (and ends a restart window, see 3): a long-lived
   link that drops reconnects fast.
2. The reason decides the policy (:data:`POLICIES`):

   - ``NETWORK``, ``CLOSED``: full jitter as above; the failure count grows by one.
   - ``RELAY_BUSY``: the relay is up but turned the link away because too many daemons are
     connecting at once. Coming back within milliseconds would only add to its load, so the
     bound is at least ``restart_spread`` and the delay is drawn from its upper half (*equal
     jitter*: ``[bound / 2, bound)``); the failure count grows by one.
   - ``INVALID_KEY``, ``KEY_REVOKED``, ``TOO_MANY_LINKS``: the key is wrong or revoked, or its
     scope holds its quota of links, and retrying soon will not fix it. The delay is the cap
     with jitter, in ``[cap / 2, cap)``; the failure count grows by one.
   - ``REPLACED``: another link with the same daemon id (and a key of the same scope) took
     over. Fighting it would make two daemons displace each other in a tight loop, but giving
     up for good would leave this daemon unreachable after a stolen key displaced it, or after
     the other process went away. So retry, slowly: the delay is drawn from
     ``[replaced_delay, 1.5 * replaced_delay)`` (above the cap on purpose), and two connectors
     sharing an id trade the link at most once per ``replaced_delay``. The failure count is
     left as it was.
   - ``INCOMPATIBLE_VERSION``: stop (``retry=False``, ``delay=0.0``): redialling a relay that
     cannot speak our version only makes load. The failure count is left as it was.
   - ``SHUTTING_DOWN``: the relay asked us to come back, so come back promptly but spread out:
     ``delay = rand * restart_spread`` and the failure count does not grow. This prompt reconnect
     is granted once per stable link: a second ``SHUTTING_DOWN`` before a link has again stayed
     up for ``stable_after`` seconds is treated like ``NETWORK`` (normal growth), so a relay that
     keeps announcing a restart cannot make its daemons redial in a tight loop.

3. The prompt reconnect opens a *restart window* of ``restart_window`` seconds. A restart takes
   a while (the old relay closes its links, the new one starts, then every daemon that was
   linked dials it at once), so inside the window the bound of every growing delay (``NETWORK``,
   ``CLOSED``, ``RELAY_BUSY``, a repeated ``SHUTTING_DOWN``) is kept within
   ``[restart_spread, restart_cap]`` (and never above ``cap``); the failure count still grows.
   The floor keeps a herd from redialling a relay that is not back yet several times a second
   (and so from running its failure counts up while it is away); the ceiling keeps the last
   daemons from sleeping a minute while the new relay sits idle. Outside the window the usual
   bounds apply.

Messages are one line for ``repowire status``. The machine never sees the API key, so no message
can contain it.
"""

from __future__ import annotations

import enum
import math

import attrs

from ._close_codes import CloseCode
from ._settings import PROTOCOL_VERSION


class DisconnectReason(enum.Enum):
    """Why the link ended (or why a dial failed)."""

    #: The dial failed, the connection dropped, or a ping timed out.
    NETWORK = "network"
    #: The relay closed the link normally (1000) or for a protocol error (4400).
    CLOSED = "closed"
    #: Close 4401: the key is wrong or revoked.
    INVALID_KEY = "invalid key"
    #: Close 4403: the key was revoked or rotated while the link was up.
    KEY_REVOKED = "key revoked"
    #: Close 4429: the key's scope holds its quota of links on the relay.
    TOO_MANY_LINKS = "too many links"
    #: Close 4409: a newer link with the same daemon id took over.
    REPLACED = "replaced"
    #: Close 4426: the relay does not speak this connector's protocol version.
    INCOMPATIBLE_VERSION = "incompatible version"
    #: Close 4503, or the relay's go-away: the relay is restarting.
    SHUTTING_DOWN = "shutting down"
    #: Close 1013 (try again later): the relay turned the link away because too many daemons
    #: were connecting at once.
    RELAY_BUSY = "relay busy"

    @classmethod
    def from_close_code(cls, code: int) -> DisconnectReason:
        """The reason for a WebSocket close code received from the relay.

        The link's own codes (:class:`CloseCode`) map one to one. Of the standard codes, 1001
        (going away) and 1012 (service restart) mean the relay is restarting, 1013 (try again
        later) that it is busy, 1006 (no close frame: the connection broke) is a network
        failure, and every other code is ``CLOSED``.
        """
        return _CLOSE_CODE_REASONS.get(code, cls.CLOSED)


_CLOSE_CODE_REASONS: dict[int, DisconnectReason] = {
    CloseCode.NORMAL: DisconnectReason.CLOSED,
    CloseCode.PROTOCOL_ERROR: DisconnectReason.CLOSED,
    CloseCode.INVALID_KEY: DisconnectReason.INVALID_KEY,
    CloseCode.KEY_REVOKED: DisconnectReason.KEY_REVOKED,
    CloseCode.TOO_MANY_LINKS: DisconnectReason.TOO_MANY_LINKS,
    CloseCode.REPLACED: DisconnectReason.REPLACED,
    CloseCode.INCOMPATIBLE_VERSION: DisconnectReason.INCOMPATIBLE_VERSION,
    CloseCode.SHUTTING_DOWN: DisconnectReason.SHUTTING_DOWN,
    1001: DisconnectReason.SHUTTING_DOWN,
    1006: DisconnectReason.NETWORK,
    1012: DisconnectReason.SHUTTING_DOWN,
    CloseCode.TRY_AGAIN_LATER: DisconnectReason.RELAY_BUSY,
}


class Policy(enum.Enum):
    """What :meth:`Backoff.disconnected` does for a reason (see :data:`POLICIES`)."""

    #: Full jitter, failure count grows.
    GROW = "grow"
    #: Equal jitter over a bound of at least ``restart_spread``, failure count grows.
    BUSY = "busy"
    #: Cap with jitter in [cap / 2, cap), failure count grows.
    SLOW = "slow"
    #: Do not retry.
    STOP = "stop"
    #: Retry after ``[replaced_delay, 1.5 * replaced_delay)``, failure count unchanged.
    REPLACED = "replaced"
    #: Prompt spread reconnect once per stable link, otherwise GROW.
    PROMPT = "prompt"


#: The policy for each reason. Every reason has exactly one entry.
POLICIES: dict[DisconnectReason, Policy] = {
    DisconnectReason.NETWORK: Policy.GROW,
    DisconnectReason.CLOSED: Policy.GROW,
    DisconnectReason.INVALID_KEY: Policy.SLOW,
    DisconnectReason.KEY_REVOKED: Policy.SLOW,
    DisconnectReason.TOO_MANY_LINKS: Policy.SLOW,
    DisconnectReason.REPLACED: Policy.REPLACED,
    DisconnectReason.INCOMPATIBLE_VERSION: Policy.STOP,
    DisconnectReason.SHUTTING_DOWN: Policy.PROMPT,
    DisconnectReason.RELAY_BUSY: Policy.BUSY,
}


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    # ``not value > 0`` also refuses NaN; infinity is refused so every delay is a real number.
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{attribute.name} must be a positive finite number of seconds, not {value}"
        )


def _multiplier(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value >= 1 and math.isfinite(value)):
        raise ValueError(f"multiplier must be a finite number >= 1, not {value}")


@attrs.frozen(kw_only=True)
class BackoffConfig:
    """Tuning of :class:`Backoff`. All times in seconds.

    Raises ``ValueError`` unless every value is positive and finite, ``base <= cap``,
    ``multiplier >= 1``, ``restart_spread <= cap`` and ``restart_spread <= restart_cap``.
    """

    #: Bound of the first delay; the bound of the ``n``-th is ``base * multiplier ** n``.
    base: float = attrs.field(default=0.5, validator=_positive)
    #: No delay is above this, whatever the failure count.
    cap: float = attrs.field(default=60.0, validator=_positive)
    #: Growth of the bound per consecutive failure.
    multiplier: float = attrs.field(default=2.0, validator=_multiplier)
    #: A link up at least this long resets the failure count when it ends.
    stable_after: float = attrs.field(default=30.0, validator=_positive)
    #: After the relay announces a restart, reconnect within [0, restart_spread).
    restart_spread: float = attrs.field(default=2.0, validator=_positive)
    #: Seconds after that announcement during which failed dials count as part of the restart:
    #: their delay bound stays within [restart_spread, min(restart_cap, cap)].
    restart_window: float = attrs.field(default=60.0, validator=_positive)
    #: Largest delay bound inside a restart window.
    restart_cap: float = attrs.field(default=15.0, validator=_positive)
    #: After another link with the same daemon id replaced ours (close 4409), wait at least
    #: this long (at most 1.5 times it) before dialling again. Deliberately longer than the
    #: cap: two daemons sharing an id trade the link at most once per this delay.
    replaced_delay: float = attrs.field(default=300.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.base > self.cap:
            raise ValueError(f"base ({self.base}) must not exceed cap ({self.cap})")
        if self.restart_spread > self.cap:
            # Otherwise a relay restart could produce a delay above the cap.
            raise ValueError(
                f"restart_spread ({self.restart_spread}) must not exceed cap ({self.cap})"
            )
        if self.restart_spread > self.restart_cap:
            raise ValueError(
                f"restart_spread ({self.restart_spread}) must not exceed "
                f"restart_cap ({self.restart_cap})"
            )

    def bound(self, failures: int) -> float:
        """``min(cap, base * multiplier ** failures)``, for any count without overflow.

        ``multiplier ** failures`` overflows a float after about a thousand failures with the
        defaults, so saturation is decided in log space first; the power is computed only when
        the result is below the cap (up to rounding, which ``min`` absorbs).
        """
        if failures < 0:
            raise ValueError(f"failures must be >= 0, not {failures}")
        if failures * math.log(self.multiplier) >= math.log(self.cap / self.base):
            return self.cap
        return min(self.cap, self.base * self.multiplier**failures)

    def restart_bound(self, failures: int) -> float:
        """:meth:`bound` kept within ``[restart_spread, min(restart_cap, cap)]``: the bound
        inside a restart window."""
        return min(max(self.bound(failures), self.restart_spread), self.restart_cap, self.cap)


@attrs.frozen(kw_only=True)
class Decision:
    """What to do after a disconnect.

    ``delay`` is the seconds to wait before the next dial, ``0.0`` when ``retry`` is false.
    ``message`` is one line for ``repowire status``; it never contains a key.
    """

    retry: bool
    delay: float
    reason: DisconnectReason
    message: str


class Backoff:
    """The reconnect state of one connector: consecutive failures and the current link's start.

    Call :meth:`connected` when the link is up (handshake done) and :meth:`disconnected` when a
    dial fails or a live link ends. Both raise ``ValueError`` on bad input and then leave the
    state exactly as it was.
    """

    def __init__(self, config: BackoffConfig | None = None) -> None:
        self._config = config if config is not None else BackoffConfig()
        self._failures = 0
        # When the current link came up; None while no link is up.
        self._connected_at: float | None = None
        # Latest ``now`` seen, to refuse a clock that goes backwards.
        self._last_now: float | None = None
        # Whether a SHUTTING_DOWN may still get the prompt reconnect (once per stable link).
        self._prompt_available = True
        # End of the current restart window (rule 3); None when there is none.
        self._restart_until: float | None = None

    @property
    def config(self) -> BackoffConfig:
        return self._config

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far (0 after a stable link or :meth:`reset`)."""
        return self._failures

    def in_restart_window(self, now: float) -> bool:
        """Whether ``now`` falls in a restart window (rule 3 of the module docstring)."""
        return self._restart_until is not None and now < self._restart_until

    def connected(self, now: float) -> None:
        """Record that the link is up at ``now``.

        Raises ``ValueError`` if ``now`` is not finite, is earlier than a ``now`` given before,
        or if the link is already marked up (call :meth:`disconnected` first).
        """
        self._check_now(now)
        if self._connected_at is not None:
            raise ValueError(
                f"connected() called while the link is already up (since {self._connected_at}); "
                "call disconnected() when it ends"
            )
        self._last_now = now
        self._connected_at = now

    def disconnected(self, now: float, reason: DisconnectReason, rand: float) -> Decision:
        """Record a failed dial or the end of a live link at ``now``; decide the next dial.

        ``rand`` is drawn by the caller uniformly from [0, 1). Raises ``ValueError`` if ``rand``
        is outside [0, 1), if ``now`` is not finite or goes backwards, or if ``reason`` is not a
        :class:`DisconnectReason`; the state is then unchanged.
        """
        self._check_now(now)
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be drawn from [0, 1), not {rand}")
        policy = POLICIES.get(reason) if isinstance(reason, DisconnectReason) else None
        if policy is None:
            raise ValueError(f"reason must be a DisconnectReason, not {reason!r}")

        config = self._config
        self._last_now = now
        if self._connected_at is not None:
            if now - self._connected_at >= config.stable_after:
                self._failures = 0
                self._prompt_available = True
                self._restart_until = None
            self._connected_at = None

        if policy is Policy.STOP:
            return Decision(retry=False, delay=0.0, reason=reason, message=_stop_message())
        if policy is Policy.REPLACED:
            delay = config.replaced_delay + rand * config.replaced_delay / 2
            message = (
                "replaced by another connection using this key (same daemon id); "
                f"retrying in {delay:.0f} s (stop the other daemon, or give one of them "
                "another daemon id)"
            )
            return Decision(retry=True, delay=delay, reason=reason, message=message)
        if policy is Policy.SLOW:
            self._failures += 1
            delay = config.cap / 2 + rand * config.cap / 2
            message = (
                f"{_SLOW_LEADS[reason]}; retrying every {config.cap / 2:g} to {config.cap:g} s"
            )
            return Decision(retry=True, delay=delay, reason=reason, message=message)
        if policy is Policy.PROMPT and self._prompt_available:
            self._prompt_available = False
            self._restart_until = now + config.restart_window
            delay = rand * config.restart_spread
            message = f"the relay is restarting; reconnecting in {delay:.1f} s"
            return Decision(retry=True, delay=delay, reason=reason, message=message)

        restarting = self.in_restart_window(now)
        failures = self._failures
        bound = config.restart_bound(failures) if restarting else config.bound(failures)
        if policy is Policy.BUSY:
            bound = max(bound, config.restart_spread)
            delay = bound / 2 + rand * bound / 2
        else:
            delay = rand * bound
        self._failures += 1
        if policy is Policy.BUSY:
            lead = "the relay is busy (too many daemons connecting at once)"
        elif policy is Policy.PROMPT:
            lead = "the relay is restarting again before the link was stable; backing off"
        elif reason is DisconnectReason.CLOSED:
            lead = "the relay closed the link"
        elif restarting:
            lead = "the relay is not back yet after its restart"
        else:
            lead = "relay unreachable or link lost"
        message = f"{lead}; retrying in {delay:.1f} s ({_failures_text(self._failures)})"
        return Decision(retry=True, delay=delay, reason=reason, message=message)

    def reset(self) -> None:
        """Forget everything: the machine is as newly built (same config), with no link up."""
        self._failures = 0
        self._connected_at = None
        self._last_now = None
        self._prompt_available = True
        self._restart_until = None

    def _check_now(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time in seconds, not {now}")
        if self._last_now is not None and now < self._last_now:
            raise ValueError(
                f"now went backwards: {now} is earlier than {self._last_now}; "
                "pass times from one monotonic clock"
            )


def _failures_text(failures: int) -> str:
    return "1 failure" if failures == 1 else f"{failures} consecutive failures"


#: The first part of the status line of each reason under ``Policy.SLOW``.
_SLOW_LEADS: dict[DisconnectReason, str] = {
    DisconnectReason.INVALID_KEY: (
        "invalid API key: the relay refused it; get a new one with "
        "`repowire setup --relay --new-key` or check relay.api_key in the config file"
    ),
    DisconnectReason.KEY_REVOKED: (
        "key revoked: the relay ended the link because its API key was revoked or rotated; "
        "get a new one with `repowire setup --relay --new-key`"
    ),
    DisconnectReason.TOO_MANY_LINKS: (
        "too many links: this key's scope holds the relay's quota of daemon links; "
        "stop another daemon using this key"
    ),
}


def _stop_message() -> str:
    return (
        f"incompatible version: the relay does not accept protocol version {PROTOCOL_VERSION}; "
        "upgrade repowire and restart the daemon; not reconnecting"
    )
