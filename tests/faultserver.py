"""A tiny scripted HTTP server for fault tests (standard library only).

    with FaultServer([("drop",), ("json", 200, {"ok": True})]) as fs:
        picas.Server(fs.url).info()        # first attempt dropped, second answered
        assert fs.methods() == ["GET", "GET"]

Every request takes the next action off the script; when the script is used
up, ``default`` is used (``("proxy",)`` when an ``upstream`` URL is given,
else ``("json", 200, {"ok": True})``). The server speaks HTTP/1.1 with
keep-alive, so a client may send many requests over one connection;
``connections`` counts the TCP connections accepted and ``requests`` records
every request as a :class:`Request`.

Actions (tuples; a callable ``action(server, request)`` returning an action
is accepted too, for anything the tuples cannot say):

``("drop",)``
    read the request, then close the connection without answering.
``("reset",)``
    read the request, then reset the connection (RST, not FIN).
``("json", status, obj[, headers])``
    answer ``obj`` as JSON.
``("status", status[, body[, headers]])``
    answer with ``status``; ``body`` is JSON-encoded unless it is bytes/str
    (default: a CouchDB-style ``{"error": ..., "reason": ...}``).
``("raw", status, body_bytes[, headers])``
    answer exactly these bytes (Content-Type: text/plain unless given).
``("sleep", seconds[, action])``
    wait, then perform ``action`` (default: the default action).
``("close_after_response", action)``
    perform ``action`` (answering with keep-alive), then close the idle
    connection, as a server or proxy whose keep-alive timeout expired does.
``("proxy",)``
    forward the request to ``upstream`` and relay its answer.
``("proxy_then_drop",)``
    forward the request to ``upstream`` (so the server applies it), then
    close the connection without relaying the answer: a lost answer.
``("half_response",)``
    forward the request to ``upstream``, relay the status line, the headers
    (with the full Content-Length) and the first half of the body, then close
    the connection: the connection died mid-response, after the server
    applied the request.
``("half_request",)``
    send ``upstream`` the request line, the headers (with the full
    Content-Length) and only the first half of the body, then close both
    connections without answering: the connection died mid-request, so the
    server never applies it.

Every proxied request records the upstream's answer in ``request.upstream_status``
and ``request.upstream_body``.

``outage(seconds)`` makes the server disappear, as a restarting server does:
for ``seconds`` nothing listens on its port (connections are refused) and
every open connection is cut; then it listens on the same port again.
"""
import http.client
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

__all__ = ["FaultServer", "Request"]

_HOP_BY_HOP = frozenset(["connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length"])


