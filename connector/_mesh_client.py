"""Reaching the other daemons of this daemon's scope through the relay (the mesh).

Each call opens one stream on whatever session the connector has live at that moment: a raw
stream the relay splices to another daemon, one HTTP request over such a stream, or the
relay's list of the scope's daemons.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import h11
import trio

from mux import MuxSession, MuxStream, SessionClosed, StreamResetError
from protocol import ErrorCode

from ._config import ConnectorConfig
from ._mesh_types import MeshDirectory, MeshError, MeshResponse

#: Largest mesh response body read by :meth:`MeshClient.request` (and largest daemon list).
MAX_MESH_RESPONSE = 8 * 1024 * 1024


class MeshClient:
    """Mesh calls over the connector's link. Every failure is a :class:`MeshError`, never
    silence.

    ``session`` returns the connector's current session (``None`` while the link is down);
    ``config`` its current settings (``daemon_id``, ``mesh_timeout``). Both are read at each
    call, so the client follows the link through reconnections.
    """

    def __init__(
        self,
        session: Callable[[], MuxSession | None],
        config: Callable[[], ConnectorConfig],
    ) -> None:
        self._session = session
        self._config = config

    def _live_session(self) -> MuxSession:
        session = self._session()
        if session is None or session.ended:
            raise MeshError("relay_down", "The relay link is down; see `repowire status`.")
        return session

    async def open_stream(self, daemon_id: str) -> MuxStream:
        """A raw stream to another daemon of this scope (the relay splices it)."""
        session = self._live_session()
        try:
            return await session.open_stream({"kind": "mesh", "target": daemon_id})
        except SessionClosed:
            raise MeshError("relay_down", "The relay link closed; see `repowire status`.") from None

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        """One HTTP request to another daemon of the scope, answered whole.

        Raises :class:`MeshError`: ``unknown_daemon``, ``daemon_offline``, ``forbidden`` (the
        target's allowlist or the relay refused), ``relay_down``, ``timeout``.
        """
        timeout = self._config().mesh_timeout
        with trio.move_on_after(timeout) as scope:
            stream = await self.open_stream(daemon_id)
            try:
                return await _http_exchange(stream, method, path, body, headers)
            except StreamResetError as exc:
                raise _mesh_error(exc.code, daemon_id) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                raise MeshError(
                    "relay_down", f"The link to {daemon_id} broke during the request."
                ) from None
            finally:
                await trio.aclose_forcefully(stream)
        assert scope.cancelled_caught
        raise MeshError("timeout", f"{daemon_id} did not answer within {timeout:g} s.")

    async def other_daemons(self) -> list[str]:
        """Ids of the other daemons of this scope that are online now (asked of the relay)."""
        return list((await self.directory()).online)

    async def directory(self) -> MeshDirectory:
        """The other daemons of this scope, online now and seen before (asked of the relay).
        Raises :class:`MeshError` (``relay_down``, ``timeout``) when the list cannot be had."""
        session = self._live_session()
        try:
            stream = await session.open_stream({"kind": "directory"})
        except SessionClosed:
            raise MeshError("relay_down", "The relay link closed; see `repowire status`.") from None
        try:
            with trio.fail_after(self._config().mesh_timeout):
                data = await _read_all(stream)
        except trio.TooSlowError:
            raise MeshError("timeout", "The relay did not list the daemons in time.") from None
        except trio.BrokenResourceError:
            raise MeshError("relay_down", "The relay link broke while listing daemons.") from None
        finally:
            await trio.aclose_forcefully(stream)
        return _parse_directory(data, own=self._config().daemon_id)


async def _read_all(stream: MuxStream) -> bytes:
    """The relay's whole answer on ``stream``, at most :data:`MAX_MESH_RESPONSE` bytes."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
        if len(data) > MAX_MESH_RESPONSE:
            raise MeshError("relay_down", "The relay's daemon list is too large.")
    return bytes(data)


def _parse_directory(data: bytes, *, own: str) -> MeshDirectory:
    """The relay's daemon list (JSON), without this daemon (``own``)."""
    try:
        listing = json.loads(data)
        online = [str(d["daemon_id"]) for d in listing["daemons"]]
        # Older relays send no "offline": nothing is known of those then.
        offline = [str(d["daemon_id"]) for d in listing.get("offline", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MeshError("relay_down", "The relay sent a malformed daemon list.") from None
    return MeshDirectory(
        online=tuple(d for d in online if d != own),
        offline=tuple(d for d in offline if d != own),
    )


def _mesh_error(code: int, daemon_id: str) -> MeshError:
    """The :class:`MeshError` for a mesh stream the relay reset with ``code``."""
    if code == ErrorCode.UNKNOWN_TARGET:
        return MeshError("unknown_daemon", f"No daemon {daemon_id} in this scope.")
    if code == ErrorCode.TARGET_OFFLINE:
        return MeshError("daemon_offline", f"Daemon {daemon_id} is offline.")
    if code == ErrorCode.FORBIDDEN:
        return MeshError("forbidden", f"The relay refused the stream to {daemon_id}.")
    return MeshError("relay_down", f"The stream to {daemon_id} was reset (code {code}).")


def _request_bytes(
    conn: h11.Connection,
    method: str,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
) -> bytes:
    """The whole request, framed by ``conn``. The caller's ``host``, ``connection`` and
    ``content-length`` headers are replaced by the mesh's own."""
    request_headers = [("host", "repowire-daemon"), ("connection", "close")]
    request_headers += [
        (k, v) for k, v in headers if k.lower() not in ("host", "connection", "content-length")
    ]
    request_headers.append(("content-length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=path, headers=request_headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data


async def _http_exchange(
    stream: MuxStream,
    method: str,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
) -> MeshResponse:
    """Send one request on ``stream`` and read its response whole. Raises
    :class:`h11.ProtocolError` for a response that is malformed, cut short or larger than
    :data:`MAX_MESH_RESPONSE`."""
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(_request_bytes(conn, method, path, body, headers))
    status = 0
    response_headers: list[tuple[str, str]] = []
    response_body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            response_headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            ]
        elif isinstance(event, h11.Data):
            response_body += event.data
            if len(response_body) > MAX_MESH_RESPONSE:
                raise h11.RemoteProtocolError("mesh response too large")
        elif isinstance(event, h11.EndOfMessage):
            return MeshResponse(status=status, headers=response_headers, body=bytes(response_body))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the stream ended before the response")
