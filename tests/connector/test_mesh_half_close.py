"""A mesh sender that half-closes after its request still reads the whole response."""

from __future__ import annotations

import trio

from tests.support.stack import Stack
from tests.support.waiting import eventually

#: Large enough that the response spans many frames and transport messages on every hop.
BODY_SIZE = 2 * 1024 * 1024
#: Requests made in a row, so a race between the half-close and the response shows up.
ROUNDS = 5


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_half_closed_mesh_request_gets_the_whole_response(stack: Stack) -> None:
    big = stack.dashboard_dir / "big.bin"
    big.write_bytes(bytes(range(256)) * (BODY_SIZE // 256))
    allow = frozenset({("GET", "/dashboard/big.bin")})
    with trio.fail_after(30):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        laptop = await stack.start_daemon(relay, key, "laptop", rand=lambda: 0.5)
        await stack.start_daemon(relay, key, "desk", rand=lambda: 0.5, mesh_allowlist=allow)
        links = relay.running.relay.links
        await eventually(lambda: len(links.for_scope(record.scope_id)) == 2)
        for _ in range(ROUNDS):
            stream = await laptop.connector.open_mesh_stream("desk")
            try:
                await stream.send_all(
                    b"GET /dashboard/big.bin HTTP/1.1\r\nHost: repowire-daemon\r\n"
                    b"Connection: close\r\n\r\n"
                )
                # The request is complete: say so, as an HTTP/1.0-style client does.
                await stream.send_eof()
                response = await _read_all(stream)
            finally:
                await trio.aclose_forcefully(stream)
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            assert len(body) == BODY_SIZE, (head[:400], len(response))
            assert body == big.read_bytes()
