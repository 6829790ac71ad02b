"""Child processes of the benchmark: started in their own session, always killed when the run ends.

Every child gets its own process group (so stopping it also stops what it forked, like nginx's worker)
and, on Linux, a parent-death signal, so that even a benchmark killed with SIGKILL leaves nothing behind.
`Processes.close()` runs from `finally` blocks; SIGTERM is turned into an exception so it does too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when the benchmark dies.
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    """A started child process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.process.pid

    def rss_kib(self) -> int:
        """Return the child's resident set size in KiB (from /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name} (pid {self.pid})")

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system) used so far by the child's whole process group."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # a process that just exited
            if int(fields[2]) == self.pid:  # pgrp: the child leads its own group
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines the child wrote (stdout and stderr)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Start children and stop every one of them, in reverse order, on `close()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self._logs: list[IO[bytes]] = []

    def spawn(
        self, name: str, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Child:
        """Start `args` with its output in `<workdir>/<name>.log`."""
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("wb")
        self._logs.append(log)
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        """Stop one child now (SIGTERM to its group, SIGKILL after 5 s); its log stays."""
        _stop(child.process)
        self.children.remove(child)

    def close(self) -> None:
        """Stop every child (SIGTERM to its group, SIGKILL after 5 s) and close the log files."""
        for child in reversed(self.children):
            _stop(child.process)
        self.children.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Whatever the group leader left behind (nginx workers exit with their master; this is belt and braces).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(child: Child, url: str, *, timeout: float = 30.0, expect: int | None = None) -> None:
    """Poll `url` until it answers (with status `expect`, if given), or raise with the child's log."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            response = httpx.get(url, timeout=1.0)
            if expect is None or response.status_code == expect:
                return
            last = f"status {response.status_code}: {response.text[:300]}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready at {url} ({last}):\n{child.log_tail()}")
        time.sleep(0.05)  # polling a child process's start-up


class Terminated(Exception):
    """Raised in the main thread when the benchmark receives SIGTERM, so `finally` blocks run."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` for the duration of the block (Ctrl+C already raises)."""

    def handler(signum: int, frame: FrameType | None) -> Any:
        raise Terminated(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; Ctrl+C and `finally` still clean up
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
