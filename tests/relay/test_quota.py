"""Per-scope counters and what a stream is charged."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay._quota import QuotaExceeded, ScopeCounter
from relay._settings import (
    APP_QUEUE_SIZE,
    BODY_PIECE_SIZE,
    MIB,
    STREAM_WINDOW,
    RelaySettings,
    stream_cost,
)


def test_a_counter_takes_amounts_up_to_its_limit_per_scope() -> None:
    counter = ScopeCounter("bytes held", 10)
    assert counter.try_take("a", 6)
    assert not counter.try_take("a", 5)  # 11 > 10: nothing taken
    assert counter.held("a") == 6
    assert counter.try_take("b", 10)  # another scope has its own share
    counter.give_back("a", 6)
    assert counter.held("a") == 0
    with pytest.raises(RuntimeError):
        counter.give_back("a")


def test_hold_gives_back_on_every_path() -> None:
    counter = ScopeCounter("open streams", 1)
    with pytest.raises(ValueError), counter.hold("a"):
        assert counter.held("a") == 1
        raise ValueError("the request failed")
    assert counter.held("a") == 0
    with counter.hold("a"), pytest.raises(QuotaExceeded) as caught, counter.hold("a"):
        pass
    assert caught.value.limit == 1
    assert counter.held("a") == 0


def test_a_stream_is_charged_what_it_may_make_the_relay_hold(tmp_path: Path) -> None:
    message = 2 * MIB
    settings = RelaySettings(data_dir=tmp_path, max_websocket_message_size=message)
    assert stream_cost(settings, "http") == STREAM_WINDOW + APP_QUEUE_SIZE * BODY_PIECE_SIZE
    # what hypercorn's defaults held (2 queued reads of 64 KiB), no more
    assert APP_QUEUE_SIZE * BODY_PIECE_SIZE <= 2 * 64 * 1024
    assert stream_cost(settings, "mesh") == 2 * STREAM_WINDOW
    # A browser's text message is counted in characters, up to 4 bytes each: hypercorn's
    # queued and pending messages, the bridge's encoding of one; from the daemon the joined
    # message (a str, up to 4 bytes a character) and hypercorn's frame of it; and the window.
    from_browser = (APP_QUEUE_SIZE + 1) * 4 * message + 4 * message
    from_daemon = 4 * message + message + STREAM_WINDOW
    assert stream_cost(settings, "websocket") == from_browser + from_daemon


def test_the_defaults_admit_the_stream_quota_of_plain_requests(tmp_path: Path) -> None:
    settings = RelaySettings(data_dir=tmp_path)
    admitted = settings.max_scope_buffered // stream_cost(settings, "http")
    assert admitted >= settings.max_streams_per_scope
    # and some WebSockets (a dashboard tab holds one): 11 at 1 MiB messages, 42 at 256 KiB
    assert settings.max_scope_buffered // stream_cost(settings, "websocket") >= 8
    smallest = RelaySettings(data_dir=tmp_path, max_websocket_message_size=256 * 1024)
    assert smallest.max_scope_buffered // stream_cost(smallest, "websocket") >= 32


def test_the_relay_makes_hypercorn_read_one_body_piece_at_a_time(tmp_path: Path) -> None:
    from hypercorn.trio import tcp_server

    from relay._server import hypercorn_config

    config = hypercorn_config(RelaySettings(data_dir=tmp_path))
    assert tcp_server.MAX_RECV == BODY_PIECE_SIZE
    assert config.max_app_queue_size == APP_QUEUE_SIZE
