"""Run the emulator: embedded in a background thread (:class:`EmulatorServer`) or in the foreground
until SIGINT/SIGTERM (:func:`serve`). Both serve the same Starlette app with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from batchd.emulator.app import EmulatorApp, EmulatorSettings
from batchd.emulator.responder import EmulatedResponder, Responder

log = logging.getLogger("batchd.emulator")


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so port 0 yields a known free port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
    # socket says it is TCP, and with Nagle on, an answer's body waited for the client's delayed ACK of
    # its headers, 40 ms per request on a kept-alive connection, as a real server never makes one wait.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class EmulatorServer:
    """The emulator on ``host:port`` (port 0: a free one), served from a background thread.

    ``with EmulatorServer(state_dir) as emulator: genai.Client(api_key="x",
    http_options=types.HttpOptions(base_url=emulator.base_url))``. Without ``state_dir`` the state
    lives in a temporary directory removed on :meth:`stop`.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        job_seconds: float = 2.0,
        expire_seconds: float = 48 * 3600,
        api_key: str | None = None,
        models: Sequence[str] | None = None,
        strict_models: bool = False,
        cancel_seconds: float | None = None,
        concurrent_batches: int = 100,
        webhook_retry_seconds: float = 1.0,
        webhook_attempts: int = 8,
        faults: Sequence[str] = (),
        responder: Responder | None = None,
        access_log: bool = False,
    ) -> None:
        self._temporary = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="batchd-emulator-")
        self.state_dir = Path(state_dir if state_dir is not None else self._temporary.name)
        self.host = host
        self._requested_port = port
        self._settings = EmulatorSettings(job_seconds=job_seconds, expire_seconds=expire_seconds, api_key=api_key,
                                          strict_models=strict_models, cancel_seconds=cancel_seconds,
                                          concurrent_batches=concurrent_batches,
                                          webhook_retry_seconds=webhook_retry_seconds,
                                          webhook_attempts=webhook_attempts)
        self._models = list(models) if models else None
        self._faults = list(faults)  # parsed now by EmulatorApp, so a bad spec fails at start
        self._responder = responder or EmulatedResponder()
        self._access_log = access_log
        self.app: EmulatorApp | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the emulator is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _prepare(self) -> tuple[uvicorn.Server, socket.socket]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.app = EmulatorApp(self.state_dir, self._settings, models=self._models, faults=self._faults,
                               responder=self._responder)
        self._socket = _bind(self.host, self._requested_port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app.asgi, log_level="warning", access_log=self._access_log, lifespan="off",
            timeout_graceful_shutdown=2, timeout_keep_alive=30,
            # The C parser: a third less CPU for each create and get (100 inline batches: bench/chunks.py).
            http="httptools",
        )
        self._server = uvicorn.Server(config)
        return self._server, self._socket

    def start(self) -> EmulatorServer:
        """Serve in a daemon thread; returns once the emulator accepts connections."""
        server, sock = self._prepare()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as error:  # reported to start()'s caller below
                failure.append(error)

        self._thread = threading.Thread(target=run, name=f"emulator-{self.port}", daemon=True)
        self._thread.start()
        while not server.started:
            if failure or not self._thread.is_alive():
                self._close_state()
                raise RuntimeError(f"the emulator failed to start: {failure[0] if failure else 'unknown'}")
            self._thread.join(0.01)
        log.info("emulator serving %s (state %s)", self.base_url, self.state_dir)
        return self

    def stop(self) -> None:
        """Stop serving, stop batch workers (unfinished jobs resume at the next start), release state."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._close_state()

    def _close_state(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self.app is not None:
            self.app.close()
            self.app = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling (main) thread until SIGINT/SIGTERM, then shut down cleanly."""
        server, sock = self._prepare()

        def request_exit(_signum: int, _frame: object) -> None:
            # First signal: finish open requests, then return. A second one stops at once.
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

        # Our own handlers instead of uvicorn's: uvicorn re-raises the signal after shutting down,
        # which would end the process with -SIGTERM instead of a clean exit status 0.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        # Batch workers compute flat out; the HTTP thread must still answer polls and stream
        # uploads and downloads without waiting 5 ms (the default) for the GIL at every step.
        sys.setswitchinterval(0.001)
        previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        print(f"batchd emulator listening on {self.base_url} (state: {self.state_dir})", flush=True)
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_state()
        print("batchd emulator stopped", flush=True)


def serve(state_dir: Path | str | None = None, **options) -> None:
    """Run the emulator in the foreground until SIGINT/SIGTERM (same options as :class:`EmulatorServer`)."""
    EmulatorServer(state_dir, **options).serve_forever()
