"""The trio driver for :mod:`protocol`: multiplexed streams over one message transport.

Used by both the relay and the connector. A :class:`MuxSession` runs under a nursery; each stream
is a :class:`trio.abc.HalfCloseableStream`.
"""

from ._errors import SessionClosed as SessionClosed
from ._errors import StreamResetError as StreamResetError
from ._errors import TransportClosed as TransportClosed
from ._link_profile import LINK_FRAME_SIZE as LINK_FRAME_SIZE
from ._link_profile import LINK_MESSAGE_FLOOR as LINK_MESSAGE_FLOOR
from ._link_profile import LINK_MESSAGE_SIZE as LINK_MESSAGE_SIZE
from ._link_profile import MAX_MESSAGE_HEADER as MAX_MESSAGE_HEADER
from ._link_profile import MAX_STREAM_WINDOW as MAX_STREAM_WINDOW
from ._link_profile import WINDOW_GROWTH_BUDGET as WINDOW_GROWTH_BUDGET
from ._link_profile import link_mux_config as link_mux_config
from ._link_profile import link_protocol_config as link_protocol_config
from ._link_profile import peer_message_limit as peer_message_limit
from ._masking import fast_masking_available as fast_masking_available
from ._masking import install_fast_masking as install_fast_masking
from ._session import MuxConfig as MuxConfig
from ._session import MuxSession as MuxSession
from ._session import WindowBudget as WindowBudget
from ._splice import BULK_SPLICE_CHUNK as BULK_SPLICE_CHUNK
from ._splice import SPLICE_CHUNK as SPLICE_CHUNK
from ._splice import ChunkSize as ChunkSize
from ._splice import GrowingChunks as GrowingChunks
from ._splice import splice as splice
from ._stream import MuxStream as MuxStream
from ._transport import MemoryTransport as MemoryTransport
from ._transport import MessageTransport as MessageTransport
from ._transport import WebSocketTransport as WebSocketTransport
from ._transport import memory_transport_pair as memory_transport_pair

__all__ = [name for name in dir() if not name.startswith("_")]