class Request(object):
    """One request as the fault server received it."""

    def __init__(self, method, path, headers, body, connection):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.connection = connection      # number of the TCP connection it came on
        self.time = time.time()
        self.upstream_status = None       # the upstream's answer, when it was proxied
        self.upstream_body = None

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "Request(%r, %r, connection=%d)" % (self.method, self.path, self.connection)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):      # connections cut are expected
            socketserver.TCPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30                      # an idle client connection ends its thread eventually
    disable_nagle_algorithm = True    # headers and body go out in two writes: no 40 ms stalls

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        self.fault = self.server.fault
        self.conn_number = self.fault._new_connection(self.connection)

    def finish(self):
        self.fault._closed_connection(self.connection)
        try:
            BaseHTTPRequestHandler.finish(self)
        except OSError:
            pass                          # cut by outage()

    def log_message(self, *args):
        pass

    def _dispatch(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(self.command, self.path, dict(self.headers.items()), body,
                          self.conn_number)
        action = self.fault._next_action(request)
        self._perform(action, request)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_COPY = _dispatch

    # -- actions --------------------------------------------------------------

    def _perform(self, action, request):
        while callable(action):
            action = action(self.fault, request)
        kind = action[0]
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            return
        if kind == "sleep":
            time.sleep(action[1])
            nxt = action[2] if len(action) > 2 else self.fault.default
            return self._perform(nxt, request)
        if kind == "close_after_response":
            self._perform(action[1], request)
            self.close_connection = True
            return
        if kind == "json":
            headers = dict(action[3]) if len(action) > 3 else {}
            headers.setdefault("Content-Type", "application/json")
            return self._answer(action[1], json.dumps(action[2]).encode("utf-8"), headers)
        if kind == "status":
            status = action[1]
            body = action[2] if len(action) > 2 else None
            headers = dict(action[3]) if len(action) > 3 else {}
            if body is None:
                body = {"error": "fault_%d" % status, "reason": "scripted by FaultServer"}
            if isinstance(body, str):
                body = body.encode("utf-8")
            if not isinstance(body, bytes):
                body = json.dumps(body).encode("utf-8")
                headers.setdefault("Content-Type", "application/json")
            headers.setdefault("Content-Type", "text/plain")
            return self._answer(status, body, headers)
        if kind == "raw":
            headers = dict(action[3]) if len(action) > 3 else {}
            headers.setdefault("Content-Type", "text/plain")
            return self._answer(action[1], action[2], headers)
        if kind == "proxy":
            status, headers, body = self.fault.forward(request)
            return self._answer(status, body, headers)
        if kind == "proxy_then_drop":
            self.fault.forward(request)
            self.close_connection = True
            return
        if kind == "half_response":
            status, headers, body = self.fault.forward(request)
            self.close_connection = True
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
            except OSError:
                pass
            return
        if kind == "half_request":
            self.fault.forward_half(request)
            self.close_connection = True
            return
        raise ValueError("FaultServer: unknown action %r" % (action,))

    def _answer(self, status, body, headers):
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True        # the client gave up (timed out)


class FaultServer(object):
    """A scripted HTTP server on 127.0.0.1; see the module docstring."""

    def __init__(self, script=(), upstream=None, default=None):
        self.script = list(script)
        self.upstream = upstream
        if default is None:
            default = ("proxy",) if upstream else ("json", 200, {"ok": True})
        self.default = default
        self.requests = []
        self.connections = 0
        self._lock = threading.Lock()
        self._server = _TCPServer(("127.0.0.1", 0), _Handler)
        self._server.fault = self
        self.host, self.port = self._server.server_address[:2]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = None
        self._open = set()                # sockets of the open client connections
        self._comeback = None             # the timer that ends an outage
        self.outages = []                 # (start, end) of every outage()
        self.outage_cuts = []             # connections each outage() cut

    # -- life cycle -------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        with self._lock:
            if self._comeback is not None:
                self._comeback.cancel()
                self._comeback = None
        self._stop_listening()

    def _stop_listening(self):
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def outage(self, seconds):
        """Disappear for ``seconds`` (see the module docstring); returns at once."""
        start = time.time()
        self._stop_listening()
        with self._lock:
            cut = list(self._open)
            self.outage_cuts.append(len(cut))
        for sock in cut:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def come_back():
            with self._lock:
                if self._comeback is None:          # stopped meanwhile
                    return
                self._comeback = None
                self._server = _TCPServer(("127.0.0.1", self.port), _Handler)
                self._server.fault = self
                self.outages.append((start, time.time()))
                self.start()
        with self._lock:
            self._comeback = threading.Timer(seconds, come_back)
            self._comeback.daemon = True
            self._comeback.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- scripting ----------------------------------------------------------------

    def add(self, *actions):
        """Append actions to the script."""
        with self._lock:
            self.script.extend(actions)

    def _new_connection(self, sock=None):
        with self._lock:
            self.connections += 1
            if sock is not None:
                self._open.add(sock)
            return self.connections

    def _closed_connection(self, sock):
        with self._lock:
            self._open.discard(sock)

    def _next_action(self, request):
        with self._lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else self.default

    def methods(self):
        """The methods of all requests received so far, in order."""
        return [r.method for r in self.requests]

    def forward(self, request):
        """Send ``request`` to the upstream server; return (status, headers, body)."""
        if not self.upstream:
            raise RuntimeError("FaultServer: proxy action without an upstream URL")
        parts = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
        try:
            headers = dict((k, v) for k, v in request.headers.items()
                           if k.lower() not in _HOP_BY_HOP)
            conn.request(request.method, request.path, body=request.body or None,
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = dict((k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP)
            request.upstream_status, request.upstream_body = resp.status, body
            return resp.status, out, body
        finally:
            conn.close()

    def forward_half(self, request):
        """Send ``upstream`` the start of ``request`` (half its body), then hang up."""
        if not self.upstream:
            raise RuntimeError("FaultServer: half_request action without an upstream URL")
        parts = urlsplit(self.upstream)
        head = ["%s %s HTTP/1.1" % (request.method, request.path)]
        head += ["%s: %s" % (k, v) for k, v in request.headers.items()
                 if k.lower() not in _HOP_BY_HOP]
        head += ["Host: %s:%d" % (parts.hostname, parts.port or 80),
                 "Content-Length: %d" % len(request.body), "", ""]
        data = "\r\n".join(head).encode("latin-1") + request.body[:len(request.body) // 2]
        sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=30)
        try:
            sock.sendall(data)
            time.sleep(0.05)              # let the server read the torn request
        finally:
            sock.close()
