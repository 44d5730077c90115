"""Fuzz the session's receive path: random and mutated input, fed in random pieces.

The contract under test: whatever bytes arrive, :meth:`Session.receive_data` returns events or
raises :class:`RemoteProtocolError`, and nothing else. After an error the session is in its
error state, raises the same error again, and its last queued frame is a GOAWAY carrying the
error's code. Along the way the driver plays a well-behaved application (accepts streams,
acknowledges data, answers with data) so that credit and stream paths are reached, and checks
that everything the session sends is whole, well-formed frames.

Plain Python, no fuzzing engine needed::

    python fuzz/fuzz_session.py                       # 20,000 iterations, random seed
    python fuzz/fuzz_session.py -n 200000 --seed 7    # reproducible
    python fuzz/fuzz_session.py --replay crash.bin    # feed one saved input

A failure prints the seed, the iteration and the input (hex), saves the input under
``--crash-dir`` if given, and exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import (
    DataReceived,
    ErrorCode,
    Event,
    RemoteProtocolError,
    Role,
    Session,
    SessionConfig,
    SessionState,
    StreamOpened,
    StreamState,
    encode_metadata,
)

HEADER = struct.Struct(">BBHII")
#: Small limits, so that the limits themselves are within reach of random input.
CONFIGS = (
    SessionConfig(),
    SessionConfig(
        initial_window_size=64,
        session_window_size=128,
        max_frame_size=1024,
        max_concurrent_streams=3,
        max_metadata_size=32,
        max_accept_backlog=2,
    ),
    SessionConfig(initial_window_size=1, session_window_size=1, max_accept_backlog=0),
)
INTERESTING_U32: tuple[int, ...] = (
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    12,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    2**31 - 1,
)
INTERESTING_U32 += (2**31, 2**32 - 1)


class FuzzFailure(Exception):
    """The session broke its contract on some input."""


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return HEADER.pack(frame_type, flags, 0, stream_id, len(payload)) + payload


def hello(rng: random.Random) -> bytes:
    settings = b"".join(
        struct.pack(">HI", key, rng.choice(INTERESTING_U32) if rng.random() < 0.2 else value)
        for key, value in ((1, 65536), (2, 16384), (3, 8), (4, 512), (5, 1 << 20))
        if rng.random() < 0.8
    )
    return frame(0, 0, 0, b"\x00\x01" + settings)


# ---------------------------------------------------------------- the seed corpus


def transcript(rng: random.Random) -> tuple[Role, bytes]:
    """Bytes one real session sent another during a random, valid exchange; and the role of
    the side that received them."""
    a, b = Session(Role.CONNECTOR), Session(Role.RELAY)
    received = {Role.CONNECTOR: bytearray(), Role.RELAY: bytearray()}

    def pump() -> None:
        for _ in range(20):
            to_b, to_a = a.data_to_send(), b.data_to_send()
            if not to_a and not to_b:
                return
            received[Role.RELAY] += to_b
            received[Role.CONNECTOR] += to_a
            # b"" would mean end of file: only feed what there is.
            events = (b.receive_data(to_b) if to_b else []) + (a.receive_data(to_a) if to_a else [])
            for event in events:
                if isinstance(event, StreamOpened):
                    (b if event.stream_id % 2 else a).accept_stream(event.stream_id)

    pump()
    streams: list[tuple[Session, int]] = []
    for _ in range(rng.randint(1, 12)):
        side = rng.choice((a, b))
        action = rng.random()
        if action < 0.25 and side.can_open_stream():
            metadata = {"kind": rng.choice(("http", "mesh")), "from": "fuzz"}
            streams.append((side, side.open_stream(metadata)))
        elif action < 0.6 and streams:
            owner, stream_id = rng.choice(streams)
            room = owner.local_flow_control_window(stream_id)
            if owner.stream_state(stream_id) in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
                owner.send_data(stream_id, rng.randbytes(min(room, rng.randint(0, 300))))
        elif action < 0.7 and streams:
            owner, stream_id = rng.choice(streams)
            if owner.stream_state(stream_id) in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
                owner.end_stream(stream_id)
        elif action < 0.8 and streams:
            owner, stream_id = rng.choice(streams)
            owner.reset_stream(stream_id, rng.choice(list(ErrorCode)))
        elif action < 0.9:
            if side.can_ping():
                side.ping(rng.randbytes(8))
        else:
            side.go_away(ErrorCode.NO_ERROR, "fuzz")
        pump()
    role = rng.choice((Role.CONNECTOR, Role.RELAY))
    return role, bytes(received[role])


# ---------------------------------------------------------------- generators and mutators


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(rng.randint(0, size))


def random_frames(rng: random.Random, size: int) -> bytes:
    """Well-formed headers with random fields, after a HELLO most of the time."""
    parts = [hello(rng)] if rng.random() < 0.9 else []
    total = 0
    while total < size and rng.random() < 0.92:
        frame_type = rng.choice((0, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6, 7, 0xFF))
        flags = rng.choice((0, 0, 0, 1, 2, 3, 0x80))
        stream_id = rng.choice((0, 1, 2, 3, 4, 5, 6, 8, 10, 2**31 - 1, 2**31))
        kind = rng.random()
        if kind < 0.3:
            payload = rng.randbytes(rng.randint(0, 64))
        elif kind < 0.5:
            payload = struct.pack(">I", rng.choice(INTERESTING_U32))
        elif kind < 0.6:
            payload = rng.randbytes(8)
        elif kind < 0.8:
            payload = encode_metadata(
                {"kind": "http", "k" * rng.randint(1, 64): "v" * rng.randint(0, 40)}
            )
        else:
            payload = struct.pack(">II", rng.choice(INTERESTING_U32), rng.randint(0, 9)) + b"r"
        part = frame(frame_type, flags, stream_id, payload)
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """Apply one to four mutations: bit flips, byte and field overwrites, cuts, copies, splices."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if not buf or choice < 0.1:
            buf += rng.choice(corpus)[: rng.randint(0, 200)]
        elif choice < 0.3:
            index = rng.randrange(len(buf))
            buf[index] ^= 1 << rng.randrange(8)
        elif choice < 0.45:
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF))
        elif choice < 0.6 and len(buf) >= 4:
            # Overwrite four bytes with an interesting u32: often a length or a stream id.
            index = rng.randrange(len(buf) - 3)
            buf[index : index + 4] = struct.pack(">I", rng.choice(INTERESTING_U32))
        elif choice < 0.7:
            start = rng.randrange(len(buf))
            del buf[start : start + rng.randint(1, 16)]
        elif choice < 0.8:
            start = rng.randrange(len(buf))
            buf[start:start] = buf[start : start + rng.randint(1, 32)]
        elif choice < 0.9:
            buf = buf[: rng.randrange(len(buf) + 1)]
        else:
            other = rng.choice(corpus)
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
    return bytes(buf)


