"""Prometheus metrics of one relay (a registry per relay, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class RelayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.daemons_connected = Gauge(
            "repowire_relay_daemons_connected", "Daemon links currently connected", registry=r
        )
        self.streams_open = Gauge(
            "repowire_relay_streams_open", "Tunneled and mesh streams currently open", registry=r
        )
        self.streams_total = Counter(
            "repowire_relay_streams", "Streams opened, by kind", ["kind"], registry=r
        )
        self.bytes_to_daemon = Counter(
            "repowire_relay_bytes_to_daemon", "Bytes tunneled towards daemons", registry=r
        )
        self.bytes_from_daemon = Counter(
            "repowire_relay_bytes_from_daemon", "Bytes tunneled back from daemons", registry=r
        )
        self.auth_failures = Counter(
            "repowire_relay_auth_failures",
            "Rejected credentials, by where",
            ["where"],
            registry=r,
        )
        self.registrations = Counter(
            "repowire_relay_registrations", "New scopes registered", registry=r
        )
        self.rejected_frames = Counter(
            "repowire_relay_rejected_frames",
            "Daemon links closed for protocol violations",
            registry=r,
        )
        self.rate_limited = Counter(
            "repowire_relay_rate_limited", "Requests refused by a rate limit", ["where"], registry=r
        )

        self.links_refused = Counter(
            "repowire_relay_links_refused",
            "Daemon links refused by a per-scope quota, by quota",
            ["quota"],
            registry=r,
        )
        self.streams_refused = Counter(
            "repowire_relay_streams_refused",
            "Streams refused by the per-scope stream quota or an open deadline, by kind",
            ["kind"],
            registry=r,
        )
        self.store_up = Gauge(
            "repowire_relay_store_up",
            "Whether the key store (SQLite, or Redis for a cluster) answers: 1 or 0",
            registry=r,
        )
        self.access_revoked = Counter(
            "repowire_relay_access_revoked",
            "Daemon links and browser requests ended by a revocation, rotation or sign-out",
            ["what"],
            registry=r,
        )

        #: Set by :meth:`enable_cluster`, for a replica of a cluster only.
        self.peer_links: Gauge | None = None
        self.forwarded_streams: Gauge | None = None

    def enable_cluster(self) -> None:
        """Add the gauges of a replica of a cluster: its links to the other replicas and the
        forwarded streams open on them (set when the metrics are rendered)."""
        r = self.registry
        self.peer_links = Gauge(
            "repowire_relay_peer_links",
            "Links to the other replicas of the cluster, by who dialed (dialed, accepted)",
            ["direction"],
            registry=r,
        )
        self.forwarded_streams = Gauge(
            "repowire_relay_forwarded_streams",
            "Streams open on replica links: out, forwarded to the replica holding the "
            "daemon's link; in, forwarded here by another replica",
            ["direction"],
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
