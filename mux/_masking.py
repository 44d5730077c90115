"""WebSocket payload masking without a Python-level pass over the payload.

RFC 6455 makes a client mask every frame it sends with a 4-byte key, and the server unmask it:
every byte of the connector's uploads and downloads is XORed twice on the way (once in the
connector, once in the relay). wsproto does it with four strided ``bytes.translate`` passes
(:class:`wsproto.frame_protocol.XorMaskerSimple`), which measured about 1.1 GB/s here and was a
fifth of both processes' CPU during a bulk transfer. With numpy installed (the ``fast`` extra),
:class:`WordMasker` XORs 32-bit words in one vectorised pass instead, and
:func:`install_fast_masking` makes wsproto (used by both trio-websocket and hypercorn) use it.

The pure path stays the default and the reference: without numpy nothing changes, and the tests
check both give identical bytes, across every split of a payload into frames.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Final

import wsproto.frame_protocol

#: Below this many bytes the pure path is as fast (numpy's per-call overhead dominates).
VECTOR_THRESHOLD: Final = 2048

#: wsproto's own masker, kept to fall back on and to compare against.
PURE_MASKER: Final = wsproto.frame_protocol.XorMaskerSimple

_numpy: Any = None


def fast_masking_available() -> bool:
    """Whether numpy can be imported, so :func:`install_fast_masking` would take effect."""
    return _numpy is not None or importlib.util.find_spec("numpy") is not None


class WordMasker:
    """A drop-in for wsproto's ``XorMaskerSimple``: ``process(data)`` returns ``data`` XORed
    with the key repeated, continuing where the previous call ended (a frame's payload may
    arrive in several pieces). Needs numpy; see :func:`install_fast_masking`."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        size = len(data)
        key = self._key
        if size < VECTOR_THRESHOLD:
            out = PURE_MASKER(key).process(bytearray(data))
        else:
            out = bytearray(size)
            words = size // 4
            np = _numpy
            source = np.frombuffer(data, dtype="<u4", count=words)
            target = np.frombuffer(out, dtype="<u4", count=words)
            np.bitwise_xor(source, int.from_bytes(key, "little"), out=target)
            tail = words * 4
            if tail < size:
                out[tail:] = bytes(b ^ k for b, k in zip(data[tail:], key, strict=False))
        rotation = size % 4
        self._key = key[rotation:] + key[:rotation]
        return out


def install_fast_masking() -> bool:
    """Make wsproto mask and unmask with :class:`WordMasker` in this process, if numpy is
    installed. Returns whether the fast path is in use. Idempotent; safe to call from any
    number of servers and clients in one process (it changes a module attribute wsproto looks
    up for every frame, so it applies to connections opened before the call too)."""
    global _numpy
    if _current_masker() is WordMasker:
        return True
    try:
        import numpy
    except ImportError:
        return False
    _numpy = numpy
    # wsproto names its masker class in every frame it masks or unmasks: replacing the module
    # attribute is the one hook it has.
    setattr(wsproto.frame_protocol, "XorMaskerSimple", WordMasker)  # noqa: B010
    return True


def uninstall_fast_masking() -> None:
    """Put wsproto's own masker back (for tests that compare both paths)."""
    setattr(wsproto.frame_protocol, "XorMaskerSimple", PURE_MASKER)  # noqa: B010


def _current_masker() -> object:
    return getattr(wsproto.frame_protocol, "XorMaskerSimple", None)
