"""Logging for the long-running commands (``repowire serve``, ``repowire relay start``).

One setup for both: every line carries its level and its logger, and every logger of the
project is in the ``repowire.*`` family (``repowire.connector``, ``repowire.relay``, ...).

Two formats:

``text`` (default)
    ``2026-12-05 23:40:01,123 INFO repowire.connector: relay link up: ...``
``json``
    one JSON object per line: ``{"time": "2026-12-05T23:40:01.123+00:00", "level": "INFO",
    "logger": "repowire.connector", "message": "..."}`` (plus ``"exception"`` with the
    traceback text when a record carries one).

Verbosity: the default level is INFO; ``-v`` gives DEBUG, ``-q`` WARNING. The environment
variable ``REPOWIRE_DEBUG`` (any non-empty value) counts as ``-v`` and also makes an unexpected
error print its traceback.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import TextIO

LOG_FORMATS = ("text", "json")
#: The name of the handler :func:`setup_logging` installs (so a second call replaces it).
_HANDLER_NAME = "repowire"
#: ``text`` lines: time, level, logger, message.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        document: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def log_level(*, verbose: int, quiet: int, environ: Mapping[str, str]) -> int:
    """The root level for ``-v`` counted ``verbose`` times and ``-q`` ``quiet`` times.

    ``REPOWIRE_DEBUG`` set (non-empty) counts as one ``-v``. More ``-v`` than ``-q``: DEBUG;
    more ``-q``: WARNING; otherwise INFO.
    """
    balance = verbose + (1 if environ.get("REPOWIRE_DEBUG") else 0) - quiet
    if balance > 0:
        return logging.DEBUG
    if balance < 0:
        return logging.WARNING
    return logging.INFO


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced
    after setup, as a test harness does)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(*, level: int, log_format: str, stream: TextIO | None = None) -> None:
    """Send every record at ``level`` and above to ``stream`` (default: stderr, as it is when
    each record is written) in ``log_format``, and set the root level to ``level``.

    Replaces a handler installed by an earlier call, and leaves any other handler alone; with
    a handler on the root logger, a later ``logging.basicConfig`` does nothing.
    Raises ValueError for a format not in :data:`LOG_FORMATS`.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}")
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
