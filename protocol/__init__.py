"""Sans-IO stream multiplexing for the Repowire daemon link, and the reconnect backoff machine.

Bytes in, events out, bytes out. Nothing here performs I/O, reads a clock or draws randomness:
time and entropy are arguments. The wire format is specified in ``protocol/SPEC.md``.
"""

from ._backoff import Backoff as Backoff
from ._backoff import BackoffConfig as BackoffConfig
from ._backoff import Decision as Decision
from ._backoff import DisconnectReason as DisconnectReason
from ._close_codes import CloseCode as CloseCode
from ._errors import ErrorCode as ErrorCode
from ._errors import FlowControlError as FlowControlError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import StreamClosedError as StreamClosedError
from ._events import DataReceived as DataReceived
from ._events import Event as Event
from ._events import GoAwayReceived as GoAwayReceived
from ._events import HandshakeCompleted as HandshakeCompleted
from ._events import PingReceived as PingReceived
from ._events import PongReceived as PongReceived
from ._events import StreamEnded as StreamEnded
from ._events import StreamOpened as StreamOpened
from ._events import StreamReset as StreamReset
from ._events import WindowUpdated as WindowUpdated
from ._frames import HEADER_SIZE as HEADER_SIZE
from ._frames import PING_PAYLOAD_SIZE as PING_PAYLOAD_SIZE
from ._frames import Flag as Flag
from ._frames import FrameType as FrameType
from ._frames import SettingId as SettingId
from ._frames import decode_metadata as decode_metadata
from ._frames import encode_metadata as encode_metadata
from ._session import Role as Role
from ._session import Session as Session
from ._session_states import SESSION_TRANSITIONS as SESSION_TRANSITIONS
from ._session_states import SessionInput as SessionInput
from ._session_states import SessionState as SessionState
from ._settings import DEFAULT_INITIAL_WINDOW_SIZE as DEFAULT_INITIAL_WINDOW_SIZE
from ._settings import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._settings import SessionConfig as SessionConfig
from ._stream_states import STREAM_TABLE as STREAM_TABLE
from ._stream_states import STREAM_TRANSITIONS as STREAM_TRANSITIONS
from ._stream_states import StreamInput as StreamInput
from ._stream_states import StreamState as StreamState

__all__ = [name for name in dir() if not name.startswith("_")]
