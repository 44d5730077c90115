"""The running daemon's record in its home: who serves, where, since when.

Two files in the home (``$REPOWIRE_HOME``, default ``~/.repowire``):

``daemon.json`` (:data:`RUNTIME_FILE_NAME`)
    Written by ``repowire serve`` once its listener is bound, removed when it exits cleanly::

        {"format": 1, "pid": 4242, "host": "127.0.0.1", "port": 9000,
         "url": "http://127.0.0.1:9000", "daemon_id": "laptop-3f9c0a",
         "started_at": 1764972000.0, "version": "0.1.0"}

    It holds no secret. It is written to a temporary file in the home (mode 0600) and renamed
    into place, so a reader sees the old record or the new one, never half of one.

``.daemon.lock`` (:data:`LOCK_FILE_NAME`)
    Held with an exclusive ``flock`` by the serving process for its whole life, and holding
    that process's pid as text. The kernel drops the lock when the process ends, however it
    ends (SIGKILL included), and no other process can hold it by accident: so "the lock is
    held" is the proof that a daemon of this home is alive, where a pid alone could have been
    reused by an unrelated process. The file itself stays (removing a lock file races with
    the next process opening it).

A reader (:func:`read_runtime`) never creates or changes a file: it opens both read-only,
and tests the lock with a non-blocking shared ``flock`` that it drops at once. A runtime file
left by a process that no longer holds the lock is stale and is ignored (and left alone: the
next ``repowire serve`` replaces it).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from common import is_daemon_id

RUNTIME_FILE_NAME = "daemon.json"
LOCK_FILE_NAME = ".daemon.lock"
#: Version of the runtime file's layout; a file of another format is not trusted.
RUNTIME_FORMAT = 1

#: A runtime file larger than this is not one (it is a few hundred bytes): refused unread.
MAX_RUNTIME_BYTES = 64 * 1024
#: Longest pid text read from the lock file.
MAX_LOCK_BYTES = 64
#: Seconds a new daemon keeps trying for the lock before it concludes another daemon holds it.
#: Readers hold a shared lock for microseconds; this only rides out that overlap.
CLAIM_WAIT = 1.0
#: Seconds between two tries for the lock within :data:`CLAIM_WAIT`.
CLAIM_RETRY_INTERVAL = 0.01

_FILE_MODE = 0o600
_HOME_MODE = 0o700
# Never wait on a FIFO or a device someone put where a file should be; never follow a link
# out of the home for the lock.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW


def runtime_path(home: Path) -> Path:
    """The runtime file of ``home``'s daemon."""
    return home / RUNTIME_FILE_NAME


def lock_path(home: Path) -> Path:
    """The lock file a serving daemon holds in ``home``."""
    return home / LOCK_FILE_NAME


def local_url(host: str, port: int) -> str:
    """``http://host:port`` for reaching a daemon bound to ``host`` from this machine.

    A wildcard address (``0.0.0.0``, ``::`` or empty) is reached on loopback; an IPv6
    address is bracketed.
    """
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@attrs.frozen(kw_only=True)
class RuntimeRecord:
    """What ``daemon.json`` says about the daemon that wrote it. It holds no secret."""

    pid: int
    host: str
    port: int
    daemon_id: str
    started_at: float
    version: str

    @property
    def url(self) -> str:
        """Where the daemon answers on this machine."""
        return local_url(self.host, self.port)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUNTIME_FORMAT,
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "daemon_id": self.daemon_id,
            "started_at": self.started_at,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, document: object) -> RuntimeRecord:
        """Raises ValueError when ``document`` is not a runtime record of this format."""
        if not isinstance(document, Mapping):
            raise ValueError("not a JSON object")
        if document.get("format") != RUNTIME_FORMAT:
            raise ValueError(f"unknown format {document.get('format')!r}")
        pid = document.get("pid")
        host = document.get("host")
        port = document.get("port")
        daemon_id = document.get("daemon_id")
        started_at = document.get("started_at")
        version = document.get("version")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError("bad pid")
        if not isinstance(host, str) or not host or len(host) > 255:
            raise ValueError("bad host")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError("bad port")
        if not isinstance(daemon_id, str) or not is_daemon_id(daemon_id):
            raise ValueError("bad daemon id")
        if (
            not isinstance(started_at, int | float)
            or isinstance(started_at, bool)
            or not math.isfinite(started_at)
        ):
            raise ValueError("bad start time")
        if not isinstance(version, str) or len(version) > 64:
            raise ValueError("bad version")
        return cls(
            pid=pid,
            host=host,
            port=port,
            daemon_id=daemon_id,
            started_at=float(started_at),
            version=version,
        )


