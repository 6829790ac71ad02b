"""The parent process of `serve --workers N`: uvicorn's supervisor, closing its listening socket at shutdown.

Every worker inherits the listening socket, and so does the parent. On SIGTERM each worker stops accepting and
drains, but the parent's copy keeps the socket open: the kernel still completes new connections, which nobody
will ever serve, until the parent exits up to `--graceful-timeout` seconds later. A client (or a load balancer)
then waits instead of being refused at once and retrying elsewhere. Closing the parent's copy first makes a
draining multi-worker server refuse new connections, as a single worker does.
"""

from __future__ import annotations

from uvicorn.supervisors.multiprocess import Multiprocess


class DrainingMultiprocess(Multiprocess):
    """uvicorn's multi-worker supervisor that stops listening as soon as shutdown begins."""

    def handle_term(self) -> None:
        """Stop listening, then stop the workers (each finishes its in-flight requests)."""
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        """Stop listening, then stop the workers, as on SIGTERM."""
        self._stop_listening()
        super().handle_int()

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()
