"""The daemon's view of the mesh: how it reaches other daemons of its scope.

The connector implements :class:`MeshClient`; the daemon only calls it. The error and
response types are the connector's own (re-exported here), so an ``except MeshError`` in the
daemon catches exactly what the connector raises. Keeping the interface tiny lets the daemon
be tested with a fake and run without a relay at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from connector import MESH_ERROR_CODES as MESH_ERROR_CODES
from connector import MESH_FROM_HEADER as MESH_FROM_HEADER
from connector import MeshDirectory as MeshDirectory
from connector import MeshError as MeshError
from connector import MeshErrorCode as MeshErrorCode
from connector import MeshResponse as MeshResponse


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

    async def directory(self) -> MeshDirectory:
        """The other daemons of this daemon's scope: online now, and seen before but offline.

        Raises :class:`MeshError` (typically ``relay_down``) when the list is unavailable.
        """
        ...
