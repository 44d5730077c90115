"""Delivering messages: to local peers as ``message`` events, to other daemons over the mesh.

Shared by the HTTP routes and the WebSocket so both behave the same. Local failures raise
:class:`ApiError`; an answer from another daemon is passed back as ``(status, json_object)``
whatever its status.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Final

import trio

from common import is_daemon_id

from ._dedupe import RecentMessages, fingerprint, message_id_field
from ._errors import ApiError, dump_json, parse_json_object
from ._mesh import MeshClient, MeshError, MeshResponse
from ._settings import MAX_SENDER_LENGTH, DaemonSettings
from ._state import DaemonState, is_valid_name

JSON_HEADERS: Final = (("Content-Type", "application/json"),)

#: The ``target`` of a broadcast result that stands for every other daemon at once (used when
#: the list of daemons could not be had).
ALL_DAEMONS: Final = "*"


def _text_field(payload: Mapping[str, object]) -> str:
    text = payload.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "bad_request", "The field 'text' is required and must be a string.")
    return text


def _sender_field(payload: Mapping[str, object]) -> str | None:
    sender = payload.get("from")
    if sender is None:
        return None
    if not isinstance(sender, str) or not 1 <= len(sender) <= MAX_SENDER_LENGTH:
        raise ApiError(
            400,
            "bad_request",
            f"The field 'from' must be a string of 1 to {MAX_SENDER_LENGTH} characters.",
        )
    return sender


def parse_target(to: object) -> tuple[str, str | None]:
    """Split a ``to`` field into ``(peer, daemon_id or None)``; raises ApiError(400)."""
    if not isinstance(to, str):
        raise ApiError(400, "bad_request", "The field 'to' is required and must be a string.")
    peer, at, daemon_id = to.partition("@")
    if not is_valid_name(peer) or (at and not is_daemon_id(daemon_id)):
        raise ApiError(
            400,
            "bad_request",
            "The field 'to' must be 'peer' or 'peer@daemon', each part 1 to 64 characters "
            "from A-Z, a-z, 0-9, '.', '_', '-'.",
        )
    return peer, (daemon_id if at else None)


class KnownDaemons:
    """The other daemons of the scope seen so far (in the relay's list or answering over the
    mesh), least recently seen first; at most ``capacity``, the least recent forgotten."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def saw(self, daemon_ids: Iterable[str]) -> None:
        for daemon_id in daemon_ids:
            self._seen.pop(daemon_id, None)
            self._seen[daemon_id] = None
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def forget(self, daemon_id: str) -> None:
        self._seen.pop(daemon_id, None)

    def ids(self) -> list[str]:
        return list(self._seen)


