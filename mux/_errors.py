"""The driver's exceptions: one type for "the session is gone"."""

from __future__ import annotations

import trio


class TransportClosed(Exception):
    """The message transport under a session ended.

    ``code`` and ``reason`` are the WebSocket close code and reason when the transport is a
    WebSocket and the peer sent them; ``None`` when the connection just dropped.
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(
            f"transport closed (code {code}): {reason}" if code else "transport closed"
        )
        self.code = code
        self.reason = reason


class SessionClosed(trio.BrokenResourceError):
    """The multiplexed session has ended; no stream can be opened or accepted on it.

    ``reason`` is one clear line on why (the peer went away, a protocol error, a ping timeout,
    the transport closed), for logs and status reports.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StreamResetError(trio.BrokenResourceError):
    """The stream was aborted by the peer (or refused). ``code`` is the wire error code."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code
