"""Run `convai-gateway dev` as a real subprocess on free ports, as a newcomer would."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tests.support.servers import free_port

# Variables a developer may have exported that would change what `dev` does.
_PRIVATE_PREFIXES = ("ELEVENLABS_", "JWT_", "REDIS_", "ALLOWED_")


@dataclass
class DevCommand:
    """A running `dev` command: its process, gateway and emulator ports, and the banner it printed."""

    process: subprocess.Popen[str]
    port: int
    emulator_port: int
    lines: list[str]


@contextlib.contextmanager
def running_dev_command(env: Mapping[str, str] | None = None) -> Iterator[DevCommand]:
    """Start `python -m service dev` (with `env` added), wait for its banner, stop it after."""
    port, emulator_port = free_port(), free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_PREFIXES)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "dev", "--port", str(port), "--emulator-port", str(emulator_port)],
        env={**clean, "LOG_LEVEL": "WARNING", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl+C"):
                break
        yield DevCommand(process, port, emulator_port, lines)
    finally:
        process.terminate()
        process.wait(timeout=20)
        process.stdout.close()


@contextlib.contextmanager
def output_lines(dev: DevCommand) -> Iterator[queue.Queue[str]]:
    """Queue the rest of `dev`'s output as a thread reads it; stop the command and wait for the thread after."""
    output = dev.process.stdout
    assert output is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for printed in output:
            lines.put(printed)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        dev.process.terminate()
        reader.join(timeout=20)


def next_line_with(lines: queue.Queue[str], text: str, timeout: float = 10.0) -> str:
    """Return the next queued line holding `text` (queue.Empty, failing the test, if none comes in time)."""
    while True:
        line = lines.get(timeout=timeout)
        if text in line:
            return line
