"""Local receivers for the notification tests: an HTTP sink and an SMTP sink, both on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the sink answered
    target: str  # the request line's target: absolute-form when it came through a proxy
    connection: int  # which of the sink's connections carried it (the client's port)

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class HttpSink:
    """Records every POST; answers ``statuses`` in turn, then ``status`` (200 unless changed).

    It speaks HTTP/1.1 and keeps connections open between requests, as web servers do.
    """

    status: int = 200
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self):
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with sink.lock:
                    sink.open_connections.add(self.connection)

            def finish(self):
                with sink.lock:
                    sink.open_connections.discard(self.connection)
                super().finish()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    status = sink.statuses.pop(0) if sink.statuses else sink.status
                    sink.received.append(Received(dict(self.headers), body, status, self.path, self.client_address[1]))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.lock = threading.Lock()
        self.open_connections: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def accepted(self) -> list[Received]:
        """The POSTs answered with a 2xx."""
        with self.lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def drop_connections(self) -> None:
        """Close every open connection, as a server does with idle ones."""
        with self.lock:
            for connection in self.open_connections:
                with contextlib.suppress(OSError):  # the client closed it meanwhile
                    connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HttpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.drop_connections()  # their threads wait for a next request that is not coming
        self.server.server_close()


class ReservedPort:
    """A free port on 127.0.0.1 that stays ours until :meth:`close`, for a server that must bind a known
    port (or come back on the same one).

    A probe socket closed right away would leave the port free for anyone: another test's
    emulator, or a client connection, could take it before our server binds it. This socket stays
    bound, not listening (a connection to the port is refused, as with no server at all), with
    SO_REUSEADDR, so our server (which sets it too) can bind the port beside it, while the kernel
    gives the port to no one else.
    """

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 keeping every message it is handed."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        self.reserved = ReservedPort()  # asyncio's server sets SO_REUSEADDR: it binds beside it
        self.port = self.reserved.port
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):
        from email import message_from_bytes

        self.messages.append((envelope.mail_from, envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"

    def apprise_url(self, to: str = "ops@example.com") -> str:
        return f"mailto://127.0.0.1:{self.port}?from=batchd@example.com&to={to}"

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.controller.stop()
        self.reserved.close()
