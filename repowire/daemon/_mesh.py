"""The daemon's view of the mesh: how it reaches other daemons of its scope.

The connector implements :class:`MeshClient`; the daemon only calls it. Keeping the interface
here (and tiny) lets the daemon be tested with a fake and run without a relay at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal, Protocol, get_args

import attrs

MeshErrorCode = Literal["unknown_daemon", "daemon_offline", "relay_down", "forbidden", "timeout"]

MESH_ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(MeshErrorCode))

#: The header the connector adds to a request that arrived over the mesh; its value is the id of
#: the daemon that sent it. The connector strips it from every other request, so its presence
#: means "this came from another daemon of the scope".
MESH_FROM_HEADER: Final = "Repowire-Mesh-From"


class MeshError(Exception):
    """A mesh request could not reach the other daemon, or was refused on the way.

    ``code`` is one of :data:`MESH_ERROR_CODES`; ``detail`` is one sentence for a human. Neither
    may contain a secret: both end up in HTTP error bodies.
    """

    def __init__(self, code: MeshErrorCode, detail: str) -> None:
        if code not in MESH_ERROR_CODES:
            raise ValueError(f"unknown mesh error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code: MeshErrorCode = code
        self.detail = detail


@attrs.frozen(kw_only=True)
class MeshResponse:
    """The other daemon's HTTP answer, whole. Header names are as received."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class MeshClient(Protocol):
    """What the daemon needs from the connector to talk to other daemons."""

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        """Send one HTTP request to daemon ``daemon_id`` and return its response.

        Raises :class:`MeshError` when the request cannot be delivered or answered. A response
        of any status (including 4xx/5xx from the other daemon) is returned, not raised.
        """
        ...

    async def other_daemons(self) -> list[str]:
        """The ids of the other daemons currently known in this daemon's scope.

        Raises :class:`MeshError` (typically ``relay_down``) when the list is unavailable.
        """
        ...
