"""Message ids and the memory of recent ones, which makes retrying a notify safe.

A sender that got no answer (or a 503 while the relay was away) cannot tell whether its
message arrived. It retries with the same id; the daemon that delivers the message remembers
the id and answers the retry with the first delivery's result instead of delivering again.
"""

from __future__ import annotations

import collections
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from ._errors import ApiError, dump_json
from ._settings import MAX_MESSAGE_ID_LENGTH, MESSAGE_ID_MEMORY, MESSAGE_ID_TTL

MESSAGE_ID_PATTERN: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_MESSAGE_ID_LENGTH}}}")

#: Random bytes in a generated message id (url-safe base64: 22 characters).
GENERATED_ID_BYTES: Final = 16


def new_message_id() -> str:
    """A fresh random message id."""
    return secrets.token_urlsafe(GENERATED_ID_BYTES)


def message_id_field(payload: Mapping[str, object]) -> str:
    """The request's ``id`` field, or a new id if it has none.

    Raises ``ApiError(400, "bad_request")`` if ``id`` is present but not a well-formed id
    (``null`` counts as absent).
    """
    value = payload.get("id")
    if value is None:
        return new_message_id()
    if not isinstance(value, str) or MESSAGE_ID_PATTERN.fullmatch(value) is None:
        raise ApiError(
            400,
            "bad_request",
            f"The field 'id' must be a string of 1 to {MAX_MESSAGE_ID_LENGTH} characters "
            "from A-Z, a-z, 0-9, '.', '_', ':', '-'.",
        )
    return value


def fingerprint(*parts: object) -> bytes:
    """A digest of what a message says, so a reused id with other content is told apart
    without keeping the (possibly large) text."""
    return hashlib.sha256(dump_json(parts).encode()).digest()


@attrs.frozen
class _Delivery:
    fingerprint: bytes
    answer: Mapping[str, object]
    at: float


class RecentMessages:
    """The ids of messages delivered recently and what each delivery answered.

    At most ``capacity`` ids are kept, each for ``ttl`` seconds of ``clock``; past either
    bound the oldest id is forgotten (a retry of it would be delivered again).
    """

    def __init__(
        self,
        *,
        capacity: int = MESSAGE_ID_MEMORY,
        ttl: float = MESSAGE_ID_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or ttl <= 0:
            raise ValueError("capacity must be at least 1 and ttl positive")
        self._capacity = capacity
        self._ttl = ttl
        self._clock = clock
        # Insertion order is delivery order, so the oldest entries are always at the front.
        self._entries: collections.OrderedDict[str, _Delivery] = collections.OrderedDict()

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.at < self._ttl and len(self._entries) <= self._capacity:
                return
            self._entries.popitem(last=False)

    def previous(self, message_id: str, digest: bytes) -> Mapping[str, object] | None:
        """The answer of the earlier delivery of ``message_id``, or None if it is not known.

        Raises ``ApiError(409, "id_reused")`` if the id was delivered with other content:
        answering that retry as a success would lose the new message without a word.
        """
        self._expire(self._clock())
        delivery = self._entries.get(message_id)
        if delivery is None:
            return None
        if delivery.fingerprint != digest:
            raise ApiError(
                409,
                "id_reused",
                f"Message id {message_id!r} was already used for a different message; "
                "send this one with a new id.",
            )
        return delivery.answer

    def remember(self, message_id: str, digest: bytes, answer: Mapping[str, object]) -> None:
        """Record a delivery of ``message_id`` that answered ``answer``."""
        now = self._clock()
        self._entries.pop(message_id, None)
        self._entries[message_id] = _Delivery(fingerprint=digest, answer=dict(answer), at=now)
        self._expire(now)
