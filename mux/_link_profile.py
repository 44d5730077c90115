"""The window settings for links that carry bulk transfers: daemon links and replica links.

One stream moves at most one receive window per round trip through every hop, so the window
sets what one download or upload can reach. The protocol's implied settings (256 KiB windows,
64 KiB frames) keep a quiet stream cheap, and stay what each stream starts with. A stream whose
sender keeps running out of window while its reader keeps up grows its window, doubling up to
:data:`MAX_STREAM_WINDOW`, within a growth budget per link (:data:`WINDOW_GROWTH_BUDGET`) that
the session budget includes, so the grown windows of stalled readers cannot starve the other
streams (protocol/SPEC.md, "Flow control", item 10, and "Stalled streams and the session
budget"). bench/README.md has the figures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from protocol import DEFAULT_INITIAL_WINDOW_SIZE, SessionConfig

from ._session import MuxConfig

#: Largest receive window a stream of a bulk link grows to.
MAX_STREAM_WINDOW: Final = 1024 * 1024
#: Largest DATA frame accepted on a bulk link: fewer headers, wakeups and buffer joins per byte.
LINK_FRAME_SIZE: Final = 256 * 1024
#: Bytes of window growth one link may grant at once: 64 streams at :data:`MAX_STREAM_WINDOW`.
WINDOW_GROWTH_BUDGET: Final = 64 * (MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE)
#: Largest WebSocket message written on a bulk link (several frames queued together go out in
#: one message: fewer sends, masking calls and wakeups per byte), where the peer reads that much.
LINK_MESSAGE_SIZE: Final = 1024 * 1024
#: What every relay reads (its smallest ``max_websocket_message_size``), and so the most a side
#: writes to a relay that does not name its limit in :data:`MAX_MESSAGE_HEADER`.
LINK_MESSAGE_FLOOR: Final = 256 * 1024
#: The handshake response header in which a relay names the largest WebSocket message it reads.
MAX_MESSAGE_HEADER: Final = b"repowire-max-message"
_DIGITS: Final = re.compile(rb"[0-9]{1,12}")
#: The protocol's limit on any window.
_MAX_WINDOW: Final = 2**31 - 1


def link_protocol_config(max_concurrent_streams: int) -> SessionConfig:
    """The protocol settings of one side of a bulk link: streams start at the protocol's
    initial window, frames up to :data:`LINK_FRAME_SIZE`, and a session budget of a full
    initial window for every stream the peer may open plus the growth budget. Other settings
    keep their defaults (``attrs.evolve`` changes them)."""
    base = min(_MAX_WINDOW, max(1, max_concurrent_streams) * DEFAULT_INITIAL_WINDOW_SIZE)
    # The session window must hold the growth too; near the protocol's limit on windows the
    # growth shrinks rather than go uncovered.
    growth = min(WINDOW_GROWTH_BUDGET, _MAX_WINDOW - base)
    return SessionConfig(
        max_frame_size=LINK_FRAME_SIZE,
        max_concurrent_streams=max_concurrent_streams,
        session_window_size=base + growth,
        window_growth_budget=growth,
    )


def link_mux_config(max_concurrent_streams: int = 256) -> MuxConfig:
    """The driver settings of one side of a bulk link: :func:`link_protocol_config`, stream
    windows growing up to :data:`MAX_STREAM_WINDOW`, the driver's default timeouts."""
    return MuxConfig(
        protocol=link_protocol_config(max_concurrent_streams),
        max_stream_window=MAX_STREAM_WINDOW,
        max_message_size=LINK_MESSAGE_SIZE,
    )


def peer_message_limit(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The largest WebSocket message the accepting side reads, from its
    :data:`MAX_MESSAGE_HEADER` handshake header: :data:`LINK_MESSAGE_FLOOR` when it does not
    say, or says something that is not a number; never less than that."""
    for name, value in headers:
        if name.lower() == MAX_MESSAGE_HEADER:
            # ASCII digits only: str.isdigit() also takes superscripts, which int() refuses.
            if _DIGITS.fullmatch(value.strip()) is None:
                return LINK_MESSAGE_FLOOR
            return max(LINK_MESSAGE_FLOOR, int(value))
    return LINK_MESSAGE_FLOOR
