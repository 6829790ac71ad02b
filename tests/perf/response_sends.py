"""Measure what a response's second send costs: head and body in two sends (uvicorn) or one (`serve`).

Not a test: run it by hand to reproduce the README's figure for `HeadWithBodyTransport`.

    .venv/bin/python -m tests.perf.response_sends [--responses 20000] [--rounds 10]

On a loopback TCP connection (TCP_NODELAY, as uvicorn and uvloop set it) a thread reads everything while this
process sends `--responses` answers shaped like a signed-URL mint's (a ~600-byte head, a ~250-byte body), either
as two sends or as one; the figure is the sending thread's CPU time per answer, which on loopback includes the
kernel's delivery to the reader. Modes alternate round by round and the medians are printed, since this machine's
timings drift by tens of per cent within minutes.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence

MODES = ("two-sends", "one-send")
HEAD = b"HTTP/1.1 200 OK\r\n" + b"x-example-header: a value of typical length here\r\n" * 12 + b"\r\n"
BODY = b'{"signed_url":"wss://api.elevenlabs.io/v1/convai/conversation?' + b"a" * 160 + b'","expires_at":1}'


def sender_cpu_per_response(mode: str, responses: int) -> float:
    """Return the sending thread's CPU microseconds per response, sent in `mode` over loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with (
            socket.create_connection(server.getsockname()) as reader,
            server.accept()[0] as writer,
        ):
            for sock in (reader, writer):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            expected = (len(HEAD) + len(BODY)) * responses

            def read_all() -> None:
                received = 0
                while received < expected:
                    received += len(reader.recv(65536))

            thread = threading.Thread(target=read_all)
            thread.start()
            started = time.thread_time()
            for _ in range(responses):
                if mode == "two-sends":
                    writer.sendall(HEAD)
                    writer.sendall(BODY)
                else:
                    writer.sendall(HEAD + BODY)
            spent = time.thread_time() - started
            thread.join()
    return spent / responses * 1e6


def compare(responses: int, rounds: int) -> dict[str, list[float]]:
    """Return each mode's CPU microseconds per response, one figure per round, the modes' order alternating."""
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_number in range(rounds):
        for mode in MODES if round_number % 2 == 0 else MODES[::-1]:
            figures[mode].append(sender_cpu_per_response(mode, responses))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Compare the two ways of sending a response and print the medians."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.perf.response_sends", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--responses", type=int, default=20_000, help="responses per round and mode")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.responses < 1 or args.rounds < 1:
        parser.error("--responses and --rounds must be at least 1")
    figures = compare(args.responses, args.rounds)
    medians = {mode: statistics.median(values) for mode, values in figures.items()}
    for mode in MODES:
        rounds = ", ".join(f"{value:.1f}" for value in figures[mode])
        print(f"{mode:<10} {medians[mode]:6.2f} us of sender CPU per response (median; rounds: {rounds})")
    print(f"one send / two sends: {medians['one-send'] / medians['two-sends']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
