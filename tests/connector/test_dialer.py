"""One link to the relay (``connector._dialer``): the handshake it sends, and how it tells the
ways a link ends apart.

End to end against a fake relay on 127.0.0.1 (close codes, refused upgrades, an unreachable
port), and directly for the classification of an ended session and of an HTTP refusal.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import attrs
import pytest
import trio

from connector._dialer import LinkEnd, open_link, rejected, why_ended
from mux import MuxSession, TransportClosed
from protocol import PROTOCOL_VERSION, CloseCode, DisconnectReason
from tests.support.fake_http import FakeHttpServer, Reply, SelfSigned, serve_fake
from tests.support.fake_relay import BOGUS_KEY, fake_relay_config, start_fake_relay
from tests.support.processes import free_port

# ``tls_server``: a web server that is not a relay (every path answers 404), behind TLS with
# the ``self_signed`` certificate.
pytest_plugins = ("tests.support.tls",)

#: Seconds any test here may take.
TEST_TIMEOUT = 15


@attrs.define
class Calls:
    """What :func:`open_link` told its caller, in order."""

    events: list[str] = attrs.field(factory=list)
    sessions: list[MuxSession] = attrs.field(factory=list)
    ends: list[LinkEnd] = attrs.field(factory=list)

    def on_up(self, session: MuxSession, nursery: trio.Nursery) -> None:
        self.events.append("up")
        self.sessions.append(session)
        nursery.start_soon(self.serve_until_cancelled)

    def on_down(self, end: LinkEnd) -> None:
        self.events.append("down")
        self.ends.append(end)

    async def serve_until_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.events.append("serving stopped")


async def test_a_link_that_was_up_reports_its_end_once_and_stops_its_work(
    nursery: trio.Nursery,
) -> None:
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        fake = await start_fake_relay(nursery)

        async def replace_it() -> None:
            session = await fake.session()
            await session.aclose(CloseCode.REPLACED, "replaced")

        nursery.start_soon(replace_it)
        end = await open_link(
            fake_relay_config(fake.ws_url), on_up=calls.on_up, on_down=calls.on_down
        )
    expected = LinkEnd(
        DisconnectReason.REPLACED, f"relay closed the link ({int(CloseCode.REPLACED)}: replaced)"
    )
    assert end == expected
    assert calls.ends == [expected]
    assert calls.events == ["up", "down", "serving stopped"]
    assert len(calls.sessions) == 1 and calls.sessions[0].ended
    # The handshake carried the key in a header, with the daemon id and the protocol version.
    (request,) = fake.requests
    assert request.path == "/ws/relay"
    assert request.headers["authorization"] == f"Bearer {BOGUS_KEY}"
    assert request.headers["repowire-daemon-id"] == "laptop"
    assert request.headers["repowire-protocol"] == str(PROTOCOL_VERSION)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CloseCode.INVALID_KEY, DisconnectReason.INVALID_KEY),
        (CloseCode.KEY_REVOKED, DisconnectReason.KEY_REVOKED),
        (CloseCode.REPLACED, DisconnectReason.REPLACED),
        (CloseCode.TOO_MANY_LINKS, DisconnectReason.TOO_MANY_LINKS),
        (CloseCode.INCOMPATIBLE_VERSION, DisconnectReason.INCOMPATIBLE_VERSION),
        (CloseCode.SHUTTING_DOWN, DisconnectReason.SHUTTING_DOWN),
        (CloseCode.TRY_AGAIN_LATER, DisconnectReason.RELAY_BUSY),
    ],
)
async def test_a_link_closed_in_its_handshake_ends_with_the_close_codes_reason(
    nursery: trio.Nursery, code: CloseCode, reason: DisconnectReason
) -> None:
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        fake = await start_fake_relay(nursery, close_code=code, close_reason="go away")
        end = await open_link(
            fake_relay_config(fake.ws_url), on_up=calls.on_up, on_down=calls.on_down
        )
    assert end == LinkEnd(reason, f"relay closed the link ({int(code)}: go away)")
    # Never up: the caller hears of it from the return value alone.
    assert calls.events == []


async def test_an_unreachable_relay_is_a_network_failure() -> None:
    calls = Calls()
    url = f"ws://127.0.0.1:{free_port()}"
    with trio.fail_after(TEST_TIMEOUT):
        end = await open_link(fake_relay_config(url), on_up=calls.on_up, on_down=calls.on_down)
    assert end.reason is DisconnectReason.NETWORK
    assert end.detail.startswith("cannot reach the relay: ")
    assert calls.events == []


@pytest.mark.parametrize(
    ("status", "reason", "words"),
    [
        (503, DisconnectReason.RELAY_BUSY, "relay refused the upgrade (HTTP 503)"),
        (401, DisconnectReason.NETWORK, "the relay refused the API key (HTTP 401"),
        (404, DisconnectReason.NETWORK, "no relay at "),
    ],
)
async def test_an_upgrade_refused_over_http_is_classified_by_its_status(
    status: int, reason: DisconnectReason, words: str
) -> None:
    server = FakeHttpServer()
    server.reply_raw("GET", "/ws/relay", Reply(status=status, body=b"{}"))
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        async with serve_fake(server):
            end = await open_link(
                fake_relay_config(server.ws_url), on_up=calls.on_up, on_down=calls.on_down
            )
    assert end.reason is reason
    assert words in end.detail
    assert calls.events == []


async def test_an_untrusted_certificate_is_reported_as_such(tls_server: FakeHttpServer) -> None:
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        end = await open_link(
            fake_relay_config(tls_server.ws_url), on_up=calls.on_up, on_down=calls.on_down
        )
    assert end.reason is DisconnectReason.NETWORK
    assert end.detail.startswith("TLS certificate of the relay not trusted: ")
    assert "relay.ca_file" in end.detail
    assert calls.events == [] and tls_server.requests == []


async def test_the_configured_ca_is_trusted(
    tls_server: FakeHttpServer, self_signed: SelfSigned
) -> None:
    config = fake_relay_config(tls_server.ws_url, ca_file=self_signed.cert)
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        end = await open_link(config, on_up=calls.on_up, on_down=calls.on_down)
    # Past TLS: the upgrade reached the server, which is no relay.
    assert end.detail.startswith("no relay at ")
    assert calls.events == []
    assert [request.target for request in tls_server.requests] == ["/ws/relay"]


async def test_a_ca_file_that_cannot_be_read_is_named(
    tls_server: FakeHttpServer, tmp_path: Path
) -> None:
    config = fake_relay_config(tls_server.ws_url, ca_file=tmp_path / "missing.pem")
    calls = Calls()
    with trio.fail_after(TEST_TIMEOUT):
        end = await open_link(config, on_up=calls.on_up, on_down=calls.on_down)
    assert end.reason is DisconnectReason.NETWORK
    assert end.detail.startswith("cannot load the CA file: ")
    assert calls.events == [] and tls_server.requests == []


@pytest.mark.parametrize(
    ("status", "reason", "start"),
    [
        (404, DisconnectReason.NETWORK, "no relay at relay.example/ws/relay (HTTP 404"),
        (401, DisconnectReason.NETWORK, "the relay refused the API key (HTTP 401"),
        (403, DisconnectReason.NETWORK, "the relay refused the API key (HTTP 403"),
        (429, DisconnectReason.RELAY_BUSY, "relay refused the upgrade (HTTP 429)"),
        (503, DisconnectReason.RELAY_BUSY, "relay refused the upgrade (HTTP 503)"),
        (500, DisconnectReason.NETWORK, "relay refused the upgrade (HTTP 500)"),
        (None, DisconnectReason.NETWORK, "relay refused the upgrade (HTTP ?)"),
    ],
)
def test_refusals_name_their_cause(
    status: int | None, reason: DisconnectReason, start: str
) -> None:
    end = rejected(status, "relay.example/ws/relay")
    assert end.reason is reason
    assert end.detail.startswith(start)


@attrs.define
class EndedSession:
    """What :func:`why_ended` reads of a session."""

    transport_closed: TransportClosed | None = None
    peer_goaway: object | None = None
    close_reason: str | None = None


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        (
            EndedSession(transport_closed=TransportClosed(CloseCode.KEY_REVOKED, "revoked")),
            LinkEnd(
                DisconnectReason.KEY_REVOKED,
                f"relay closed the link ({int(CloseCode.KEY_REVOKED)}: revoked)",
            ),
        ),
        (
            # A close code wins over a GOAWAY before it.
            EndedSession(
                transport_closed=TransportClosed(CloseCode.TRY_AGAIN_LATER), peer_goaway=object()
            ),
            LinkEnd(
                DisconnectReason.RELAY_BUSY,
                f"relay closed the link ({int(CloseCode.TRY_AGAIN_LATER)}: no reason)",
            ),
        ),
        (
            EndedSession(transport_closed=TransportClosed(None), peer_goaway=object()),
            LinkEnd(DisconnectReason.SHUTTING_DOWN, "relay went away"),
        ),
        (
            EndedSession(close_reason="ping timeout"),
            LinkEnd(DisconnectReason.NETWORK, "ping timeout"),
        ),
        (EndedSession(), LinkEnd(DisconnectReason.NETWORK, "link lost")),
    ],
)
def test_an_ended_session_is_classified_by_close_code_then_goaway(
    session: EndedSession, expected: LinkEnd
) -> None:
    assert why_ended(cast(MuxSession, session)) == expected
