"""The relay's settings: what `repowire relay start` resolves its flags into."""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Final, Literal

import attrs

from mux import LINK_MESSAGE_FLOOR
from protocol import DEFAULT_INITIAL_WINDOW_SIZE

from ._store_api import DEFAULT_NAMESPACE, check_namespace, check_redis_url

MIB = 1024 * 1024
#: Messages (WebSocket messages, request body pieces) hypercorn queues for one connection's
#: handler before it stops reading that connection (``max_app_queue_size``; hypercorn's own
#: default is 10). Part of what a stream may make the relay hold: see :func:`stream_cost`.
#: One piece of :data:`BODY_PIECE_SIZE` holds what two of hypercorn's own 64 KiB reads did.
APP_QUEUE_SIZE = 1
#: The most hypercorn reads from a socket at once, so the largest request body piece it
#: queues (``serve_relay`` sets it: hypercorn's own is 64 KiB). Twice that moved uploads
#: through the relay 1.4 times as fast (bench/README.md), at the same bytes held per request.
BODY_PIECE_SIZE = 128 * 1024
#: Receive window of one stream (the protocol's default, which the relay announces). A bulk
#: stream's window may grow beyond it; the growth is charged to the scope as it happens.
STREAM_WINDOW = DEFAULT_INITIAL_WINDOW_SIZE

#: Smallest ``max_websocket_message_size`` accepted: the largest WebSocket message a connector
#: writes on its link to a relay that does not name a larger limit (``mux.LINK_MESSAGE_FLOOR``,
#: 256 KiB; the relay names its own in the link's handshake). The setting bounds every
#: WebSocket message the relay reads: daemon links' and tunneled browsers'.
MIN_WEBSOCKET_MESSAGE_SIZE = LINK_MESSAGE_FLOOR
#: Most bytes one character of a text message takes, in UTF-8 or in a Python str: hypercorn
#: counts a browser's text message in characters (see :func:`stream_cost`).
BYTES_PER_CHARACTER = 4

