"""What a stranger can make the relay hold before and during a WebSocket handshake.

- No WebSocket the relay serves negotiates permessage-deflate (a compressed frame is inflated
  whole before any size limit applies: a quarter of a megabyte became hundreds on the relay),
  neither ``/ws/relay`` nor a tunneled browser WebSocket; a frame with the compression bit set
  is a protocol error.
- A relay process's memory stays flat while strangers (and a key holder) send compressed bombs.
- The largest WebSocket message comes from the settings, never below a link's messages.
"""

from __future__ import annotations

import base64
import os
import re
import zlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest
import trio
import wsproto.events as ws_events

from mux import MuxStream
from relay import RelaySettings, _server
from tests.support.clients import Address
from tests.support.links import LINK_PATH, link_headers
from tests.support.processes import Cli, RelayProcess
from tests.support.relays import StackFactory
from tests.support.scripted import ScriptedWebSocket
from tests.support.stand_in import start_stand_in

#: Offered by browsers (and by the attacker): what the relay must not accept.
DEFLATE_OFFER = b"permessage-deflate; client_max_window_bits"
#: Largest response head read by :func:`raw_upgrade`.
MAX_HEAD = 16 * 1024
#: Zeros behind one compressed bomb frame: about 256 KB once deflated.
BOMB_INFLATED = 256 * 1024 * 1024
#: Connections that each send a bomb in the memory test.
BOMBERS = 20
#: Most the relay process's resident memory may grow over those connections.
RSS_GROWTH_BOUND = 16 * 1024 * 1024
#: Seconds the memory test may take, relay start and stop included.
PROCESS_TEST_TIMEOUT = 60


async def raw_upgrade(
    address: Address, path: str, headers: Sequence[tuple[bytes, bytes]]
) -> tuple[trio.SocketStream, int, dict[bytes, bytes], bytes]:
    """Send a WebSocket upgrade offering permessage-deflate; return the open stream, the
    status, the response headers (lower-case names) and what came after the head."""
    stream = await trio.open_tcp_stream(*address)
    key = base64.b64encode(os.urandom(16))
    lines = [
        b"GET " + path.encode() + b" HTTP/1.1",
        b"Host: %s:%d" % (address[0].encode(), address[1]),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Extensions: " + DEFLATE_OFFER,
        *(name + b": " + value for name, value in headers),
    ]
    await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"the relay closed before answering the upgrade: {data!r}")
        data += chunk
        assert len(data) < MAX_HEAD
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    status = int(status_line.split()[1])
    answer: dict[bytes, bytes] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        answer[name.strip().lower()] = value.strip()
    return stream, status, answer, rest