class Messenger:
    """Sends messages on behalf of one daemon.

    ``via`` arguments carry the id of the daemon a request came from over the mesh (None for
    local requests); it is recorded in the message event, and such requests are never sent on
    to further daemons.
    """

    def __init__(
        self,
        *,
        daemon_id: str,
        state: DaemonState,
        mesh: MeshClient | None,
        settings: DaemonSettings,
    ) -> None:
        self._daemon_id = daemon_id
        self._state = state
        self._mesh = mesh
        self._settings = settings
        self._recent = RecentMessages(
            capacity=settings.message_id_memory, ttl=settings.message_id_ttl
        )
        self._known = KnownDaemons(settings.max_known_daemons)

    def deliver_local(self, peer: str, text: str, sender: str | None, via: str | None) -> int:
        """Publish a ``message`` event for local ``peer``; returns its event id.

        Raises ``ApiError(404, "unknown_peer")`` if no such peer is registered.
        """
        if self._state.get_peer(peer) is None:
            raise ApiError(404, "unknown_peer", f"No peer named {peer!r} is registered here.")
        data: dict[str, object] = {"from": sender, "to": peer, "text": text}
        if via is not None:
            data["via"] = via
        return self._state.publish("message", data).id

    async def notify(
        self, payload: Mapping[str, object], *, via: str | None
    ) -> tuple[int, dict[str, object]]:
        """Handle a notify request body; returns the HTTP status and JSON answer.

        The message's ``id`` (the payload's, else a new one) is in every answer, errors
        included, so a sender that got an error can retry the same message safely: the daemon
        that delivers it answers a repeated id with the first delivery's answer and delivers
        nothing again (``409 id_reused`` if the id came with other content). A malformed
        ``id`` is ``400 bad_request`` and nothing is sent.
        """
        message_id = message_id_field(payload)
        try:
            return await self._notify(payload, message_id, via=via)
        except ApiError as exc:
            raise exc.with_fields(id=message_id) from None

    async def _notify(
        self, payload: Mapping[str, object], message_id: str, *, via: str | None
    ) -> tuple[int, dict[str, object]]:
        peer, daemon_id = parse_target(payload.get("to"))
        text = _text_field(payload)
        sender = _sender_field(payload)
        if daemon_id is None or daemon_id == self._daemon_id:
            digest = fingerprint("notify", peer, text, sender)
            previous = self._recent.previous(message_id, digest)
            if previous is not None:
                return 200, dict(previous)
            event_id = self.deliver_local(peer, text, sender, via)
            answer: dict[str, object] = {
                "delivered": True,
                "to": peer,
                "daemon_id": self._daemon_id,
                "event_id": event_id,
                "id": message_id,
            }
            self._recent.remember(message_id, digest, answer)
            return 200, answer
        if via is not None:
            raise ApiError(
                400, "bad_request", "A request that arrived over the mesh is not sent on again."
            )
        body = dump_json({"to": peer, "text": text, "from": sender, "id": message_id}).encode()
        response = await self._mesh_request(daemon_id, "/notify", body)
        status, answer = self._relayed_answer(daemon_id, response)
        # Ours, whatever the other daemon said: it is the id the sender must retry with.
        answer["id"] = message_id
        return status, answer

    async def broadcast(
        self, payload: Mapping[str, object], *, via: str | None
    ) -> list[dict[str, object]]:
        """Deliver to every local peer and, for local requests, every other daemon.

        Returns one result per target: ``{"target", "ok", "error"?, "detail"?}``. Local peers
        are named plainly, peers of another daemon ``peer@daemon``, and a daemon that could
        not be reached as a whole ``*@daemon``. Every daemon this one knows of is in the
        results: those the relay lists are contacted (in its order), those seen before but no
        longer listed follow as ``daemon_offline``, sorted by id. When the list is unavailable
        each known daemon carries that error, sorted by id (:data:`ALL_DAEMONS` stands for
        them if none is known).
        """
        text = _text_field(payload)
        sender = _sender_field(payload)
        results: list[dict[str, object]] = []
        for peer in self._state.peers():
            self.deliver_local(peer.name, text, sender, via)
            results.append({"target": peer.name, "ok": True})
        if via is not None or self._mesh is None:
            return results
        try:
            daemons = await self._other_daemons()
        except ApiError as exc:
            known = sorted(self._known.ids())
            for daemon_id in known or [ALL_DAEMONS]:
                target = daemon_id if daemon_id == ALL_DAEMONS else f"*@{daemon_id}"
                results.append({"target": target, "ok": False, **exc.to_json()})
            return results
        listed = set(daemons)
        offline = sorted(d for d in self._known.ids() if d not in listed)
        body = dump_json({"text": text, "from": sender}).encode()
        remote: dict[str, list[dict[str, object]]] = {}
        limiter = trio.CapacityLimiter(self._settings.mesh_fanout_limit)

        async def reach(daemon_id: str) -> None:
            async with limiter:
                remote[daemon_id] = await self._remote_broadcast(daemon_id, body)

        async with trio.open_nursery() as nursery:
            for daemon_id in daemons:
                nursery.start_soon(reach, daemon_id)
        for daemon_id in daemons:
            results.extend(remote[daemon_id])
        for daemon_id in offline:
            results.append(
                {
                    "target": f"*@{daemon_id}",
                    "ok": False,
                    "error": "daemon_offline",
                    "detail": f"Daemon {daemon_id!r} was seen in this scope before but is "
                    "not connected now.",
                }
            )
        return results

    # -- mesh ---------------------------------------------------------------------------

    def _require_mesh(self) -> MeshClient:
        if self._mesh is None:
            raise ApiError(
                503,
                "relay_disabled",
                "The relay is disabled on this daemon, so other daemons cannot be reached.",
            )
        return self._mesh

    async def _other_daemons(self) -> list[str]:
        mesh = self._require_mesh()
        with trio.move_on_after(self._settings.mesh_request_timeout):
            try:
                found = await mesh.directory()
            except MeshError as exc:
                raise ApiError.from_mesh(exc) from None
            # Order kept, duplicates, this daemon and malformed ids left out.
            online, offline = (
                list(dict.fromkeys(d for d in ids if d != self._daemon_id and is_daemon_id(d)))
                for ids in (found.online, found.offline)
            )
            # The relay remembers daemons this one has never seen (it may have just started):
            # a broadcast names those that are offline too. Online ones are the freshest.
            self._known.saw(offline)
            self._known.saw(online)
            return online
        raise ApiError(504, "timeout", "The list of other daemons did not arrive in time.")

    async def _mesh_request(self, daemon_id: str, path: str, body: bytes) -> MeshResponse:
        mesh = self._require_mesh()
        with trio.move_on_after(self._settings.mesh_request_timeout):
            try:
                response = await mesh.request(
                    daemon_id, "POST", path, body=body, headers=JSON_HEADERS
                )
            except MeshError as exc:
                if exc.code == "unknown_daemon":
                    # The relay has never heard of it (any more): stop reporting it.
                    self._known.forget(daemon_id)
                raise ApiError.from_mesh(exc) from None
            self._known.saw([daemon_id])
            return response
        raise ApiError(
            504,
            "timeout",
            f"Daemon {daemon_id!r} did not answer within "
            f"{self._settings.mesh_request_timeout:g} seconds.",
        )

    @staticmethod
    def _relayed_answer(daemon_id: str, response: MeshResponse) -> tuple[int, dict[str, object]]:
        """Pass another daemon's 2xx/4xx/5xx JSON answer back; anything else is a 502."""
        status = response.status
        if 200 <= status < 300 or 400 <= status < 600:
            try:
                return status, parse_json_object(response.body, "The answer")
            except ApiError:
                pass
        raise ApiError(
            502,
            "bad_gateway",
            f"Daemon {daemon_id!r} sent an answer that is not a JSON object (status {status}).",
        )

    async def _remote_broadcast(self, daemon_id: str, body: bytes) -> list[dict[str, object]]:
        whole = f"*@{daemon_id}"
        try:
            response = await self._mesh_request(daemon_id, "/broadcast", body)
            status, answer = self._relayed_answer(daemon_id, response)
        except ApiError as exc:
            return [{"target": whole, "ok": False, **exc.to_json()}]
        if status != 200:
            error = answer.get("error")
            detail = answer.get("detail")
            return [
                {
                    "target": whole,
                    "ok": False,
                    "error": error if isinstance(error, str) else f"http_{status}",
                    "detail": detail
                    if isinstance(detail, str)
                    else f"Daemon {daemon_id!r} answered with status {status}.",
                }
            ]
        items = answer.get("results")
        if not isinstance(items, list) or not all(_is_result(item) for item in items):
            return [
                {
                    "target": whole,
                    "ok": False,
                    "error": "bad_gateway",
                    "detail": f"Daemon {daemon_id!r} sent broadcast results in a bad shape.",
                }
            ]
        results: list[dict[str, object]] = []
        for item in items:
            result = {k: v for k, v in item.items() if k in ("ok", "error", "detail")}
            results.append({"target": f"{item['target']}@{daemon_id}", **result})
        return results


def _is_result(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("target"), str)
        and isinstance(item.get("ok"), bool)
    )