class RuntimeState(enum.Enum):
    """What a home's runtime files say about its daemon."""

    #: No daemon holds the lock and there is no runtime file.
    ABSENT = "absent"
    #: No daemon holds the lock, but a runtime file was left behind (the daemon was killed).
    STALE = "stale"
    #: A daemon holds the lock and its runtime file says where it listens.
    RUNNING = "running"
    #: A daemon holds the lock but has not written its runtime file yet (it is starting).
    STARTING = "starting"
    #: The lock file cannot be read (permissions, not a regular file): nothing is known.
    UNREADABLE = "unreadable"


@attrs.frozen(kw_only=True)
class RuntimeInfo:
    """The result of :func:`read_runtime`.

    ``record`` is the daemon's record when ``state`` is RUNNING, the left-over one when STALE,
    else None. ``pid`` is the live daemon's pid (RUNNING, and STARTING when the lock file
    names it) or the dead one's (STALE). ``detail`` says what was unreadable (UNREADABLE).
    """

    path: Path
    state: RuntimeState
    record: RuntimeRecord | None = None
    pid: int | None = None
    detail: str | None = None

    @property
    def alive(self) -> bool:
        """Whether a daemon of this home is running (or starting)."""
        return self.state in (RuntimeState.RUNNING, RuntimeState.STARTING)


class DaemonAlreadyRunning(Exception):
    """A daemon of this home holds the lock; ``str(error)`` is the one line to show."""

    def __init__(self, info: RuntimeInfo) -> None:
        super().__init__(already_running_message(info))
        self.info = info


def already_running_message(info: RuntimeInfo) -> str:
    """``a daemon from this home is already running: pid 4242, http://...; stop it first``."""
    if info.record is not None:
        where = f"pid {info.record.pid}, {info.record.url}"
    elif info.pid is not None:
        where = f"pid {info.pid}, starting up"
    else:
        where = "starting up"
    return f"a daemon from this home is already running: {where}; stop it first"


# --------------------------------------------------------------------------------------------
# Reading (never writes)


def read_runtime(home: Path) -> RuntimeInfo:
    """What ``home``'s runtime files say, verified against the lock; never blocks or writes.

    Never raises for missing, malformed or unreadable files: those are states.
    """
    path = runtime_path(home)
    try:
        held, holder = _lock_held(lock_path(home))
    except OSError as exc:
        return RuntimeInfo(path=path, state=RuntimeState.UNREADABLE, detail=_why(exc))
    try:
        record = _read_record(path)
    except (OSError, ValueError) as exc:
        # A malformed file under a held lock: the daemon is alive but says nothing usable.
        record = None
        if held:
            return RuntimeInfo(path=path, state=RuntimeState.STARTING, pid=holder)
        if not isinstance(exc, FileNotFoundError):
            return RuntimeInfo(path=path, state=RuntimeState.STALE, detail=_why(exc))
    if not held:
        if record is None:
            return RuntimeInfo(path=path, state=RuntimeState.ABSENT)
        return RuntimeInfo(path=path, state=RuntimeState.STALE, record=record, pid=record.pid)
    # A record from an earlier (killed) daemon, while a new one is starting, names another pid
    # (or the new one has not written its pid into the lock file yet).
    if record is None or record.pid != holder:
        return RuntimeInfo(path=path, state=RuntimeState.STARTING, pid=holder)
    return RuntimeInfo(path=path, state=RuntimeState.RUNNING, record=record, pid=record.pid)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc)