def masked_frame(opcode: int, payload: bytes, *, compressed: bool) -> bytes:
    """One final client frame (masked, as a client must), with RSV1 set if ``compressed``."""
    first = 0x80 | (0x40 if compressed else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    repeated = (mask * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")
    return head + mask + body


def deflated(data: bytes) -> bytes:
    """``data`` compressed as permessage-deflate sends a message (raw deflate, no tail)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@cache
def bomb() -> bytes:
    """A binary message of :data:`BOMB_INFLATED` zeros, deflated as by permessage-deflate,
    in one compressed frame."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(BOMB_INFLATED // len(zeros))]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    payload = b"".join(parts)
    # permessage-deflate strips the sync flush's trailing empty block.
    payload = payload.removesuffix(b"\x00\x00\xff\xff")
    return masked_frame(0x2, payload, compressed=True)


async def read_until_closed(stream: trio.SocketStream, limit: int = 1024 * 1024) -> bytes:
    """Everything the relay sends until it closes the connection (at most ``limit`` bytes)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
    return data


def close_code(frames: bytes) -> int | None:
    """The code of the first close frame (opcode 8) in unmasked server ``frames``."""
    position = 0
    while position + 2 <= len(frames):
        opcode = frames[position] & 0x0F
        size = frames[position + 1] & 0x7F
        start = position + 2
        if size == 126:
            size = int.from_bytes(frames[start : start + 2], "big")
            start += 2
        elif size == 127:
            size = int.from_bytes(frames[start : start + 8], "big")
            start += 8
        if opcode == 0x8:
            return int.from_bytes(frames[start : start + 2], "big") if size >= 2 else None
        position = start + size
    return None


# ---------------------------------------------------------------------- no compression


async def test_the_daemon_endpoint_never_negotiates_compression(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        _, key = await stack.relay.new_scope()
        for headers in (link_headers(key, "laptop"), link_headers("rw_" + "x" * 43, "laptop")):
            stream, status, answer, _ = await raw_upgrade(stack.relay.address, LINK_PATH, headers)
            async with stream:
                assert status == 101
                assert b"sec-websocket-extensions" not in answer


async def test_a_compressed_frame_on_a_link_is_a_protocol_error_not_inflated(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        _, key = await stack.relay.new_scope()
        stream, status, _, rest = await raw_upgrade(
            stack.relay.address, LINK_PATH, link_headers(key, "laptop")
        )
        async with stream:
            assert status == 101
            await stream.send_all(masked_frame(0x2, deflated(b"x" * 64), compressed=True))
            answer = rest + await read_until_closed(stream)
        # A protocol error (the reserved bit is set without an extension to claim it): the
        # connection is dropped (hypercorn sends no close frame for a frame it cannot parse).
        assert close_code(answer) in (None, 1002)
        assert len(stack.relay.running.relay.links) == 0


async def test_a_tunneled_websocket_never_negotiates_compression(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        record, key = await stack.relay.new_scope()
        name, value = await stack.relay.session_cookie(record)
        offered: list[list[str]] = []

        async def handler(stream: MuxStream) -> None:
            socket = ScriptedWebSocket(stream)
            request = await socket.accept()
            offered.append([str(extension) for extension in request.extensions])
            while not isinstance(await socket.receive(), ws_events.CloseConnection):
                pass

        await start_stand_in(stack.links, stack.relay.address, key, "laptop", handler)
        port = stack.relay.address[1]
        stream, status, answer, rest = await raw_upgrade(
            stack.relay.address,
            "/d/laptop/ws",
            [
                (name.encode(), value.encode()),
                (b"Origin", f"http://127.0.0.1:{port}".encode()),
            ],
        )
        async with stream:
            assert status == 101
            assert b"sec-websocket-extensions" not in answer
            await stream.send_all(masked_frame(0x2, b"x" * 64, compressed=True))
            frames = rest + await read_until_closed(stream)
        assert close_code(frames) in (None, 1002)
        # Nor is the offer passed on to the daemon.
        assert offered == [[]]


# ---------------------------------------------------------------------- message size setting


def test_the_largest_websocket_message_comes_from_the_settings(tmp_path: Path) -> None:
    settings = RelaySettings(data_dir=tmp_path, max_websocket_message_size=1024 * 1024)
    assert _server.hypercorn_config(settings).websocket_max_message_size == 1024 * 1024
    # Below a daemon link's own messages (256 KiB) the setting is refused at once.
    with pytest.raises(ValueError, match="max_websocket_message_size"):
        RelaySettings(data_dir=tmp_path, max_websocket_message_size=64 * 1024)
    RelaySettings(data_dir=tmp_path, max_websocket_message_size=256 * 1024)


# ---------------------------------------------------------------------- memory of a process


def resident_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (``VmRSS``) or at its peak so far (``VmHWM``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


async def send_bomb(address: Address, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Upgrade ``/ws/relay`` offering compression, then send the bomb and read what comes.
    A connection the relay cuts (it was refused, or the frame was refused) just ends."""
    try:
        stream, _, _, _ = await raw_upgrade(address, LINK_PATH, headers)
        async with stream:
            await stream.send_all(bomb())
            await read_until_closed(stream)
    except (trio.BrokenResourceError, OSError):
        pass


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_compressed_bombs_do_not_grow_a_relay_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    cli = Cli(home, work)
    data_dir = tmp_path / "relay-data"
    bomb()  # built before the clock starts
    relay = RelayProcess(cli, data_dir)
    try:
        with trio.fail_after(PROCESS_TEST_TIMEOUT):
            await relay.start()
            assert relay.child is not None
            child = relay.child
            address = relay.address
            issued = await relay.create_key()
            # Warm up (imports, first connections) without a bomb, then measure.
            for key in ("rw_" + "w" * 43, issued):
                stream, status, _, _ = await raw_upgrade(
                    address, LINK_PATH, link_headers(key, "warm")
                )
                async with stream:
                    assert status == 101
            before = resident_bytes(child.process.pid)
            async with trio.open_nursery() as nursery:
                for i in range(BOMBERS):
                    stranger = link_headers("rw_" + f"{i:02d}" * 22, f"d{i}")
                    nursery.start_soon(send_bomb, address, stranger)
                    # A key holder is a stranger too (registration is open).
                    nursery.start_soon(send_bomb, address, link_headers(issued, f"k{i}"))
            # The peak, not the end: memory inflated and freed again counts too.
            after = resident_bytes(child.process.pid, "VmHWM")
            growth = after - before
            print(
                f"\nrelay RSS {before / 2**20:.1f} MiB before, peak {after / 2**20:.1f} MiB over "
                f"{2 * BOMBERS} compressed bombs of {len(bomb()) // 1024} KiB "
                f"({BOMB_INFLATED // 2**20} MiB inflated): {growth / 2**20:+.1f} MiB"
            )
            assert growth < RSS_GROWTH_BOUND
            assert child.process.poll() is None
    finally:
        with trio.CancelScope(shield=True):
            if relay.child is not None:
                await relay.terminate()
