"""Real servers for tests: private redis-servers (standalone, or a Sentinel group) and ASGI apps on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import redis
import uvicorn

from tests.support.tls import TlsFiles


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free loopback port that tests may stop, restart and slow down."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH; .ci/run installs it (apt-get install redis-server)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra_args = extra_args
        self.workdir = Path(tempfile.mkdtemp(prefix="convai-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        # What the test's own clients need to be let in (a password, a username, TLS files).
        self.client_options: dict[str, Any] = {}

    @property
    def url(self) -> str:
        """Return the redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def command(self) -> list[str]:
        """Return the command line that starts this server."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--enable-debug-command", "local",
            *self.extra_args,
        ]  # fmt: skip

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING, or raise."""
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2, **self.client_options)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    if self.process is not None and self.process.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {self.process.returncode}") from None
                    time.sleep(0.02)  # polling a child process start-up, not papering over a race
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (simulating an outage); `start()` brings it back on the same port."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash: no shutdown, no save); `start()` brings it back."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        """Return a synchronous client for assertions and setup."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **self.client_options)

    def flush(self) -> None:
        """Delete every key."""
        with contextlib.closing(self.client()) as client:
            client.flushall()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class TlsRedisServer(RedisServer):
    """A private redis-server that also serves TLS (client certificates required) on a second free port."""

    def __init__(self, ca: Path, cert: Path, key: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.tls_port = free_port()
        super().__init__(
            extra_args=(
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "yes",
                *extra_args,
            )
        )  # fmt: skip


class RedisSentinel(RedisServer):
    """A `redis-server --sentinel` on a free loopback port monitoring one master, with short failover timings.

    Sentinel rewrites its configuration file as it learns the topology, so the file lives in the server's
    own directory and is written once: a restarted sentinel resumes from what it had learned.
    """

    def __init__(
        self,
        service: str,
        master_port: int,
        *,
        quorum: int = 1,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        extra_config: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__()
        self.service = service
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # Lines after the monitor settings: `requirepass`, ACL `user` lines, `sentinel auth-pass`...
        self.extra_config = extra_config
        # With TLS files the sentinel serves TLS only on `port` (its plaintext port is 0), with client
        # certificates required, and reaches the master over TLS with the client certificate.
        self.tls = tls
        if tls is not None:
            self.client_options = {
                "ssl": True,
                "ssl_ca_certs": str(tls.ca),
                "ssl_certfile": str(tls.client_cert),
                "ssl_keyfile": str(tls.client_key),
            }

    @property
    def address(self) -> tuple[str, int]:
        """Return the (host, port) clients give to a Sentinel client."""
        return ("127.0.0.1", self.port)

    def command(self) -> list[str]:
        """Write the sentinel configuration if it is not there yet; return the command line."""
        config = self.workdir / "sentinel.conf"
        if not config.exists():
            listen = [f"port {self.port}"]
            if self.tls is not None:
                listen = [
                    "port 0",
                    f"tls-port {self.port}",
                    f"tls-cert-file {self.tls.server_cert}",
                    f"tls-key-file {self.tls.server_key}",
                    f"tls-client-cert-file {self.tls.client_cert}",
                    f"tls-client-key-file {self.tls.client_key}",
                    f"tls-ca-cert-file {self.tls.ca}",
                    "tls-auth-clients yes",
                    "tls-replication yes",  # Sentinel reaches masters and replicas over TLS with this
                ]
            # `sentinel monitor` must come before the other settings of its master.
            lines = [
                *listen,
                "bind 127.0.0.1",
                f"dir {self.workdir}",
                f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.service} 1",
                *self.extra_config,
            ]
            config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [self.binary, str(config), "--sentinel"]

    def master_port_now(self) -> int | None:
        """Return the port of the master this sentinel currently names, or None if it names none."""
        with contextlib.closing(self.client()) as client:
            address = client.sentinel_get_master_addr_by_name(self.service)
        return int(address[1]) if isinstance(address, tuple) else None

    def sees_master_up(self) -> bool:
        """Tell whether this sentinel has had INFO from its master recently and does not consider it down."""
        with contextlib.closing(self.client()) as client:
            state: dict[str, Any] = client.sentinel_master(self.service)  # type: ignore[assignment]
        # info-refresh counts from 0 until the first INFO reply arrives: a huge number until then.
        return bool(int(state["info-refresh"]) < 10_000 and not state["is_sdown"] and not state["is_odown"])

    def known_replica_ports(self) -> set[int]:
        """Return the ports of the replicas this sentinel knows and considers up."""
        with contextlib.closing(self.client()) as client:
            replicas = client.sentinel_slaves(self.service)
        return {int(r["port"]) for r in replicas if not r["is_sdown"] and not r["is_odown"]}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition()` until it is true, or raise AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # a server still starting, or one just failed over: ask again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling other processes' state, not papering over a race


def replication_info(server: RedisServer) -> dict[str, Any]:
    """Return the server's INFO replication section."""
    with contextlib.closing(server.client()) as client:
        info: dict[str, Any] = client.info("replication")
    return info


def in_sync(replica: RedisServer) -> bool:
    """Tell whether the replica's link to its master is up (its first full sync done)."""
    return bool(replication_info(replica)["master_link_status"] == "up")