def _open_regular(path: Path) -> int:
    """A read-only descriptor on ``path``; raises OSError (ENOENT, ...) or for a non-file."""
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_held(path: Path) -> tuple[bool, int | None]:
    """Whether a process holds ``path``'s lock, and the pid written in it (if readable)."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _parse_pid(os.pread(fd, MAX_LOCK_BYTES, 0))
        # Nobody holds it; ours goes when the descriptor closes.
        return False, None
    finally:
        os.close(fd)


def _parse_pid(data: bytes) -> int | None:
    text = data.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _read_record(path: Path) -> RuntimeRecord:
    """The record in ``path``; raises OSError (FileNotFoundError when absent) or ValueError."""
    fd = _open_regular(path)
    try:
        data = os.read(fd, MAX_RUNTIME_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RUNTIME_BYTES:
        raise ValueError(f"larger than {MAX_RUNTIME_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a runtime file ({type(exc).__name__})") from None
    return RuntimeRecord.from_json(document)


# --------------------------------------------------------------------------------------------
# Claiming (the serving daemon)


class HomeClaim:
    """This process's hold on a home's daemon lock; see :func:`claim_home`."""

    def __init__(self, home: Path, fd: int) -> None:
        self.home = home
        self._fd = fd
        self._published: RuntimeRecord | None = None

    def publish(self, record: RuntimeRecord) -> None:
        """Write ``record`` as the runtime file: temporary file in the home, then rename.

        Raises OSError when it cannot be written (the lock stays held either way).
        """
        path = runtime_path(self.home)
        fd, temp_name = tempfile.mkstemp(dir=self.home, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                os.fchmod(file.fileno(), _FILE_MODE)
                json.dump(record.to_json(), file)
                file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise
        self._published = record

    def withdraw(self) -> None:
        """Remove the runtime file this claim published, if it is still ours."""
        record, self._published = self._published, None
        if record is None:
            return
        path = runtime_path(self.home)
        with contextlib.suppress(OSError, ValueError):
            # Only while we hold the lock can nobody else have replaced it; check anyway.
            if _read_record(path).pid == record.pid:
                path.unlink()

    def release(self) -> None:
        """Withdraw the runtime file and drop the lock (idempotent)."""
        if self._fd < 0:
            return
        try:
            self.withdraw()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing drops the flock


def acquire_home(
    home: Path,
    *,
    wait: float = CLAIM_WAIT,
    sleep: Callable[[float], None] = time.sleep,
) -> HomeClaim:
    """Take ``home``'s daemon lock for this process; :meth:`HomeClaim.release` gives it back.

    Creates ``home`` (mode 0700) and the lock file (mode 0600) when missing, takes the lock
    (retrying for up to ``wait`` seconds while readers hold it for a moment), and writes this
    process's pid into the lock file. Blocks for at most ``wait`` seconds.

    Raises :class:`DaemonAlreadyRunning` when another process holds the lock, OSError when the
    home or the lock file cannot be created or opened.
    """
    home.mkdir(mode=_HOME_MODE, parents=True, exist_ok=True)
    fd = os.open(lock_path(home), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DaemonAlreadyRunning(_holder(home)) from None
                sleep(CLAIM_RETRY_INTERVAL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return HomeClaim(home, fd)


def _holder(home: Path) -> RuntimeInfo:
    info = read_runtime(home)
    if info.alive:
        return info
    # The holder let go between our last try and this read (a daemon that just ended):
    # say what we saw, without a record we cannot vouch for.
    return RuntimeInfo(path=info.path, state=RuntimeState.STARTING)


@contextlib.contextmanager
def claim_home(home: Path, *, wait: float = CLAIM_WAIT) -> Iterator[HomeClaim]:
    """:func:`acquire_home` for the block; the runtime file is withdrawn and the lock released
    after it, however it ends."""
    claim = acquire_home(home, wait=wait)
    try:
        yield claim
    finally:
        claim.release()
