"""Key and session id utilities: generation, shape checks, hashing, masking."""

from __future__ import annotations

import base64
import hashlib
from typing import cast

import pytest

from common import (
    KEY_PREFIX,
    MAX_SECRET_TEXT_LENGTH,
    generate_key,
    generate_public_id,
    generate_session_id,
    hash_secret,
    looks_like_key,
    looks_like_session_id,
    mask_key,
)


def _decoded_length(text: str) -> int:
    return len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def test_generated_key_has_the_documented_shape() -> None:
    key = generate_key()
    assert key.startswith("rw_")
    assert looks_like_key(key)
    assert _decoded_length(key[len(KEY_PREFIX) :]) >= 32


def test_generated_keys_differ() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200


def test_generated_session_id_is_32_random_bytes_and_not_a_key() -> None:
    session_id = generate_session_id()
    assert _decoded_length(session_id) == 32
    assert looks_like_session_id(session_id)
    assert not looks_like_key(session_id)
    assert len({generate_session_id() for _ in range(200)}) == 200


def test_public_ids_are_short_distinct_and_not_keys() -> None:
    ids = {generate_public_id("key") for _ in range(200)}
    assert len(ids) == 200
    for public_id in ids:
        assert public_id.startswith("key_")
        assert len(public_id) <= 24
        assert not looks_like_key(public_id)
        assert not public_id[len("key_") :].startswith("-")


def test_longer_keys_are_accepted() -> None:
    assert looks_like_key("rw_" + "A" * 100)
    assert looks_like_key("rw_" + "x" * MAX_SECRET_TEXT_LENGTH)


_VALID_BODY = "a" * 43


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rw_",
        "rw_short",
        "rw_" + "a" * 42,  # one character short of 32 bytes
        "RW_" + _VALID_BODY,
        "rw-" + _VALID_BODY,
        _VALID_BODY,
        "rw_" + _VALID_BODY + "=",
        "rw_" + _VALID_BODY + "\n",
        " rw_" + _VALID_BODY,
        "rw_" + _VALID_BODY[:-1] + " ",
        "rw_" + _VALID_BODY[:-1] + "+",
        "rw_" + _VALID_BODY[:-1] + "/",
        "rw_" + _VALID_BODY[:-1] + "é",
        "rw_" + _VALID_BODY[:-1] + "\u0663",  # a non-ASCII digit
        "rw_" + _VALID_BODY[:-1] + "\ud800",  # a lone surrogate
        "rw_" + "a" * (MAX_SECRET_TEXT_LENGTH + 1),
        "Bearer rw_" + _VALID_BODY,
    ],
)
def test_malformed_keys_are_rejected(text: str) -> None:
    assert not looks_like_key(text)


@pytest.mark.parametrize("value", [None, b"rw_" + b"a" * 43, 12345])
def test_shape_checks_refuse_non_strings_without_raising(value: object) -> None:
    assert not looks_like_key(cast(str, value))
    assert not looks_like_session_id(cast(str, value))


@pytest.mark.parametrize(
    "text", ["", "short", "a" * 42, "a" * 42 + "=", "a" * 42 + "\n", "a" * 257, "a" * 42 + "é"]
)
def test_malformed_session_ids_are_rejected(text: str) -> None:
    assert not looks_like_session_id(text)


def test_hash_secret_is_sha256_hex_of_utf8() -> None:
    key = generate_key()
    assert hash_secret(key) == hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert hash_secret("é") == hashlib.sha256("é".encode()).hexdigest()
    digest = hash_secret(key)
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    assert hash_secret(key) != hash_secret(generate_key())


def test_hash_secret_never_raises_on_unencodable_text() -> None:
    assert len(hash_secret("\ud800")) == 64
    assert hash_secret("\ud800") != hash_secret("\ud801")


def test_mask_key_shows_at_most_four_and_four() -> None:
    key = generate_key()
    body = key[len(KEY_PREFIX) :]
    masked = mask_key(key)
    assert masked == f"rw_{body[:4]}…{body[-4:]}"
    assert body[4:-4] not in masked


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rw_short", "rw_…"),
        ("rw_", "rw_…"),
        ("rw_abcdefgh", "rw_…"),
        ("hunter2-secret", "…"),
        ("", "…"),
    ],
)
def test_mask_key_shows_nothing_of_a_malformed_input(text: str, expected: str) -> None:
    assert mask_key(text) == expected


def test_mask_key_of_a_key_with_trailing_whitespace_shows_nothing_of_it() -> None:
    key = generate_key()
    masked = mask_key(key + "\n")
    assert masked == "rw_…"
    body = key[len(KEY_PREFIX) :]
    assert body[:4] not in masked
    assert body[-4:] not in masked
