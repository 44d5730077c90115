"""Named limits and defaults. Every buffer the session keeps has a bound here."""

from __future__ import annotations

import attrs

from ._frames import MAX_UNANSWERED_PINGS, MAX_WINDOW, SettingId

#: The wire-format version spoken by this package (exchanged in HELLO, checked at connect time).
PROTOCOL_VERSION = 1

KIB = 1024
MIB = 1024 * KIB


def _window(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_WINDOW:
        raise ValueError(f"{attribute.name} must be between 1 and {MAX_WINDOW}, not {value}")


def _frame_size(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(
            f"{attribute.name} must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE_LIMIT}"
        )


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{attribute.name} must be between 0 and 2**32 - 1, not {value}")


def _pending_pongs(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    # Below the senders' own bound, an honest peer would be taken for a flooder.
    if not MAX_UNANSWERED_PINGS <= value <= 0xFFFFFFFF:
        raise ValueError(f"{attribute.name} must be at least {MAX_UNANSWERED_PINGS}, not {value}")


MIN_FRAME_SIZE = 1 * KIB
MAX_FRAME_SIZE_LIMIT = 16 * MIB

# The defaults of the announced settings: also what a HELLO that omits one means.
DEFAULT_INITIAL_WINDOW_SIZE = 256 * KIB
DEFAULT_SESSION_WINDOW_SIZE = 64 * MIB
DEFAULT_MAX_FRAME_SIZE = 64 * KIB
DEFAULT_MAX_CONCURRENT_STREAMS = 256
DEFAULT_MAX_METADATA_SIZE = 4 * KIB

# Local-only bounds on what the peer can make this side queue for it (never announced).
#: Pongs queued and not yet handed to the transport. A sender has at most MAX_UNANSWERED_PINGS
#: pings unanswered (a keepalive has one), so an honest peer never makes more pongs wait.
DEFAULT_MAX_PENDING_PONGS = MAX_UNANSWERED_PINGS
#: Control frames (PONG, RESET, WINDOW_UPDATE, GOAWAY) queued and not yet handed to the
#: transport. Well above what honest traffic queues: one RESET and one (coalesced)
#: WINDOW_UPDATE per open stream, 2 x 256 streams with the defaults.
DEFAULT_MAX_QUEUED_CONTROL_FRAMES = 4096


@attrs.frozen(kw_only=True)
class SessionConfig:
    """What one side of a session accepts. The first four are announced to the peer in HELLO."""

    #: Receive window of each stream: how many bytes the peer may send on a stream before the
    #: application consumes any. Credit is returned once half of it has been consumed.
    initial_window_size: int = attrs.field(default=DEFAULT_INITIAL_WINDOW_SIZE, validator=_window)
    #: Session-level receive budget shared by all streams: bounds what the peer can make this
    #: side buffer in total, whatever the number of streams. The default holds the full window
    #: of every stream the peer may open (256 streams x 256 KiB), and credit comes back in
    #: steps of half a stream window, so stalled readers among those streams leave the others
    #: room (SPEC.md, "Stalled streams and the session budget", names the limits).
    session_window_size: int = attrs.field(default=DEFAULT_SESSION_WINDOW_SIZE, validator=_window)
    #: Largest DATA payload accepted in one frame.
    max_frame_size: int = attrs.field(default=DEFAULT_MAX_FRAME_SIZE, validator=_frame_size)
    #: How many streams opened by the peer may be open at once; further OPENs are refused.
    max_concurrent_streams: int = attrs.field(
        default=DEFAULT_MAX_CONCURRENT_STREAMS, validator=_non_negative
    )
    #: Largest OPEN payload (encoded metadata) accepted.
    max_metadata_size: int = attrs.field(default=DEFAULT_MAX_METADATA_SIZE, validator=_non_negative)
    #: Local only: peer-opened streams not yet accepted by the application. Past this bound new
    #: streams are refused with REFUSED_STREAM instead of queueing without limit.
    max_accept_backlog: int = attrs.field(default=128, validator=_non_negative)
    #: Local only: pongs queued for the peer and not yet taken by :meth:`Session.data_to_send`.
    #: A PING that would queue one more is a session error (``ENHANCE_YOUR_CALM``): a peer
    #: that pings without reading the answers cannot make this side buffer them. At least
    #: ``MAX_UNANSWERED_PINGS`` (4), what an honest peer may have in flight.
    max_pending_pongs: int = attrs.field(
        default=DEFAULT_MAX_PENDING_PONGS, validator=_pending_pongs
    )
    #: Local only: control frames (PONG, RESET, WINDOW_UPDATE, GOAWAY) queued and not yet taken
    #: by :meth:`Session.data_to_send`. A frame from the peer that leaves more queued is a
    #: session error (``ENHANCE_YOUR_CALM``), whichever frame it is: the peer is making this
    #: side answer faster than it reads. WINDOW_UPDATEs for one stream are coalesced while
    #: queued, so flow control alone never adds up to this.
    max_queued_control_frames: int = attrs.field(
        default=DEFAULT_MAX_QUEUED_CONTROL_FRAMES, validator=_non_negative
    )

    #: Local only: bytes of stream receive window this side may grant beyond the initial
    #: windows, across the streams in the session at once (:meth:`Session.grow_stream_window`;
    #: SPEC.md, "Flow control", item 10). 0, the default, never grows a window. Add it to
    #: ``session_window_size`` as well, so the grown windows of stalled readers cannot use up
    #: the budget the other streams need (SPEC.md, "Stalled streams and the session budget").
    window_growth_budget: int = attrs.field(default=0, validator=_non_negative)

    def announced(self) -> dict[int, int]:
        return {
            SettingId.INITIAL_WINDOW_SIZE: self.initial_window_size,
            SettingId.MAX_FRAME_SIZE: self.max_frame_size,
            SettingId.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
            SettingId.MAX_METADATA_SIZE: self.max_metadata_size,
            SettingId.SESSION_WINDOW_SIZE: self.session_window_size,
        }
