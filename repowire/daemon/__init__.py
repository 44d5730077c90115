"""The local Repowire daemon: its state, its HTTP service and the server that runs it."""

from __future__ import annotations

from ._app import create_app as create_app
from ._errors import MESH_ERROR_STATUS as MESH_ERROR_STATUS
from ._mesh import MESH_ERROR_CODES as MESH_ERROR_CODES
from ._mesh import MESH_FROM_HEADER as MESH_FROM_HEADER
from ._mesh import MeshClient as MeshClient
from ._mesh import MeshDirectory as MeshDirectory
from ._mesh import MeshError as MeshError
from ._mesh import MeshErrorCode as MeshErrorCode
from ._mesh import MeshResponse as MeshResponse
from ._server import DEFAULT_HOST as DEFAULT_HOST
from ._server import DEFAULT_PORT as DEFAULT_PORT
from ._server import GRACEFUL_SHUTDOWN_TIMEOUT as GRACEFUL_SHUTDOWN_TIMEOUT
from ._server import STALLED_CLIENT_TIMEOUT as STALLED_CLIENT_TIMEOUT
from ._server import serve_daemon as serve_daemon
from ._settings import DaemonSettings as DaemonSettings
from ._state import MAX_EVENTS as MAX_EVENTS
from ._state import MAX_PEERS as MAX_PEERS
from ._state import SUBSCRIBER_BUFFER as SUBSCRIBER_BUFFER
from ._state import DaemonEvent as DaemonEvent
from ._state import DaemonState as DaemonState
from ._state import FeedDropped as FeedDropped
from ._state import InvalidPeerName as InvalidPeerName
from ._state import Peer as Peer
from ._state import Subscription as Subscription
from ._state import TooManyPeers as TooManyPeers
from ._state import UnknownPeer as UnknownPeer
from ._state import is_valid_name as is_valid_name