# ---------------------------------------------------------------- the check


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    mode = rng.random()
    if mode < 0.3 or not data:
        return [data] if data else []
    if mode < 0.5 and len(data) <= 4096:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randint(1, 8)))})
    return [data[start:end] for start, end in itertools.pairwise(cuts)]


def check_frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """Everything a session sends must be whole frames with a known type."""
    frames = []
    offset = 0
    while offset < len(out):
        if len(out) - offset < HEADER.size:
            raise FuzzFailure(f"output ends in a partial header: {out[offset:].hex()}")
        frame_type, flags, reserved, stream_id, length = HEADER.unpack_from(out, offset)
        payload = out[offset + HEADER.size : offset + HEADER.size + length]
        if len(payload) != length or frame_type > 6 or reserved:
            raise FuzzFailure(f"malformed output frame at offset {offset}: {out.hex()}")
        frames.append((frame_type, flags, stream_id, payload))
        offset += HEADER.size + length
    return frames


def play(session: Session, events: list[Event], rng: random.Random) -> None:
    """A well-behaved application: take streams, consume data, sometimes answer or reset."""
    for event in events:
        if not isinstance(event, Event):
            raise FuzzFailure(f"receive_data returned a non-event: {event!r}")
        if isinstance(event, StreamOpened):
            session.accept_stream(event.stream_id)
        elif isinstance(event, DataReceived):
            session.acknowledge_received_data(event.stream_id, len(event.data))
            stream_id = event.stream_id
            if rng.random() < 0.3 and session.local_flow_control_window(stream_id):
                session.send_data(
                    stream_id, event.data[: session.local_flow_control_window(stream_id)]
                )
            elif rng.random() < 0.05:
                session.reset_stream(stream_id)


