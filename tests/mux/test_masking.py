"""The masking fast path gives the same bytes as wsproto's own masker, in every split."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import wsproto.frame_protocol
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from mux._masking import (
    PURE_MASKER,
    VECTOR_THRESHOLD,
    WordMasker,
    install_fast_masking,
    uninstall_fast_masking,
)

pytest.importorskip("numpy", reason="numpy (the fast extra) is not installed")


@pytest.fixture(scope="module")
def fast_masking() -> Iterator[None]:
    assert install_fast_masking()
    try:
        yield
    finally:
        uninstall_fast_masking()


def _pieces(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({min(cut, len(data)) for cut in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


@given(
    key=st.binary(min_size=4, max_size=4),
    data=st.binary(max_size=3 * VECTOR_THRESHOLD),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * VECTOR_THRESHOLD), max_size=4),
)
def test_word_masker_matches_wsproto_across_splits(
    fast_masking: None, key: bytes, data: bytes, cuts: list[int]
) -> None:
    pure, fast = PURE_MASKER(key), WordMasker(key)
    for piece in _pieces(data, cuts):
        assert fast.process(piece) == pure.process(bytearray(piece))


def test_word_masker_matches_wsproto_on_large_payloads(fast_masking: None) -> None:
    rng = random.Random(7)
    for size in (VECTOR_THRESHOLD, VECTOR_THRESHOLD + 1, 65_537, 1_048_579):
        key = rng.randbytes(4)
        data = rng.randbytes(size)
        pure, fast = PURE_MASKER(key), WordMasker(key)
        # Two calls: the second continues at the key offset the first one left.
        assert fast.process(data) == pure.process(bytearray(data))
        assert fast.process(data[:999]) == pure.process(bytearray(data[:999]))


def test_masking_is_an_involution(fast_masking: None) -> None:
    data = random.Random(3).randbytes(100_003)
    masked = WordMasker(b"\x01\x02\x03\x04").process(data)
    assert masked != data
    assert WordMasker(b"\x01\x02\x03\x04").process(masked) == data


def test_install_is_idempotent_and_reversible() -> None:
    assert install_fast_masking()
    assert install_fast_masking()
    assert getattr(wsproto.frame_protocol, "XorMaskerSimple") is WordMasker  # noqa: B009
    uninstall_fast_masking()
    assert getattr(wsproto.frame_protocol, "XorMaskerSimple") is PURE_MASKER  # noqa: B009


def _roundtrip(payload: bytes) -> bytes:
    """A wsproto client sends ``payload`` (masked) to a wsproto server, which unmasks it."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="relay.test", target="/ws/relay")))
    assert isinstance(next(iter(server.events())), Request)
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    wire = client.send(BytesMessage(data=payload))
    received = bytearray()
    # Byte boundaries that cut the frame header and the payload at odd offsets.
    for start in range(0, len(wire), 7_777):
        server.receive_data(wire[start : start + 7_777])
        for event in server.events():
            assert isinstance(event, BytesMessage)
            received += event.data
    return bytes(received)


def test_wsproto_connections_carry_the_same_bytes_with_either_masker() -> None:
    payload = random.Random(11).randbytes(300_001)
    uninstall_fast_masking()
    assert _roundtrip(payload) == payload
    assert install_fast_masking()
    try:
        assert _roundtrip(payload) == payload
    finally:
        uninstall_fast_masking()
