"""Argument types for the parser: each failure is a one-line message that never repeats a
secret."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import urllib.parse
from pathlib import Path

from common import KEY_PREFIX, MAX_DAEMON_ID_LENGTH, is_daemon_id, looks_like_key
from repowire.config import normalize_relay_url, redact_secrets, relay_url_problem

from ._errors import one_line


def relay_url_arg(text: str) -> str:
    """A relay URL, ``http(s)://`` allowed (returned as given: the command says how it maps)."""
    problem = relay_url_problem(normalize_relay_url(text)[0])
    if problem is not None:
        raise argparse.ArgumentTypeError(f"relay URL {redact_secrets(text)!r} {problem}")
    return text


def api_key_arg(text: str) -> str:
    if text != "-" and not looks_like_key(text):
        raise argparse.ArgumentTypeError(
            "does not look like a Repowire API key ('rw_' followed by 43+ url-safe characters)"
        )
    return text


def port_arg(text: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number {low}-65535, got {text!r}")
    return int(text)


def listen_port_arg(text: str) -> int:
    return port_arg(text, allow_zero=True)


def existing_file_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return path.resolve()


def directory_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path.resolve()


def existing_directory_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path.resolve()


def public_url_arg(text: str) -> str:
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{redact_secrets(text)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{redact_secrets(text)!r} must be an http(s):// URL")
    if parts.username is not None or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must not contain credentials, a query or a fragment")
    return text.rstrip("/")


def byte_size_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return int(text)


def byte_count_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a number of bytes (0 or more), got {text!r}")
    return int(text)


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_int_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def metrics_listen_arg(text: str) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) or ``off``."""
    if text == "off":
        return text
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        valid = sep == ":" and port.isascii() and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        valid = (
            host == "localhost" and port.isascii() and port.isdigit() and 0 <= int(port) <= 65535
        )
    if not valid:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (such as 127.0.0.1:9108) or 'off'"
        )
    return text


def address_arg(text: str) -> str:
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or network (such as 10.0.0.1 or 10.0.0.0/8)"
        ) from None


def daemon_id_arg(text: str) -> str:
    if not is_daemon_id(text):
        raise argparse.ArgumentTypeError(
            f"{one_line(text, 80)!r} must be 1-{MAX_DAEMON_ID_LENGTH} characters of "
            "A-Z a-z 0-9 . _ -"
        )
    return text


def key_id_arg(text: str) -> str:
    if looks_like_key(text) or text.startswith(KEY_PREFIX):
        raise argparse.ArgumentTypeError(
            "that is an API key, not a key id (key ids look like key_0123abcd...; "
            "see 'repowire relay keys list')"
        )
    return text


def label_arg(text: str) -> str:
    if looks_like_key(text):
        raise argparse.ArgumentTypeError("that looks like an API key; a label is a plain name")
    return text


#: Schemes ``--redis-url`` accepts (as the relay's Redis store does).
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")
_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def redis_url_arg(text: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL. The message never repeats it: it may
    hold a password."""
    try:
        scheme = urllib.parse.urlsplit(text).scheme
    except ValueError:
        scheme = ""
    if scheme not in REDIS_URL_SCHEMES:
        raise argparse.ArgumentTypeError(
            "expected a redis://, rediss:// or unix:// URL (the value is not shown: it may "
            "hold a password)"
        )
    return text


def redis_namespace_arg(text: str) -> str:
    if _NAMESPACE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{one_line(text, 80)!r} must be 1-64 characters of A-Z a-z 0-9 _ . : {{ }} -"
        )
    return text


def replica_id_arg(text: str) -> str:
    if _REPLICA_ID.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{one_line(text, 80)!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return text


def advertise_url_arg(text: str) -> str:
    """``http(s)://HOST[:PORT]`` (a path prefix allowed), without credentials or a query."""
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{redact_secrets(text)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{redact_secrets(text)!r} must be an http(s)://HOST:PORT URL"
        )
    if parts.username is not None or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must not contain credentials, a query or a fragment")
    return text.rstrip("/")


def seconds_or_zero_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value