class SentinelGroup:
    """A master, its replicas and one sentinel (quorum 1) monitoring them as one service, all on loopback."""

    def __init__(
        self,
        service: str = "gwmaster",
        *,
        replicas: int = 1,
        password: str | None = None,
        sentinel_config: tuple[str, ...] = (),
        sentinel_client_options: dict[str, Any] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """Build the group; `password` protects the data servers, `sentinel_config` adds sentinel.conf lines.

        With `tls` the master also serves TLS (client certificates required) and the sentinel serves TLS only
        and names the master's TLS port (no replicas then: they would have to replicate over TLS too).
        """
        self.service = service
        auth = ("--requirepass", password, "--masterauth", password) if password else ()
        # Without a delay the first full sync starts at once (Redis 7 waits 5 s for more replicas to join).
        sync = ("--repl-diskless-sync-delay", "0", *auth)
        self.master: RedisServer
        if tls is not None:
            if replicas:
                raise ValueError("a TLS SentinelGroup has no replicas")
            self.master = TlsRedisServer(tls.ca, tls.server_cert, tls.server_key, extra_args=sync)
            master_port = self.master.tls_port
        else:
            self.master = RedisServer(extra_args=sync)
            master_port = self.master.port
        self.replicas = [
            RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port), *auth))
            for _ in range(replicas)
        ]
        if password:
            for server in self.servers:
                server.client_options = {"password": password}
        reach = (f"sentinel auth-pass {service} {password}",) if password else ()
        self.sentinel = RedisSentinel(service, master_port, extra_config=(*reach, *sentinel_config), tls=tls)
        if sentinel_client_options:
            self.sentinel.client_options = {**self.sentinel.client_options, **sentinel_client_options}

    @property
    def servers(self) -> list[RedisServer]:
        """Return the data servers: the first master and its replicas (roles change after a failover)."""
        return [self.master, *self.replicas]

    def start(self) -> None:
        """Start every process; wait until the replicas are in sync and the sentinel knows them."""
        self.master.start()
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            wait_for(partial(in_sync, replica), f"replica {replica.port} to finish its first sync")
        # Started only now, the sentinel's first INFO of the master lists every replica (the next one comes
        # 10 s later), so it can fail over as soon as the test needs it to.
        self.sentinel.start()
        replica_ports = {r.port for r in self.replicas}
        wait_for(
            lambda: self.sentinel.known_replica_ports() == replica_ports, "the sentinel to see the replicas"
        )
        wait_for(self.sentinel.sees_master_up, "the sentinel to reach the master")

    def server_on(self, port: int) -> RedisServer:
        """Return the data server listening on `port`."""
        return next(s for s in self.servers if s.port == port)

    def promoted(self, away_from: RedisServer) -> RedisServer | None:
        """Return the master the sentinel names if it is not `away_from` and acts as master; else None."""
        port = self.sentinel.master_port_now()
        if port is None or port == away_from.port:
            return None
        server = self.server_on(port)
        return server if replication_info(server)["role"] == "master" else None

    def wait_for_failover(self, away_from: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until the sentinel names a master other than `away_from` that acts as master; return it."""
        wait_for(lambda: self.promoted(away_from) is not None, "a sentinel failover", timeout)
        server = self.promoted(away_from)
        assert server is not None
        return server

    def close(self) -> None:
        """Kill every process and remove its directory, each even if another fails to stop."""
        with contextlib.ExitStack() as stack:
            for server in [*self.servers, self.sentinel]:
                stack.callback(server.close)
                # SIGKILL, not SIGTERM: a master's shutdown waits up to 10 s for its replicas to catch up.
                stack.callback(server.kill)


@contextlib.contextmanager
def sentinel_group(
    service: str = "gwmaster", *, replicas: int = 1, **options: Any
) -> Iterator[SentinelGroup]:
    """Run a started `SentinelGroup` (`options` as it takes them) for the block; stop all its processes afterwards."""
    group = SentinelGroup(service, replicas=replicas, **options)
    try:
        group.start()
        yield group
    finally:
        group.close()


class ServedApp:
    """An ASGI app served by uvicorn in a background thread on a free loopback port."""

    def __init__(
        self, app: Any, *, lifespan: str = "on", ws: str = "websockets-sansio", http: Any = "auto"
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, ws=ws, http=http)  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """Return the http:// base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedApp:
        """Start serving and wait until uvicorn reports it has started."""
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)  # waiting for another thread's start-up flag
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and join its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextlib.contextmanager
def serve(app: Any, **kwargs: Any) -> Iterator[ServedApp]:
    """Serve `app` on loopback for the duration of the block."""
    served = ServedApp(app, **kwargs).start()
    try:
        yield served
    finally:
        served.stop()


def kill_process_group(process: subprocess.Popen[Any]) -> None:
    """Kill a process started with start_new_session=True, with every process it started, and reap it."""
    # Killing `serve`'s supervisor alone orphans its uvicorn workers and multiprocessing trackers (~50 MB each):
    # a test run left dozens behind, and a day of runs filled the machine's memory.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)


def _stat_fields(pid: int | str) -> list[str]:
    # The command name, in parentheses, may hold spaces: the fields after its closing one are fixed (state,
    # parent id, ...).
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def child_pids(pid: int) -> list[int]:
    """Return the ids of the processes whose parent is `pid` (read from /proc)."""
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if int(_stat_fields(entry.name)[1]) == pid:
                children.append(int(entry.name))
    return children


def is_running(pid: int) -> bool:
    """Tell whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False
