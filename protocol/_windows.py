"""Flow-control windows: one class for both levels, a stream and the session as a whole.

A :class:`Window` keeps both directions of one level (SPEC.md, "Flow control"):

- the **send window** mirrors what the peer lets this side send. The peer's HELLO and its
  WINDOW_UPDATEs add to it (:meth:`Window.credit`); DATA sent takes from it
  (:meth:`Window.spend`).
- the **receive window** is what this side still lets the peer send. DATA received takes from
  it (:meth:`Window.check_received` on the frame's header, :meth:`Window.received` once the
  payload is in); the bytes then wait for the application. When it has consumed them
  (:meth:`Window.acknowledge`) they are credited back to the peer in steps: nothing until a
  step's worth has been consumed since the last WINDOW_UPDATE, then all of it at once.

The window grows back only by what it returns in a WINDOW_UPDATE, so what the peer may send
never exceeds its :attr:`~Window.size`: ``recv_window + unacked + pending`` is that size until
:meth:`Window.release` or :meth:`Window.discard` let bytes go without crediting them. The size
starts at the receive window given and changes only by :meth:`Window.grow`, which grants the
peer more than was consumed (SPEC.md, "Flow control", item 10).

Nothing here queues a frame: the session turns a returned increment into a WINDOW_UPDATE.
"""

from __future__ import annotations

from ._errors import ErrorCode, FlowControlError, LocalProtocolError, RemoteProtocolError
from ._frames import MAX_WINDOW


def credit_step(window_size: int) -> int:
    """Half of ``window_size``, at least one byte: a WINDOW_UPDATE may not carry a zero
    increment, so a window of one byte must still return its credit."""
    return max(1, window_size // 2)


class Window:
    """Both windows of one stream, or of the session (``stream_id`` 0).

    Every method either completes or raises with the window unchanged.
    """

    __slots__ = ("_step", "pending", "recv_window", "send_window", "size", "stream_id", "unacked")

    def __init__(self, stream_id: int, *, send: int, receive: int, step: int) -> None:
        if not 0 <= send <= MAX_WINDOW or not 0 <= receive <= MAX_WINDOW:
            raise ValueError(f"a window is between 0 and {MAX_WINDOW} bytes")
        if step < 1:
            raise ValueError("the credit step is at least one byte")
        #: The stream these windows belong to; 0 for the session. Names it in error messages.
        self.stream_id = stream_id
        #: What the peer still lets this side send.
        self.send_window = send
        #: What this side still lets the peer send.
        self.recv_window = receive
        #: The receive window granted in all: what the peer may have sent and not yet had
        #: credited back. Raised only by :meth:`grow`.
        self.size = receive
        #: Received, not yet acknowledged by the application.
        self.unacked = 0
        #: Acknowledged, not yet credited back to the peer.
        self.pending = 0
        self._step = step

    # ------------------------------------------------------------------ receiving

    def check_received(self, size: int) -> None:
        """Raise :class:`RemoteProtocolError` (``FLOW_CONTROL_ERROR``) if a DATA frame of
        ``size`` bytes would overrun the receive window. Checked on the header, before the
        payload is buffered."""
        if size > self.recv_window:
            raise self.overrun(size)

    def overrun(self, size: int) -> RemoteProtocolError:
        """The error for a DATA frame of ``size`` bytes that does not fit the receive window."""
        if self.stream_id:
            where = f"the window of stream {self.stream_id} ({self.recv_window})"
        else:
            where = f"the session window of {self.recv_window}"
        return RemoteProtocolError(
            f"DATA frame of {size} bytes exceeds {where}", ErrorCode.FLOW_CONTROL_ERROR
        )

    def received(self, size: int) -> None:
        """A DATA payload of ``size`` bytes arrived: it leaves the receive window and waits for
        the application. Raises as :meth:`check_received` does if it does not fit."""
        if size > self.recv_window:
            raise self.overrun(size)
        self.recv_window -= size
        self.unacked += size

    def acknowledge(self, amount: int) -> int | None:
        """The application consumed ``amount`` received bytes.

        Returns the increment of the WINDOW_UPDATE to send, the whole amount consumed since the
        last one, once that reaches the step (the window grows back by it); ``None`` before
        that. Raises :class:`LocalProtocolError` when ``amount`` is more than is
        unacknowledged.
        """
        if amount > self.unacked:
            raise self._over_acknowledged(amount)
        self.unacked -= amount
        pending = self.pending + amount
        if pending >= self._step:
            self.pending = 0
            self.recv_window += pending
            return pending
        self.pending = pending
        return None

    def grow(self, increment: int) -> int:
        """Grant the peer ``increment`` bytes beyond what was consumed: the receive window and
        its :attr:`size` grow by it, and credit goes back in steps of half the new size.
        Returns the increment of the WINDOW_UPDATE to send: ``increment`` plus any consumed
        bytes still waiting for their step, which go out with it. Raises ValueError for an
        increment below 1 or one that would take the size past 2**31 - 1."""
        if increment < 1:
            raise ValueError("a window grows by at least one byte")
        if self.size + increment > MAX_WINDOW:
            raise ValueError(f"a window is at most {MAX_WINDOW} bytes")
        self.size += increment
        self._step = credit_step(self.size)
        granted = increment + self.pending
        self.recv_window += granted
        self.pending = 0
        return granted

    def release(self, amount: int) -> None:
        """Acknowledge ``amount`` bytes without ever crediting them back: the peer has finished
        sending here (SPEC.md, "Flow control", item 6). Raises as :meth:`acknowledge` does."""
        if amount > self.unacked:
            raise self._over_acknowledged(amount)
        self.unacked -= amount

    def discard(self) -> int:
        """Forget every unacknowledged byte (the application will never read them) and return
        how many there were: the reset rule (SPEC.md, "Flow control", item 8)."""
        unacked, self.unacked = self.unacked, 0
        return unacked

    def _over_acknowledged(self, amount: int) -> LocalProtocolError:
        return LocalProtocolError(
            f"acknowledging {amount} bytes on stream {self.stream_id}; "
            f"only {self.unacked} are unacknowledged"
        )

    # ------------------------------------------------------------------ sending

    def credit(self, increment: int) -> None:
        """The peer granted ``increment`` more bytes (a WINDOW_UPDATE, or its HELLO). Raises
        :class:`RemoteProtocolError` (``FLOW_CONTROL_ERROR``) if the send window would exceed
        2**31 - 1."""
        if self.send_window + increment > MAX_WINDOW:
            if self.stream_id:
                raise RemoteProtocolError(
                    f"window of stream {self.stream_id} grew past 2**31 - 1",
                    ErrorCode.FLOW_CONTROL_ERROR,
                )
            raise RemoteProtocolError(
                "session window grew past 2**31 - 1", ErrorCode.FLOW_CONTROL_ERROR
            )
        self.send_window += increment

    def spend(self, size: int) -> None:
        """DATA of ``size`` bytes is going out. Raises :class:`FlowControlError` if the send
        window is smaller. A send takes from two windows, its stream's and the session's: a
        caller checks both before it spends from either."""
        if size > self.send_window:
            where = f"stream {self.stream_id}" if self.stream_id else "the session"
            raise FlowControlError(
                f"{size} bytes exceed the send window of {where} ({self.send_window} bytes)",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.send_window -= size
