"""What a mesh request returns or raises: shared by the connector and the daemon."""

from __future__ import annotations

from typing import Final, Literal, get_args

import attrs

MeshErrorCode = Literal["unknown_daemon", "daemon_offline", "relay_down", "forbidden", "timeout"]
MESH_ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(MeshErrorCode))

#: Added by the connector to requests that arrived over the mesh (value: the sending daemon's
#: id) and stripped from every other request, so its presence means "from another daemon".
MESH_FROM_HEADER: Final = "Repowire-Mesh-From"


class MeshError(Exception):
    """A mesh request could not reach the other daemon, or was refused on the way.

    ``code`` is one of :data:`MESH_ERROR_CODES`; ``detail`` is one sentence for a human. Neither
    contains a secret: both end up in HTTP error bodies.
    """

    def __init__(self, code: MeshErrorCode, detail: str) -> None:
        if code not in MESH_ERROR_CODES:
            raise ValueError(f"unknown mesh error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code: MeshErrorCode = code
        self.detail = detail


@attrs.frozen(kw_only=True)
class MeshDirectory:
    """The other daemons of this daemon's scope, as the relay lists them."""

    #: Connected now.
    online: tuple[str, ...]
    #: Seen in the scope before and not connected now, the most recently seen first (empty
    #: when the relay could not say).
    offline: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class MeshResponse:
    """The other daemon's HTTP answer, whole. Header names are lower-case (as h11 reads
    them), values as received."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