#: Fewest bytes a cluster secret may have (``--cluster-secret-file``)...
MIN_CLUSTER_SECRET_BYTES: Final = 32
#: ...and most: a secret file is small; a larger one is the wrong file.
MAX_CLUSTER_SECRET_BYTES: Final = 64 * 1024
#: What a replica id may hold (as a daemon id): it names the replica to the others.
REPLICA_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def default_replica_id() -> str:
    """This host's name and six random hex digits (``relay-a-3f9c0a``): unique per process,
    recognisable in logs and presence records."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:40].strip(".-") or "relay"
    return f"{host}-{secrets.token_hex(3)}"


def read_cluster_secret(path: Path) -> bytes:
    """The cluster secret in the file at ``path``: its bytes, trailing whitespace (a final
    newline) removed. Raises ValueError with one line, never quoting the content, if the file
    is missing or unreadable, not a regular file, readable or writable by group or others, or
    holds fewer than :data:`MIN_CLUSTER_SECRET_BYTES` (or more than
    :data:`MAX_CLUSTER_SECRET_BYTES`) bytes."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ValueError(
            f"cannot read the cluster secret file {path}: {exc.strerror or exc}"
        ) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"the cluster secret file {path} is not a regular file")
        if status.st_mode & 0o077:
            raise ValueError(
                f"the cluster secret file {path} is open to group or others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}"
            )
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(MAX_CLUSTER_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(
            f"cannot read the cluster secret file {path}: {exc.strerror or exc}"
        ) from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_CLUSTER_SECRET_BYTES:
        raise ValueError(
            f"the cluster secret file {path} holds more than {MAX_CLUSTER_SECRET_BYTES} bytes: "
            "is it the right file?"
        )
    secret = data.rstrip()
    if len(secret) < MIN_CLUSTER_SECRET_BYTES:
        raise ValueError(
            f"the cluster secret file {path} holds {len(secret)} bytes, fewer than "
            f"{MIN_CLUSTER_SECRET_BYTES} (make one with: openssl rand -hex 32 > {path})"
        )
    return secret


def _advertise_url_problem(url: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s)://HOST[:PORT] URL"
    if parts.username is not None or parts.query or parts.fragment:
        return "must not hold credentials, a query or a fragment"
    return None


@attrs.frozen(kw_only=True)
class RelaySettings:
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests); the bound address is printed and reported.
    port: int = 8000
    #: Holds ``relay.sqlite3`` (the key store).
    data_dir: Path = attrs.field(converter=Path)
    #: The dashboard's static export (a directory holding ``index.html``), served under
    #: ``/dashboard/``. None: the relay serves no dashboard files (``/dashboard/...`` answers
    #: 404 saying so) and sign-in still works. ``repowire relay start`` passes the bundled one.
    dashboard_dir: Path | None = None
    #: The URL browsers use (``https://relay.example``). An https URL makes cookies Secure and
    #: is the Origin that state-changing requests and WebSocket upgrades must come from.
    public_url: str | None = None
    registration: Literal["open", "closed"] = "open"
    certfile: Path | None = None
    keyfile: Path | None = None
    #: Largest request body tunneled to a daemon; larger ones get 413.
    max_body_size: int = 256 * MIB
    #: Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (a TLS proxy in front).
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Browser session lifetime, seconds.
    session_ttl: float = 7 * 24 * 3600
    #: On shutdown, seconds in-flight streams get to finish after the go-away.
    shutdown_grace: float = 10.0
    #: Largest request head (request line + headers) accepted from a browser, bytes.
    max_header_size: int = 16 * 1024
    #: Seconds a client may take to send its request head (slowloris), and the most an idle
    #: keep-alive connection is kept.
    header_timeout: float = 10.0
    #: Seconds the relay waits for the next piece of a request body it tunnels. A client that
    #: stops sending mid-body gets 408 and its request is withdrawn from the daemon, instead of
    #: holding a stream (and the daemon's handler) open for as long as its socket lives.
    body_timeout: float = 60.0
    #: Keepalive on daemon links: seconds of silence before the relay pings, and the timeout.
    #: Connectors ping every 10 s of silence, so a live link never waits for the relay's ping.
    link_ping_interval: float = 20.0
    link_ping_timeout: float = 10.0
    #: How many concurrent streams a daemon link carries (more wait for a slot). The link's
    #: session budget is sized from it (``mux.link_protocol_config``: a full initial window
    #: per stream plus the growth budget), so stalled readers never use it up (SPEC.md,
    #: "Stalled streams and the session budget").
    max_streams_per_link: int = 256
    #: Daemon links the relay works on connecting at once, from the WebSocket accept to the
    #: protocol HELLO (links with a valid key and daemon id only). A link beyond it is turned
    #: away at once (accepted and closed with 1013, try again later: the connector backs off)
    #: instead of queueing behind the others until the daemon's 10 s handshake timeout fires
    #: and the work done for it is wasted. A refusal costs the relay about half a handshake, so
    #: the limit is a guard against that collapse, not a throttle: one relay process completes
    #: roughly 500 to 1,000 handshakes a second, and 4,096 in flight is 4 to 8 s of its work.
    #: Measured with 10,000 daemons dialling after a restart: limits of 256 and 1,024 made
    #: the herd several times slower (the refused came back and refused others), 4,096 did not.
    link_handshake_limit: int = 4096
    #: Of those, how many one key's scope may hold: a key holder opening links that never
    #: finish their handshake takes at most this many slots, not every daemon's.
    link_handshake_limit_per_key: int = 64
    #: Connections the kernel holds for the relay before it accepts them (the listen backlog;
    #: the kernel caps it at ``net.core.somaxconn``). A herd of reconnecting daemons overflows
    #: hypercorn's default of 100 whenever the relay pauses, and each dropped connection attempt
    #: costs its daemon a TCP retransmission timeout (1 s, then 2 s, ...).
    listen_backlog: int = 1024
    #: Per-scope quotas: one key holder (a scope may hold several keys) never takes more than
    #: this share of the relay, whatever it does. Daemon links of one scope connected at once;
    #: a link beyond it is refused with 4429 (the connector backs off and says why).
    max_links_per_scope: int = 16
    #: Streams of one scope open at once, over all its links: tunneled browser requests,
    #: WebSockets, SSE and mesh streams. A request beyond it gets 503 ``too_many_streams``.
    max_streams_per_scope: int = 512
    #: Bytes the relay may hold for one scope at once. Each open stream is charged what it may
    #: make the relay hold (see :func:`stream_cost`): a tunneled request one stream window
    #: (256 KiB) plus hypercorn's queue of body pieces (1 x 128 KiB), a WebSocket also its
    #: queued and assembling messages, a mesh stream two windows (one each side). The default
    #: admits ``max_streams_per_scope`` plain requests.
    max_scope_buffered: int = 192 * MIB
    #: Bytes of stream window growth one scope may hold at once, on top of
    #: ``max_scope_buffered``: a stream the relay receives in bulk (a download, a mesh
    #: transfer) grows its window from 256 KiB up to 1 MiB (``mux.MAX_STREAM_WINDOW``), and a
    #: download that has grown reads in 256 KiB pieces (192 KiB more, ``Relay.read_sizes``);
    #: both are charged here while they last (64 MiB: 68 downloads at full size). Past it,
    #: streams keep the window and pieces they have. 0 turns growth off.
    max_scope_window_growth: int = 64 * MIB
    #: Seconds a tunneled request waits for a free stream slot on its daemon's link (the
    #: link's ``max_streams_per_link`` are all taken) before it is answered 503.
    stream_open_timeout: float = 5.0
    #: Largest tunneled WebSocket message, either way (browser to daemon and back): UTF-8
    #: bytes from the daemon, and hypercorn's count (characters, for text) from the browser. A
    #: larger one closes that WebSocket with 1009 and a reason; nothing else is affected. A
    #: WebSocket is charged 17 times this plus a stream window (see :func:`stream_cost`).
    #: hypercorn applies it to daemon links too: with the minimum (256 KiB) a hostile link's
    #: over-limit messages made the relay's memory grow by hundreds of MiB
    #: (tests/e2e/test_hostile_connector.py), so the default stays 1 MiB for now.
    max_websocket_message_size: int = 1 * MIB
    #: ``host:port`` where ``/metrics`` is served, apart from the public listener (it shows
    #: every tenant's traffic). ``None``: not served. ``repowire relay start`` defaults to
    #: ``127.0.0.1:9108``.
    metrics_listen: str | None = None
    #: Attempts per client address: /auth and bad keys on /ws/relay (per minute, burst).
    auth_rate_per_minute: float = 10.0
    auth_burst: int = 10
    #: Registrations per client address (per hour, burst).
    register_rate_per_hour: float = 5.0
    register_burst: int = 3
    #: A ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL: the relay keeps keys, sessions,
    #: sign-in links and rate-limit counters in that Redis, shared with the other replicas of
    #: a cluster, and SQLite is not used. None: the SQLite store in ``data_dir``. Never shown
    #: (it may hold a password).
    redis_url: str | None = attrs.field(default=None, repr=False)
    #: Prefix of every Redis key of this relay (several relays may share one Redis).
    redis_namespace: str = DEFAULT_NAMESPACE
    #: This replica's name in a cluster (``[A-Za-z0-9._-]{1,64}``): the host name and a short
    #: random suffix unless given.
    replica_id: str = attrs.field(factory=default_replica_id)
    #: ``http(s)://HOST:PORT`` (and a path prefix, if a proxy adds one) where the other
    #: replicas reach this one. With
    #: ``cluster_secret``, for several replicas; both need ``redis_url``.
    advertise_url: str | None = None
    #: The secret the replicas of a cluster share (:func:`read_cluster_secret`, at least
    #: :data:`MIN_CLUSTER_SECRET_BYTES` bytes). Never shown.
    cluster_secret: bytes | None = attrs.field(default=None, repr=False)
    #: Seconds a browser session this relay has cached stays usable, since the store last
    #: confirmed it, while the store (Redis) is unavailable.
    store_outage_grace: float = 60.0
    #: In a cluster, seconds a presence entry (which replica holds a daemon's link) lives
    #: without a refresh; refreshed every third of it. A replica that dies stops being named
    #: within this.
    presence_ttl: float = 6.0

    def __attrs_post_init__(self) -> None:
        if self.registration not in ("open", "closed"):
            raise ValueError("registration must be 'open' or 'closed'")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("--certfile and --keyfile go together")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("public URL must start with http:// or https://")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be a positive number, not {self.body_timeout!r}")
        if not self.stream_open_timeout > 0:
            raise ValueError(
                f"stream_open_timeout must be a positive number, not {self.stream_open_timeout!r}"
            )
        if self.max_websocket_message_size < MIN_WEBSOCKET_MESSAGE_SIZE:
            raise ValueError(
                f"max_websocket_message_size must be at least {MIN_WEBSOCKET_MESSAGE_SIZE} bytes "
                f"(a daemon link's messages), not {self.max_websocket_message_size!r}"
            )
        for name in (
            "link_handshake_limit",
            "link_handshake_limit_per_key",
            "listen_backlog",
            "max_links_per_scope",
            "max_streams_per_scope",
            "max_scope_buffered",
            "max_websocket_message_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        growth = self.max_scope_window_growth
        if isinstance(growth, bool) or not isinstance(growth, int) or growth < 0:
            raise ValueError(
                f"max_scope_window_growth must be a whole number of at least 0, not {growth!r}"
            )
        self._check_cluster()

    def _check_cluster(self) -> None:
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        check_namespace(self.redis_namespace)
        if REPLICA_ID_PATTERN.fullmatch(self.replica_id) is None:
            raise ValueError("replica id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
        if self.advertise_url is not None:
            problem = _advertise_url_problem(self.advertise_url)
            if problem is not None:
                raise ValueError(f"the advertise URL {problem}")
        if self.cluster_secret is not None and len(self.cluster_secret) < MIN_CLUSTER_SECRET_BYTES:
            raise ValueError(
                f"the cluster secret must hold at least {MIN_CLUSTER_SECRET_BYTES} bytes"
            )
        if (self.advertise_url is None) != (self.cluster_secret is None):
            raise ValueError(
                "--advertise-url and --cluster-secret-file go together (both for a cluster "
                "of several replicas, neither for one)"
            )
        if self.advertise_url is not None and self.redis_url is None:
            raise ValueError("a cluster (--advertise-url, --cluster-secret-file) needs --redis-url")
        if not (math.isfinite(self.presence_ttl) and self.presence_ttl >= 0.01):
            raise ValueError(
                f"presence_ttl must be a finite number >= 0.01 s, not {self.presence_ttl!r}"
            )
        if not (math.isfinite(self.store_outage_grace) and self.store_outage_grace >= 0):
            raise ValueError(
                f"store_outage_grace must be a finite number >= 0, not {self.store_outage_grace!r}"
            )

    @property
    def clustered(self) -> bool:
        """Whether this relay is one of several replicas (it has a cluster identity)."""
        return self.advertise_url is not None


def stream_cost(settings: RelaySettings, kind: str) -> int:
    """Bytes one open stream of ``kind`` (``http``, ``websocket``, ``mesh``) may make the relay
    hold, charged against ``settings.max_scope_buffered`` while it is open. For a WebSocket an
    upper bound, not an estimate: each term below is a copy the relay may hold at once."""
    if kind == "mesh":
        return 2 * STREAM_WINDOW
    if kind != "websocket":
        return STREAM_WINDOW + APP_QUEUE_SIZE * BODY_PIECE_SIZE
    limit = settings.max_websocket_message_size
    # The most memory one counted character may take: hypercorn's size check and the
    # relay's limit count a text message from the browser in characters, and both a Python
    # str (one wide character makes every character 4 bytes) and its UTF-8 take up to 4.
    widest = BYTES_PER_CHARACTER
    # Browser to daemon: hypercorn's queued messages and the one it holds waiting for room
    # (APP_QUEUE_SIZE + 1), then the message the bridge has encoded for the daemon (it drops
    # the ASGI message first, so only the encoding is held while the stream's window opens).
    from_browser = (APP_QUEUE_SIZE + 1) * widest * limit + widest * limit
    # Daemon to browser: the joined message (``limit`` UTF-8 bytes, as a str up to 4 bytes a
    # character; its parts are dropped before it is sent) and hypercorn's encoded frame of it
    # (``limit`` bytes), plus one stream window of frames not yet parsed.
    from_daemon = widest * limit + limit + STREAM_WINDOW
    return from_browser + from_daemon