def feed(role: Role, config: SessionConfig, data: bytes, rng: random.Random) -> str:
    """Feed ``data`` to a fresh session; return the outcome ("events" or an error code name)."""
    session = Session(role, config)
    check_frames(session.data_to_send())
    error: RemoteProtocolError | None = None
    for piece in pieces(rng, data):
        try:
            events = session.receive_data(piece)
        except RemoteProtocolError as exc:
            if error is not None and exc is not error:
                raise FuzzFailure("a second, different error after the first one") from exc
            error = exc
            continue
        if error is not None:
            raise FuzzFailure("receive_data accepted input after an error")
        play(session, events, rng)
        check_frames(session.data_to_send())
    if error is None:
        try:
            session.receive_data(b"")  # end of file: fine between frames, an error within one
        except RemoteProtocolError as exc:
            error = exc
    if error is None:
        return "events"
    if session.state is not SessionState.ERROR:
        raise FuzzFailure(f"error {error!r} left the session in {session.state}")
    if not isinstance(error.code, ErrorCode):
        raise FuzzFailure(f"error code {error.code!r} is not an ErrorCode")
    frames = check_frames(session.data_to_send())
    if not frames or frames[-1][0] != 6 or struct.unpack(">I", frames[-1][3][4:8])[0] != error.code:
        raise FuzzFailure(f"no GOAWAY carrying {error.code!r} after {error.message!r}")
    return error.code.name


def run(
    iterations: int,
    seed: int,
    max_size: int = 2048,
    time_limit: float | None = None,
    crash_dir: Path | None = None,
    report: Callable[[str], None] = print,
) -> Counter[str]:
    """Run the fuzzer; return the count of each outcome. Raises :class:`FuzzFailure`."""
    rng = random.Random(seed)
    corpus_roles: list[Role] = []
    corpus: list[bytes] = []
    for _ in range(64):
        role, data = transcript(rng)
        corpus_roles.append(role)
        corpus.append(data)
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    for iteration in range(iterations):
        strategy = rng.random()
        index = rng.randrange(len(corpus))
        role = corpus_roles[index]
        if strategy < 0.15:
            data = random_bytes(rng, max_size)
            role = rng.choice((Role.CONNECTOR, Role.RELAY))
        elif strategy < 0.4:
            data = random_frames(rng, max_size)
            role = rng.choice((Role.CONNECTOR, Role.RELAY))
        elif strategy < 0.45:
            data = corpus[index]
        else:
            data = mutate(rng, corpus[index], corpus)[: max_size * 4]
        config = rng.choice(CONFIGS)
        try:
            outcomes[feed(role, config, data, random.Random(rng.getrandbits(64)))] += 1
        except Exception as exc:
            digest = hashlib.sha256(data).hexdigest()[:16]
            if crash_dir is not None:
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"crash-{digest}.bin").write_bytes(data)
            report(
                f"FAILED at iteration {iteration} (seed {seed}, role {role.value}, "
                f"config {CONFIGS.index(config)}): {exc!r}\ninput {digest}: {data.hex()}"
            )
            raise FuzzFailure(f"iteration {iteration}: {exc!r}") from exc
        if time_limit is not None and time.monotonic() - started > time_limit:
            break
    return outcomes


def replay(path: Path) -> int:
    data = path.read_bytes()
    for role in (Role.CONNECTOR, Role.RELAY):
        for index, config in enumerate(CONFIGS):
            for split_seed in range(8):
                outcome = feed(role, config, data, random.Random(split_seed))
                print(f"{role.value}, config {index}, split {split_seed}: {outcome}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz protocol.Session.receive_data.")
    parser.add_argument("-n", "--iterations", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed")
    parser.add_argument("--max-size", type=int, default=2048, help="largest generated input")
    parser.add_argument("--time-limit", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--crash-dir", type=Path, default=None, help="save failing inputs here")
    parser.add_argument("--replay", type=Path, default=None, help="feed one saved input")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    if args.iterations < 1 or args.max_size < 1:
        parser.error("--iterations and --max-size must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"seed {seed}, {args.iterations} iterations")
    started = time.monotonic()
    try:
        outcomes = run(args.iterations, seed, args.max_size, args.time_limit, args.crash_dir)
    except FuzzFailure:
        return 1
    elapsed = time.monotonic() - started
    total = sum(outcomes.values())
    print(f"{total} inputs in {elapsed:.1f} s ({total / elapsed:,.0f}/s), no contract broken")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:>20}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
