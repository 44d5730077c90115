"""The daemon side of one tunneled exchange, spoken on a multiplexed stream the relay opened.

- :class:`ScriptedHttp`: one HTTP/1.1 exchange (h11, server side): the test decides when each
  byte of the response is written and sees exactly what reached "the daemon".
- :class:`ScriptedWebSocket`: one WebSocket (wsproto, server side).

Streams come from a stand-in daemon link (:mod:`tests.support.stand_in`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import h11
import trio
import wsproto
import wsproto.events as ws_events
from wsproto.connection import ConnectionState

from mux import MuxStream

from .clients import read_to_end

#: Bytes read from a stream at a time.
READ_SIZE = 64 * 1024
#: Largest request body :meth:`ScriptedHttp.read_body` buffers.
MAX_SCRIPTED_BODY = 8 * 1024 * 1024


class ScriptedHttp:
    """The daemon side of one tunneled HTTP/1.1 exchange, spoken with h11 on a stream.

    Call :meth:`receive_request` first; then read the body with :meth:`receive_data` (or
    :meth:`read_body`) and answer with :meth:`respond`, or piece by piece with
    :meth:`send_head`, :meth:`send_data` and :meth:`finish`. Stream errors (a reset by the
    relay, the link going down) surface as :class:`trio.BrokenResourceError`.
    """

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        #: Request body bytes received so far.
        self.body_received = 0

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(READ_SIZE))

    async def receive_request(self) -> h11.Request:
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            raise AssertionError(f"expected a request head, got {event!r}")
        self.request = event
        return event

    @property
    def target(self) -> str:
        assert self.request is not None
        return self.request.target.decode("latin-1")

    @property
    def method(self) -> str:
        assert self.request is not None
        return self.request.method.decode("latin-1")

    def header_values(self, name: str) -> list[str]:
        """Every value of request header ``name`` (case-insensitive), in order."""
        assert self.request is not None
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.request.headers if k.lower() == wanted]

    def header_names(self) -> list[str]:
        assert self.request is not None
        return [k.decode("latin-1").lower() for k, _ in self.request.headers]

    async def receive_data(self) -> bytes | None:
        """The next piece of the request body (never empty), or None at its end."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                if not event.data:
                    continue
                self.body_received += len(event.data)
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            raise AssertionError(f"unexpected event in the request body: {event!r}")

    async def read_body(self, limit: int = MAX_SCRIPTED_BODY) -> bytes:
        return await read_to_end(self.receive_data, limit, "request body")

    async def send_head(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """The response head. Without a Content-Length the body goes out chunked."""
        response = h11.Response(status_code=status, headers=list(headers))
        await self.stream.send_all(self.conn.send(response) or b"")

    async def send_data(self, data: bytes) -> None:
        await self.stream.send_all(self.conn.send(h11.Data(data=data)) or b"")

    async def finish(self) -> None:
        """End the response and half-close the stream."""
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
        await self.stream.send_eof()

    async def respond(
        self, status: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A whole response with a Content-Length."""
        await self.send_head(status, [*headers, ("content-length", str(len(body)))])
        if body:
            await self.send_data(body)
        await self.finish()

    async def respond_json(self, status: int, document: object) -> None:
        await self.respond(
            status, json.dumps(document).encode(), [("content-type", "application/json")]
        )


class ScriptedWebSocket:
    """The daemon side of one tunneled WebSocket, spoken with wsproto on a stream.

    :meth:`accept` reads the upgrade request the relay sends and accepts it; then
    :meth:`receive` returns whole messages (text as ``str``, binary as ``bytes``) or the
    peer's :class:`wsproto.events.CloseConnection` (answered at once). Pings are answered.
    """

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        self.request: ws_events.Request | None = None
        self._pending: list[ws_events.Event] = []

    async def _next_event(self) -> ws_events.Event:
        while not self._pending:
            data = await self.stream.receive_some(READ_SIZE)
            self.conn.receive_data(data or None)
            self._pending.extend(self.conn.events())
            if not data and not self._pending:
                raise trio.BrokenResourceError("the stream ended")
        return self._pending.pop(0)

    async def accept(self) -> ws_events.Request:
        event = await self._next_event()
        if not isinstance(event, ws_events.Request):
            raise AssertionError(f"expected an upgrade request, got {event!r}")
        self.request = event
        await self.stream.send_all(self.conn.send(ws_events.AcceptConnection()))
        return event

    def header_names(self) -> list[str]:
        assert self.request is not None
        return [bytes(k).decode("latin-1").lower() for k, _ in self.request.extra_headers]

    async def receive(self) -> str | bytes | ws_events.CloseConnection:
        text: list[str] = []
        binary: list[bytes] = []
        while True:
            event = await self._next_event()
            if isinstance(event, ws_events.TextMessage):
                text.append(event.data)
                if event.message_finished:
                    return "".join(text)
            elif isinstance(event, ws_events.BytesMessage):
                binary.append(bytes(event.data))
                if event.message_finished:
                    return b"".join(binary)
            elif isinstance(event, ws_events.Ping):
                await self.stream.send_all(self.conn.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                if self.conn.state is ConnectionState.REMOTE_CLOSING:
                    await self.stream.send_all(self.conn.send(event.response()))
                return event

    async def send(self, message: str | bytes) -> None:
        event: ws_events.Event = (
            ws_events.TextMessage(data=message)
            if isinstance(message, str)
            else ws_events.BytesMessage(data=message)
        )
        await self.stream.send_all(self.conn.send(event))

    async def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code``."""
        await self.stream.send_all(self.conn.send(ws_events.CloseConnection(code, reason)))
