"""The outbound side of relay access: dial the relay, serve its streams, reach other daemons."""

from ._config import DEFAULT_MESH_ALLOWLIST as DEFAULT_MESH_ALLOWLIST
from ._config import ConnectorConfig as ConnectorConfig
from ._config import link_url as link_url
from ._connector import SHUTDOWN_GRACE as SHUTDOWN_GRACE
from ._connector import Connector as Connector
from ._mesh_client import MeshClient as MeshClient
from ._mesh_types import MESH_ERROR_CODES as MESH_ERROR_CODES
from ._mesh_types import MESH_FROM_HEADER as MESH_FROM_HEADER
from ._mesh_types import MeshDirectory as MeshDirectory
from ._mesh_types import MeshError as MeshError
from ._mesh_types import MeshErrorCode as MeshErrorCode
from ._mesh_types import MeshResponse as MeshResponse
from ._status import ConnectorStatus as ConnectorStatus
from ._status import LinkState as LinkState

__all__ = [name for name in dir() if not name.startswith("_")]
