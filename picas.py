#!/usr/bin/env python3
# picas.py -- a pilot-job client for PiCaS token pools in CouchDB.
#
# Copyright (c) 2026 the picas.py authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in
# all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""A PiCaS pilot-job client in one file: CouchDB tokens in, results out.

PiCaS keeps task descriptions ("tokens") in a CouchDB database. Pilot jobs on
grid worker nodes, SLURM array jobs or laptops claim a token, run it, and write
the exit code and logs back. This module is the whole client: copy this one
file next to your job script (it needs nothing but Python 3.6 or newer and its
standard library), then either run the generic pilot::

    python picas.py run -- ./process_task.sh      # $1 = input, $2 = token id

or use the Python API that upstream ``picas`` users know::

    import picas
    db = picas.Database(picas.Server("https://couch.example.org:6984",
                                     "user", password), "mydb")

The file reads top to bottom: compatibility, errors, the CouchDB HTTP client,
tokens, claiming, running tasks, the result journal, the actor loop, admin
operations and the command line.
"""

__version__ = "0.1.0"
__all__ = [
    "PicasError", "HTTPError", "NotFound", "Conflict", "Unauthorized",
    "ServerError", "ServerUnreachable", "BadResponse",
    "Server", "Database", "Document", "Task", "BasicTokenModifier",
    "TaskViewIterator", "PrioritizedViewIterator", "EndlessViewIterator",
    "RunActor", "execute", "main",
]

import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref


class _LazyModule(object):
    """Stands in for a module until first used, then imports it and takes its place.

    Keeps ``import picas`` cheap (these three cost a fifth of it): they are
    needed only once a pilot talks to the server.
    """

    def __init__(self, name, alias):
        self._lazy = (name, alias)

    def __getattr__(self, attr):
        name, alias = self.__dict__["_lazy"]
        module = __import__(name, fromlist=["_"])
        globals()[alias] = module
        return getattr(module, attr)


base64 = _LazyModule("base64", "base64")
random = _LazyModule("random", "random")
_urlparse = _LazyModule("urllib.parse", "_urlparse")


def quote(text, safe="/", errors=None):
    """Percent-encode ``text`` for a URL path (urllib.parse.quote)."""
    return _urlparse.quote(text, safe=safe, errors=errors)


def unquote(text):
    return _urlparse.unquote(text)


log = logging.getLogger("picas")
log.addHandler(logging.NullHandler())


###############################################################################
# Errors ######################################################################
###############################################################################

class PicasError(Exception):
    """Root of every error picas.py raises on purpose."""


class ServerUnreachable(PicasError):
    """The server could not be reached, or kept failing, after all retries.

    ``url`` is the redacted URL that was tried, ``cause`` the last underlying
    error (a socket error, a timeout or an :class:`HTTPError`).
    """

    def __init__(self, message, url=None, cause=None):
        PicasError.__init__(self, message)
        self.url = url
        self.cause = cause


class BadResponse(PicasError):
    """The server answered something that is not the JSON CouchDB sends."""


class Unstorable(PicasError, ValueError):
    """A value that JSON cannot hold (bytes, NaN, lone surrogates...); ``problems`` says where."""

    def __init__(self, message, problems=()):
        PicasError.__init__(self, message)
        self.problems = list(problems)


class Degraded(PicasError):
    """A CouchDB cluster answers writes with 202: fewer copies than its quorum took them.

    Raised by claiming: after such an answer a pilot claims nothing more until
    writes are answered 201 again (see :meth:`Database.probe`).
    """


class HTTPError(PicasError):
    """CouchDB answered with an error status.

    Every HTTP error has the same attributes: ``status`` (int), ``error``
    (CouchDB's short error name such as ``"not_found"``, or None), ``reason``
    (its human text, for people only: picas.py never decides on it),
    ``method`` and ``path`` (the request, without host or credentials).
    ``ambiguous`` is true when an earlier attempt of the same request may have
    been applied by the server before its answer was lost (see
    :meth:`Server.request`).
    """

    #: The status of an error raised without one (``raise Conflict``, as test
    #: doubles raise python-couchdb's ``ResourceConflict``).
    default_status = None

    def __init__(self, status=None, error=None, reason=None, method=None, path=None):
        if status is not None and not isinstance(status, int):
            # Raised by user code the python-couchdb way: ResourceConflict("message").
            status, reason = None, reason or str(status)
        self.status = self.default_status if status is None else status
        self.error = error
        self.reason = reason
        self.method = method
        self.path = path
        self.ambiguous = False
        text = "HTTP %s" % self.status
        if method or path:
            text = "%s %s: %s" % (method, path, text)
        if error:
            text += " %s" % error
        if reason:
            text += " (%s)" % reason
        PicasError.__init__(self, text)


class BadRequest(HTTPError):
    """400: CouchDB did not understand the request (bad view parameters...)."""

    default_status = 400


class Unauthorized(HTTPError):
    """401 or 403: wrong user name or password, or not allowed to do this."""

    default_status = 401


class NotFound(HTTPError):
    """404: no such database, document, design document or view."""

    default_status = 404


class Conflict(HTTPError):
    """409: the document changed since the ``_rev`` you sent was read."""

    default_status = 409


class PreconditionFailed(HTTPError):
    """412: for example, creating a database that already exists."""

    default_status = 412


class ServerError(HTTPError):
    """5xx: the server failed; usually worth retrying later."""

    default_status = 500


def _error_class(status):
    if status in (401, 403):
        return Unauthorized
    return {400: BadRequest, 404: NotFound, 409: Conflict,
            412: PreconditionFailed}.get(status, ServerError if status >= 500 else HTTPError)


###############################################################################
# The CouchDB HTTP client #####################################################
###############################################################################

#: Seconds to wait for the server on one request before giving up on it.
DEFAULT_TIMEOUT = 60.0
#: Seconds to wait for a view query: building a view index can take minutes.
DEFAULT_VIEW_TIMEOUT = 300.0
#: How many times a request that is safe to repeat is retried.
DEFAULT_RETRIES = 8
#: First back-off delay, doubled after every failed attempt, up to the cap.
RETRY_BASE_DELAY = 0.25
RETRY_MAX_DELAY = 30.0

_RETRY_STATUSES = frozenset([429, 500, 502, 503, 504])
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def _split_url(url):
    """Split ``url`` into (scheme, userinfo, host, port, path), never failing on the password.

    The user name and password are everything before the last ``@`` of the
    part after the scheme, so a password with ``/``, ``?``, ``#`` or ``@`` in
    it, even unencoded, is never taken for a host, port or path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url[2:] if url.startswith("//") else url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = None, rest
    cut = min([i for i in (hostpart.find(c) for c in "/?#") if i >= 0] or [len(hostpart)])
    netloc, path = hostpart[:cut], hostpart[cut:]
    host, port = netloc, None
    if netloc.startswith("["):
        host, _, tail = netloc[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif ":" in netloc:
        host, _, port = netloc.rpartition(":")
    if port is not None:
        port = int(port) if port.isdigit() else -1
    return scheme.lower(), userinfo, host, port, path


def redact_url(url):
    """Return ``url`` with any user name and password removed.

    >>> redact_url("https://alice:s3cret@couch.example.org:6984/db")
    'https://couch.example.org:6984/db'
    >>> redact_url("alice:s3cret@couch.example.org")
    'couch.example.org'
    """
    scheme, _, host, port, path = _split_url(url)
    netloc = ("[%s]" % host if ":" in host else host) + (":%d" % port if port else "")
    return ("%s://" % scheme if scheme else "") + netloc + path


def _quote_id(doc_id):
    """Quote a document id for a URL path; ``_design/x`` keeps its slash."""
    for prefix in ("_design/", "_local/"):
        if doc_id.startswith(prefix):
            return prefix + quote(doc_id[len(prefix):], safe="")
    return quote(doc_id, safe="")


def _dumps(obj):
    """Encode ``obj`` as the compact UTF-8 JSON CouchDB stores, or raise :class:`Unstorable`.

    NaN and infinities (not JSON), bytes and other non-JSON objects are
    refused with the place they were found. Text with lone surrogates (as
    truncating JavaScript or Java code leaves it) is sent as ``\\udXXX``
    escapes, the only lossless form: CouchDB refuses it (400 "invalid UTF-8
    JSON"), lenient servers store it.
    """
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError):
        problems = find_unstorable(obj)
        raise Unstorable("cannot be stored as JSON: %s" % "; ".join(problems[:3] or ["?"]),
                         problems)


def find_unstorable(value, where="", limit=10):
    """The places in ``value`` that JSON (or CouchDB) cannot hold, as readable lines.

    Bytes, NaN and infinite numbers, text with lone surrogates, keys that are
    not text, and objects other than dict, list, str, int, float, bool, None.
    An empty list when ``value`` is fine (checked at C speed first).
    """
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return []
    except (TypeError, ValueError):         # UnicodeEncodeError is a ValueError
        pass
    found = []

    def walk(item, path):
        if len(found) >= limit:
            return
        name = path or "the document"
        if isinstance(item, str):
            for i, char in enumerate(item):
                if "\ud800" <= char <= "\udfff":
                    found.append("%s holds a lone surrogate U+%04X at position %d (not valid "
                                 "Unicode text)" % (name, ord(char), i))
                    return
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            return
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                found.append("%s is %r, which JSON cannot hold" % (name, item))
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    found.append("%s has a key %r that is not text" % (name, key))
                    continue
                key = key if isinstance(key, str) else json.dumps(key)
                walk(key, "%s (a key)" % (path + "." + key if path else key))
                walk(sub, path + "." + key if path else key)
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                walk(sub, "%s[%d]" % (path, i))
        elif isinstance(item, (bytes, bytearray)):
            found.append("%s holds bytes (%r%s), which JSON cannot hold: decode them to text "
                         "or attach them" % (name, bytes(item[:20]), "..." if len(item) > 20 else ""))
        else:
            found.append("%s holds a %s object, which JSON cannot hold"
                         % (name, type(item).__name__))
    walk(value, where)
    return found


def make_storable(value):
    """A copy of ``value`` that JSON and CouchDB can hold: see :func:`find_unstorable`.

    Bytes become UTF-8 text when they are, else ``"base64:..."``; NaN and
    infinities their names as text; lone surrogates U+FFFD; other objects
    their ``repr``.
    """
    if isinstance(value, str):
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value) \
            if any("\ud800" <= c <= "\udfff" for c in value) else value
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, dict):
        return dict((make_storable(k) if isinstance(k, str) else repr(k), make_storable(v))
                    for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [make_storable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
    return repr(value)


_JSON_PARAMS = frozenset(["key", "keys", "startkey", "endkey", "start_key",
                          "end_key"])


def _encode_params(params):
    """Encode query parameters the way CouchDB wants them.

    Keys are JSON (``key="a"`` becomes ``key=%22a%22``); booleans are
    ``true``/``false``; None values are left out.
    """
    out = []
    for name, value in sorted(params.items()):
        if value is None:
            continue
        if name in _JSON_PARAMS:
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        out.append((name, value))
    return _urlparse.urlencode(out)


def _ssl_context(verify=True, cafile=None, capath=None):
    """Build the TLS context: verification on unless explicitly switched off.

    Besides the system's CAs, ``SSL_CERT_FILE`` and ``X509_CERT_DIR`` (where
    grid nodes keep their CAs, usually ``/etc/grid-security/certificates``)
    are honoured when set.
    """
    import ssl
    if not verify:
        log.warning("TLS certificate verification is switched OFF: anyone on the "
                    "network path can read and change what picas.py sends, "
                    "including the password. Give the server's CA instead "
                    "(cafile/capath, SSL_CERT_FILE or X509_CERT_DIR).")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context()
    env_file = os.environ.get("SSL_CERT_FILE")
    env_dir = os.environ.get("X509_CERT_DIR")
    for cafile_, capath_ in ((env_file, None), (None, env_dir), (cafile, None), (None, capath)):
        if cafile_ and os.path.isfile(cafile_):
            context.load_verify_locations(cafile=cafile_)
        elif cafile_:
            raise PicasError("CA file %r does not exist" % cafile_)
        if capath_ and os.path.isdir(capath_):
            context.load_verify_locations(capath=capath_)
        elif capath_:
            raise PicasError("CA directory %r does not exist" % capath_)
    return context


class Server(object):
    """A CouchDB server, reached over persistent keep-alive HTTP(S) connections.

    ``url`` is the server's base URL (``https://host:6984``); credentials may
    be given as ``username``/``password`` or inside the URL, and are removed
    from it either way: they never appear in reprs, log lines or exceptions.

    ``timeout`` is the socket timeout of one request in seconds; ``retries``
    how often a request that is safe to repeat is tried again after a
    connection error, a timeout, HTTP 429 or 5xx, with exponential back-off
    and jitter; ``verify`` switches TLS certificate checks (only ever switch
    them off explicitly); ``cafile``/``capath`` add CAs.

    Each thread gets its own connection, opened on first use and reused for
    every request after that; a connection the server or a proxy closed is
    reopened transparently. :meth:`close` (or leaving ``with Server(...) as
    server:``) closes them all; a thread's connection is also closed when the
    thread ends, and every one when the Server is dropped, so no socket is
    left open for the garbage collector (no ``ResourceWarning``).
    """

    def __init__(self, url="http://localhost:5984", username=None, password=None,
                 timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES, verify=True,
                 cafile=None, capath=None, view_timeout=DEFAULT_VIEW_TIMEOUT):
        scheme, userinfo, host, port, path = _split_url(url if "://" in url else "http://" + url)
        if scheme not in ("http", "https"):
            raise PicasError("server URL %r: only http:// and https:// are supported"
                             % redact_url(url))
        if not host:
            raise PicasError("server URL %r has no host name" % redact_url(url))
        if port is not None and not 0 < port < 65536:
            raise PicasError("server URL %r: the port is not a number from 1 to 65535 "
                             "(a password with special characters must be percent-encoded, "
                             "or given as PICAS_PASSWORD)" % redact_url(url))
        if userinfo is not None and username is None:
            name, _, secret = userinfo.partition(":")
            username, password = unquote(name), unquote(secret)
        path = path.partition("?")[0].partition("#")[0].rstrip("/")
        self._scheme = scheme
        self._host = host
        self._port = port or (443 if scheme == "https" else 80)
        self._prefix = path
        self.url = "%s://%s%s%s" % (scheme, "[%s]" % host if ":" in host else host,
                                    ":%d" % port if port else "", path)
        self.username = username
        self.timeout = timeout
        self.view_timeout = max(view_timeout, timeout)
        self.retries = retries
        self._auth = self._secret = None
        if username is not None:
            pair = ("%s:%s" % (username, password or "")).encode("utf-8")
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
            self._secret = password or None   # only to keep it out of task environments
            if scheme == "http" and self._host not in _LOOPBACK_HOSTS:
                log.warning("sending the password for %s over plain http:// to %s: "
                            "anyone on the network path can read it; use https://",
                            username, self._host)
        self._ssl = _ssl_context(verify, cafile, capath) if scheme == "https" else None
        self._local = threading.local()
        self._closers = weakref.WeakSet()    # one per open connection, of every thread
        #: Requests sent and answers received, for benchmarks and tests.
        self.request_count = 0

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.url)

    # -- connections --------------------------------------------------------

    def _connection(self):
        import http.client
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid != os.getpid():
            conn = None          # inherited over fork(): never share a socket
        if conn is None:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self.timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port,
                                                  timeout=self.timeout)
            self._local.conn = conn
            # Dropped with this thread's locals (the thread ended, or the
            # Server was dropped), the closer closes the connection.
            self._local.closer = _Closer(conn)
            self._closers.add(self._local.closer)
            self._local.pid = os.getpid()
            self._local.used = False
        return conn

    def _drop_connection(self):
        closer = getattr(self._local, "closer", None)
        self._local.conn = self._local.closer = None
        if closer is not None:
            closer.close()

    def close(self):
        """Close the connections of every thread (a later request opens a new one)."""
        for closer in list(self._closers):
            closer.close()
        self._drop_connection()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- requests -----------------------------------------------------------

    def request(self, method, path, params=None, body=None, headers=None,
                retry=None, timeout=None, raw=False):
        """Send one request and return ``(status, headers, decoded JSON body)``.

        ``path`` is relative to the server URL and already quoted. ``body`` is
        JSON-encoded unless it is bytes. With ``raw=True`` the body is returned
        as bytes instead of being decoded.

        ``retry`` says whether the request is safe to repeat (default: GET and
        HEAD only). Such requests are retried on connection errors, timeouts,
        429 and 5xx. Every request is retried once, at once, when a reused
        keep-alive connection turns out to be closed before anything was sent.
        A repeated write whose first attempt did reach the server may answer
        409; that :class:`Conflict` has ``ambiguous`` set so the caller can
        check whether the write it sees is its own.

        Raises :class:`HTTPError` subclasses for error statuses,
        :class:`ServerUnreachable` when retries are exhausted, and
        :class:`BadResponse` for bodies that are not JSON.
        """
        import http.client
        if retry is None:
            retry = method in ("GET", "HEAD")
        url_path = self._prefix + path
        if params:
            url_path += "?" + _encode_params(params)
        send_headers = {"Accept": "application/json"}
        if self._auth:
            send_headers["Authorization"] = self._auth
        data = None
        if body is not None:
            if isinstance(body, bytes):
                data = body
            else:
                data = _dumps(body)
                send_headers["Content-Type"] = "application/json"
        if headers:
            send_headers.update(headers)
        if timeout is None:
            timeout = self.timeout
        attempts = 1 + (self.retries if retry else 0)
        maybe_applied = False
        last = None
        for attempt in range(attempts):
            if attempt:
                self._sleep_before_retry(attempt, last)
            self._local.maybe_applied = False
            try:
                status, resp_headers, payload = self._send(
                    method, url_path, data, send_headers, timeout)
                maybe_applied = maybe_applied or self._local.maybe_applied
            except (OSError, http.client.HTTPException) as exc:
                # After the request went out we cannot know whether the server
                # applied it; a repeat of a write may then meet its own result.
                # (_send may have sent it on a reused connection before the
                # resend on a fresh one failed unsent.)
                maybe_applied = (maybe_applied or self._local.maybe_applied
                                 or not isinstance(exc, _NotSent))
                last = exc.__cause__ if isinstance(exc, _NotSent) else exc
                log.debug("%s %s%s failed (attempt %d of %d): %r", method, self.url,
                          path, attempt + 1, attempts, last)
                if _cert_failure(last):
                    attempts = attempt + 1     # a certificate fails its check again and again
                    break
                continue
            if status in _RETRY_STATUSES and retry:
                last = self._http_error(status, payload, method, path)
                last.retry_after = resp_headers.get("Retry-After")
                maybe_applied = maybe_applied or status != 429
                log.debug("%s %s%s answered %d (attempt %d of %d)", method, self.url,
                          path, status, attempt + 1, attempts)
                continue
            if status >= 400:
                err = self._http_error(status, payload, method, path)
                err.ambiguous = maybe_applied and method not in ("GET", "HEAD")
                raise err
            # Whether an earlier attempt of this request may have been applied:
            # per-document results of a repeated _bulk_docs need checking then.
            self._local.repeated = maybe_applied and method not in ("GET", "HEAD")
            if raw or method == "HEAD":
                return status, resp_headers, payload
            return status, resp_headers, self._decode(payload, method, path)
        if isinstance(last, HTTPError):
            raise ServerUnreachable(
                "%s %s%s: the server kept failing (%d attempts); last answer: HTTP %d %s. "
                "Check the server's health, then try again."
                % (method, self.url, path, attempts, last.status, last.error or ""),
                url=self.url + path, cause=last)
        raise ServerUnreachable(
            "%s %s%s: cannot reach the server (%d attempts); last error: %s. Check the "
            "URL, the network and that CouchDB is running."
            % (method, self.url, path, attempts, _describe_socket_error(last)),
            url=self.url + path, cause=last)

    def _send(self, method, url_path, data, headers, timeout):
        """Send one attempt over this thread's connection.

        A reused keep-alive connection that turns out to be closed (the server
        or a proxy dropped it while idle) is replaced by a fresh one and the
        request sent again at once. Errors raised before the request was sent
        come wrapped in :class:`_NotSent`.
        """
        import http.client
        for fresh in (False, True):
            conn = self._connection()
            stale_possible = self._local.used and not fresh
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, url_path, body=data, headers=headers)
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if stale_possible:
                    continue
                raise _NotSent(exc)
            try:
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as exc:
                self._drop_connection()
                if stale_possible:
                    self._local.maybe_applied = True
                    log.debug("reconnecting after %r on a reused connection", exc)
                    continue
                raise
            except BaseException:
                self._drop_connection()
                raise
            self.request_count += 1
            self._local.used = True
            if resp.will_close:
                self._drop_connection()
            return resp.status, resp.headers, payload

    def _sleep_before_retry(self, attempt, last):
        delay = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * (2 ** (attempt - 1)))
        delay = random.uniform(delay / 2.0, delay)
        retry_after = getattr(last, "retry_after", None)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), RETRY_MAX_DELAY))
            except ValueError:
                pass
        time.sleep(delay)

    @staticmethod
    def _decode(payload, method, path):
        try:
            return json.loads(payload.decode("utf-8")) if payload else None
        except ValueError:
            snippet = payload[:80].decode("utf-8", "replace")
            raise BadResponse("%s %s: the server answered with something that is not "
                              "JSON (%r...): is this URL really a CouchDB server?"
                              % (method, path, snippet))

    @staticmethod
    def _http_error(status, payload, method, path):
        error = reason = None
        try:
            info = json.loads(payload.decode("utf-8"))
            if isinstance(info, dict):
                error, reason = info.get("error"), info.get("reason")
        except (ValueError, UnicodeDecodeError):
            reason = payload[:200].decode("utf-8", "replace") or None
        return _error_class(status)(status, error, reason, method, path)

    # -- server operations --------------------------------------------------

    def info(self):
        """Return the server's welcome document (``GET /``)."""
        return self.request("GET", "/")[2]

    def database(self, name):
        """Return a :class:`Database` for ``name`` (no request is made)."""
        return Database(self, name)

    __getitem__ = database

    def create_database(self, name, n=None, q=None):
        """Create database ``name`` and return it; raise PreconditionFailed if it exists.

        ``n``/``q`` set the number of copies and shards on a CouchDB cluster:
        ``n=1`` makes compare-and-set strict again (see the README).
        """
        params = {"n": n, "q": q}
        try:
            self.request("PUT", "/" + quote(name, safe=""), params=params, retry=True)
        except PreconditionFailed as exc:
            if not exc.ambiguous:
                raise
        return Database(self, name)

    def ensure_database(self, name, n=None, q=None):
        """Return database ``name``, creating it when it does not exist."""
        try:
            return self.create_database(name, n=n, q=q)
        except PreconditionFailed:
            return Database(self, name)

    def delete_database(self, name):
        """Delete database ``name`` and every document in it."""
        self.request("DELETE", "/" + quote(name, safe=""))

    def all_databases(self):
        return self.request("GET", "/_all_dbs")[2]


class _Closer(object):
    """Closes one connection: when asked, or when it is dropped itself."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn):
        self.conn = conn

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass

    __del__ = close


class _NotSent(OSError):
    """Wraps an error raised while sending: the server cannot have applied it."""

    def __init__(self, cause):
        OSError.__init__(self, str(cause))
        self.__cause__ = cause


def _cert_failure(exc):
    """True when ``exc`` is a failed TLS certificate check, which no retry can fix."""
    import ssl
    cert_errors = (getattr(ssl, "SSLCertVerificationError", ssl.CertificateError),
                   ssl.CertificateError)
    return isinstance(exc, cert_errors) or "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _describe_socket_error(exc):
    import http.client
    import socket
    if isinstance(exc, socket.gaierror):
        return "host name not found (%s)" % exc.strerror
    if _cert_failure(exc):
        return ("TLS certificate verification failed (%s); give the server's CA "
                "with cafile/capath, SSL_CERT_FILE or X509_CERT_DIR" % exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port?)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, OSError) and exc.errno is not None:
        return "%s (%s)" % (os.strerror(exc.errno), errno.errorcode.get(exc.errno, exc.errno))
    return repr(exc)


class Database(object):
    """One CouchDB database: documents, bulk writes, views and attachments.

    Documents are plain dicts; ``save`` writes the new ``_id`` and ``_rev``
    back into them, as python-couchdb did.
    """

    def __init__(self, server, name):
        self.server = server
        self.name = name
        self._path = "/" + quote(name, safe="")
        self._copies = None

    def __repr__(self):
        return "%s(%r, %r)" % (type(self).__name__, self.server.url, self.name)

    def _doc_path(self, doc_id):
        return "%s/%s" % (self._path, _quote_id(doc_id))

    def request(self, method, path="", **kwargs):
        """Send a request relative to the database; see :meth:`Server.request`."""
        return self.server.request(method, self._path + path, **kwargs)

    # -- the database itself ------------------------------------------------

    def info(self):
        """Return the database's info document (doc_count, update_seq, ...)."""
        return self.request("GET")[2]

    def exists(self):
        try:
            self.request("HEAD")
            return True
        except NotFound:
            return False

    # -- documents ----------------------------------------------------------

    def get(self, doc_id, default=None, **params):
        """Return document ``doc_id`` as a dict, or ``default`` when it does not exist.

        ``params`` go to CouchDB (``conflicts=True``, ``rev=...``, ``attachments=True``).
        A missing *database* raises :class:`NotFound` rather than returning the default.
        """
        try:
            return self.request("GET", "/" + _quote_id(doc_id), params=params)[2]
        except NotFound:
            # CouchDB answers 404 for a missing database and a missing document
            # alike (only the reason text differs, which we never trust).
            if not self.exists():
                raise NotFound(404, "not_found", "database %r does not exist" % self.name,
                               "GET", self._doc_path(doc_id))
            return default

    def copies(self):
        """How many copies of each document the server keeps (CouchDB's ``n``; 1 elsewhere)."""
        if self._copies is None:
            cluster = self.info().get("cluster") or {}
            self._copies = int(cluster.get("n") or 1)
        return self._copies

    def live_leaves(self, doc_id):
        """The current revisions ("leaves") of a document that are not deleted.

        One, unless concurrent writes through different cluster nodes left
        conflicting revisions. Read from every copy (``r`` = the database's
        number of copies) so that a leaf only some copies hold so far is seen
        too. On a cluster that is missing nodes CouchDB answers from the copies
        it has: only trust this once a write was answered 201 (:meth:`probe`).
        """
        try:
            found = self.request("GET", "/" + _quote_id(doc_id),
                                 params={"open_revs": "all", "r": self.copies()})[2]
        except NotFound:
            return []
        return [item["ok"] for item in found or []
                if isinstance(item, dict) and isinstance(item.get("ok"), dict)
                and not item["ok"].get("_deleted")]

    def probe(self, note=None):
        """Write a small local document and return the status: 201 when writes reach their quorum.

        A CouchDB cluster answers 202 while it is missing the nodes its write
        quorum needs. The document is ``_local/picas-pilot-<id>`` (``note``'s
        ``pilot_id``): local documents appear in no view, are never
        replicated, and tell ``status`` which token a pilot holds an
        uncertain lock on.
        """
        body = dict(note or {}, time=_now())
        path = "/" + _quote_id("_local/picas-pilot-" + str(body.get("pilot_id") or "probe"))
        for _ in range(10):
            try:
                return self.request("PUT", path, body=body, retry=True)[0]
            except Conflict:
                # CouchDB overwrites a local document without its _rev, others want it
                # (and a retried write whose first attempt landed moved it on).
                try:
                    body["_rev"] = (self.request("GET", path)[2] or {}).get("_rev")
                except NotFound:
                    body.pop("_rev", None)
        # Transient for the callers (they wait as for an outage), never fatal.
        raise ServerUnreachable("PUT %s%s: the probe write keeps meeting conflicts; trying "
                                "again later" % (self._path, path), url=self.server.url)

    def pilot_notes(self):
        """The notes pilots left with :meth:`probe` (uncertain locks), or [] where unsupported."""
        try:
            rows = self.request("GET", "/_local_docs", params={
                "include_docs": True, "startkey": "_local/picas-pilot-",
                "endkey": "_local/picas-pilot-\ufff0"})[2].get("rows", [])
        except HTTPError:
            return []
        return [row["doc"] for row in rows if isinstance(row.get("doc"), dict)]

    def __getitem__(self, doc_id):
        doc = self.get(doc_id)
        if doc is None:
            raise NotFound(404, "not_found", "missing", "GET", self._doc_path(doc_id))
        return doc

    def __contains__(self, doc_id):
        try:
            self.request("HEAD", "/" + _quote_id(doc_id))
            return True
        except NotFound:
            return False

    def save(self, doc, **params):
        """Create or update ``doc`` and return ``(id, rev)``; both are written back into it.

        A document without ``_id`` gets a random one (never a POST: a lost
        answer could then create the document twice). A document with a
        ``_rev`` is a compare-and-set: :class:`Conflict` means someone else
        changed it first. When a retried save meets a conflict and finds
        exactly what it wrote, the save is taken as done.
        """
        if "_id" not in doc:
            doc["_id"] = new_id()
        lease = _active.get("lease")
        if lease is not None and lease.guards(self, doc):
            # The token a pilot is running: never in the middle of its heartbeat.
            with lease.lock:
                status, _, result = self._put_doc(doc, params)
        else:
            status, _, result = self._put_doc(doc, params)
        doc["_rev"] = result["rev"]
        return doc["_id"], doc["_rev"]

    def _put_doc(self, doc, params=None):
        """PUT ``doc``; return (status, headers, result); resolve ambiguous 409s."""
        try:
            return self.request("PUT", "/" + _quote_id(doc["_id"]), body=doc,
                                params=params, retry=True)
        except Conflict as exc:
            if exc.ambiguous:
                current = self.get(doc["_id"])
                if current is not None and _same_content(current, doc):
                    log.debug("save of %s: the retried write had landed", doc["_id"])
                    return 201, {}, {"ok": True, "id": doc["_id"], "rev": current["_rev"]}
            raise

    def delete(self, doc):
        """Delete ``doc`` (a dict with ``_id`` and ``_rev``); Conflict if it changed."""
        if not doc.get("_rev"):
            raise PicasError("delete(%r): the document has no _rev; read it first" % doc.get("_id"))
        try:
            self.request("DELETE", "/" + _quote_id(doc["_id"]),
                         params={"rev": doc["_rev"]}, retry=True)
        except (Conflict, NotFound) as exc:
            # A retried delete whose first attempt landed: the document is gone.
            if not (exc.ambiguous and self.get(doc["_id"]) is None):
                raise

    def update(self, docs, **options):
        """Write many documents in one ``_bulk_docs`` request.

        Returns one result per document, in order: ``(ok, id, rev_or_error)``
        where ``rev_or_error`` is the new revision on success, else an
        :class:`HTTPError` naming what went wrong (``conflict``, ``forbidden``...).
        Successful revisions are written back into the documents. Documents
        without ``_id`` get a random one first, so a repeated request cannot
        create duplicates; when a repeated request meets conflicts, documents
        found stored exactly as sent count as written. With
        ``new_edits=False`` (replication-style writes) CouchDB's own answer
        is returned.
        """
        return self._bulk(docs, **options)[1]

    def _bulk(self, docs, **options):
        """:meth:`update`, also returning ``(status, results, unsure)``.

        ``status`` is the HTTP status: a CouchDB cluster answers 202 instead of
        201 when some write reached fewer copies than its quorum (the
        per-document results say so with ``"accepted": true``). ``unsure`` holds
        the ids of writes whose quorum is not known: accepted (202) ones, and
        those found landed by an earlier attempt whose answer was lost.
        """
        docs = list(docs)
        for doc in docs:
            if "_id" not in doc:
                doc["_id"] = new_id()
        body = dict(options)
        body["docs"] = docs
        try:
            status, _, results = self.request("POST", "/_bulk_docs", body=body, retry=True)
        except HTTPError as exc:
            if exc.status == 413:
                raise PicasError("_bulk_docs: the request (%d documents) is larger than the "
                                 "server accepts; write fewer documents at once" % len(docs))
            raise
        if options.get("new_edits", True) is False:
            return status, results, set()
        if not isinstance(results, list) or len(results) != len(docs):
            raise BadResponse("POST %s/_bulk_docs: %d documents sent, but the server answered "
                              "with %s results" % (self._path, len(docs), len(results)
                                                   if isinstance(results, list) else "no"))
        landed = {}
        if getattr(self.server._local, "repeated", False):
            # An attempt whose answer was lost may have written some documents:
            # a conflict on exactly what we sent is our own write.
            ids = [d["_id"] for d, r in zip(docs, results) if r.get("error") == "conflict"]
            if ids:
                rows = self.all_docs(keys=ids, include_docs=True)["rows"]
                landed = dict((row["id"], row["doc"]) for row in rows if row.get("doc"))
        out = []
        recovered, accepted = set(), set()
        for doc, result in zip(docs, results):
            stored = landed.get(doc["_id"])
            if "error" in result and stored is not None and _same_content(stored, doc):
                log.debug("bulk write of %s: the repeated write had landed", doc["_id"])
                result = {"id": doc["_id"], "rev": stored["_rev"]}
                recovered.add(doc["_id"])
            if "error" in result:
                status = {"conflict": 409, "forbidden": 403, "unauthorized": 401,
                          "not_found": 404}.get(result["error"], 400)
                out.append((False, doc["_id"],
                            _error_class(status)(status, result.get("error"), result.get("reason"),
                                                 "POST", self._path + "/_bulk_docs")))
            else:
                doc["_rev"] = result["rev"]
                out.append((True, doc["_id"], result["rev"]))
                if result.get("accepted"):
                    accepted.add(doc["_id"])
        if status == 202 and not accepted:
            # A 202 that does not say which writes missed their quorum: any may have.
            accepted = set(doc_id for ok, doc_id, _ in out if ok)
        return status, out, recovered | accepted

    def all_docs(self, **params):
        """Query ``_all_docs``; returns CouchDB's result dict (``rows``, ``total_rows``)."""
        return self._query("/_all_docs", params)

    # -- views --------------------------------------------------------------

    def view(self, name, _retry=None, _timeout=None, **params):
        """Query view ``"Design/view"`` and return CouchDB's result dict.

        Parameters are CouchDB's: ``key``, ``startkey``, ``endkey`` and
        ``keys`` are JSON-encoded for you; ``include_docs``, ``limit``,
        ``reduce``, ``group``, ``descending``... pass through. ``keys`` is
        sent in a POST body, so it may be long. ``_retry`` and ``_timeout``
        are the request's (see :meth:`Server.request`), not CouchDB's.
        """
        design, _, view = name.partition("/")
        if not view:
            raise PicasError("view name %r: expected 'Design/view', e.g. 'Monitor/todo'" % name)
        path = "/_design/%s/_view/%s" % (quote(design, safe=""), quote(view, safe=""))
        try:
            return self._query(path, params, _retry, _timeout)
        except NotFound as exc:
            if _retry is False:
                raise                    # a quick read: no second request to explain it
            if not self.exists():
                raise NotFound(404, "not_found", "database %r does not exist" % self.name,
                               exc.method, exc.path)
            raise NotFound(404, exc.error, "view %s not found in database %r: create the "
                           "views first (python picas.py views)" % (name, self.name),
                           exc.method, exc.path)

    def _query(self, path, params, retry=None, timeout=None):
        timeout = timeout or self.server.view_timeout
        if "keys" in params:
            params = dict(params)
            body = {"keys": params.pop("keys")}
            result = self.request("POST", path, params=params, body=body,
                                  retry=True if retry is None else retry, timeout=timeout)[2]
        else:
            result = self.request("GET", path, params=params, retry=retry, timeout=timeout)[2]
        return ViewResult(result)

    def iterview(self, name, batch=1000, **params):
        """Yield every row of a view, ``batch`` rows per request, paging without ``skip``.

        Each page starts at the key and document id where the last one
        stopped (``startkey`` + ``startkey_docid``), so the cost of a page does
        not grow with its position in the view. Servers that ignore
        ``startkey_docid`` (pouchdb-server) repeat the rows of that key already
        yielded; those are recognised by id and dropped. Rows added or removed
        while paging may or may not be seen, as with any paging.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        params = dict(params)
        limit = params.pop("limit", None)
        if "keys" in params:
            raise ValueError("iterview does not page keys= queries; use view()")
        params["reduce"] = False
        seen = 0
        run = {}                # rows with the key the next page starts at, yielded: id -> count
        while True:
            page = batch if limit is None else min(batch, limit - seen)
            if page <= 0:
                return
            rows = self.view(name, limit=page + 1 + sum(run.values()), **params)["rows"]
            if run:
                # Drop the leading rows already yielded: all of the key's rows on
                # servers that ignore startkey_docid, those of the same id otherwise.
                left, start, drop = dict(run), params["startkey"], 0
                while drop < len(rows) and rows[drop]["key"] == start and \
                        left.get(rows[drop]["id"], 0) > 0:
                    left[rows[drop]["id"]] -= 1
                    drop += 1
                rows = rows[drop:]
            for row in rows[:page]:
                yield row
            seen += len(rows[:page])
            if len(rows) <= page:
                return
            nxt = rows[page]
            if nxt["key"] != params.get("startkey", _NO_KEY):
                run = {}
            for row in rows[:page]:
                if row["key"] == nxt["key"]:
                    run[row["id"]] = run.get(row["id"], 0) + 1
            params["startkey"], params["startkey_docid"] = nxt["key"], nxt["id"]

    # -- design documents ---------------------------------------------------

    def ensure_design(self, name, views, language="javascript"):
        """Create or update ``_design/<name>`` so it holds ``views``.

        ``views`` maps view names to ``{"map": ..., "reduce": ...}``. Views
        already there under other names are kept. The document is written only
        when something changed (a write would make CouchDB rebuild the index).
        Returns True when it was written.
        """
        doc_id = "_design/" + name
        for _ in range(5):
            doc = self.get(doc_id) or {"_id": doc_id}
            merged = dict(doc.get("views", {}))
            merged.update(views)
            if doc.get("views") == merged and doc.get("language", language) == language:
                return False
            doc["views"] = merged
            doc["language"] = language
            try:
                self.save(doc)
                return True
            except Conflict:
                continue
        raise PicasError("design document %s keeps changing under us; try again" % doc_id)

    # -- attachments --------------------------------------------------------

    def put_attachment(self, doc, name, data, content_type="application/octet-stream"):
        """Store attachment ``name`` on ``doc`` (a dict with ``_id``, and ``_rev`` if it exists).

        ``data`` is bytes or str (stored as UTF-8). The document's new
        ``_rev`` is written back into ``doc``.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
            if content_type == "application/octet-stream":
                content_type = "text/plain; charset=utf-8"
        params = {"rev": doc["_rev"]} if doc.get("_rev") else None
        path = "/%s/%s" % (_quote_id(doc["_id"]), quote(name, safe=""))
        try:
            result = self.request("PUT", path, params=params, body=data,
                                  headers={"Content-Type": content_type},
                                  retry=bool(params))[2]
        except Conflict as exc:
            # A repeated upload whose first attempt landed: the attachment is there.
            current = self.get(doc["_id"]) if exc.ambiguous else None
            info = ((current or {}).get("_attachments") or {}).get(name) or {}
            if info.get("length") != len(data):
                raise
            # CouchDB gzips text/* (and JSON, XML, JS) attachments and gives the
            # MD5 of the gzip bytes as their digest: compare the content then.
            if info.get("digest") != _md5_digest(data) and self.request(
                    "GET", path, params={"rev": current["_rev"]}, raw=True)[2] != data:
                raise
            result = {"rev": current["_rev"]}
        doc["_rev"] = result["rev"]
        return result["rev"]

    def get_attachment(self, doc, name, default=None):
        """Return attachment ``name`` of ``doc`` (a dict or an id) as bytes, or ``default``."""
        doc_id = doc if isinstance(doc, str) else doc["_id"]
        path = "/%s/%s" % (_quote_id(doc_id), quote(name, safe=""))
        try:
            return self.request("GET", path, raw=True)[2]
        except NotFound:
            return default


_NO_KEY = object()
_MISSING = object()


class Row(dict):
    """One view row: a dict with ``id``, ``key``, ``value`` and ``doc`` attributes too."""

    id = property(lambda self: self.get("id"))
    key = property(lambda self: self.get("key"))
    value = property(lambda self: self.get("value"))
    doc = property(lambda self: self.get("doc"))


class ViewResult(dict):
    """CouchDB's answer to a view query: the dict, and also iterable over its rows.

    ``result["rows"]`` and ``result["total_rows"]`` work as in the JSON;
    ``for row in result`` and ``len(result)`` go over the rows (each a
    :class:`Row`), as python-couchdb's view results did.
    """

    def __init__(self, data):
        dict.__init__(self, data)
        self["rows"] = [Row(row) for row in self.get("rows", [])]

    rows = property(lambda self: self["rows"])
    total_rows = property(lambda self: self.get("total_rows"))
    offset = property(lambda self: self.get("offset"))

    def __iter__(self):
        return iter(self["rows"])

    def __len__(self):
        return len(self["rows"])


def _database(db):
    """The :class:`Database` behind ``db`` (which may be upstream's ``CouchDB`` wrapper)."""
    return getattr(db, "_picas_database", db)


def new_id():
    """Return a new random document id (32 hex digits)."""
    return os.urandom(16).hex()


def inline_attachment(doc, name, data, content_type="text/plain"):
    """Add attachment ``name`` to ``doc`` in memory; it is stored with the next save."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    doc.setdefault("_attachments", {})[name] = {
        "content_type": content_type,
        "data": base64.b64encode(data).decode("ascii"),
    }


def _md5_digest(data):
    """CouchDB's attachment digest of ``data`` ("md5-" + base64)."""
    import hashlib
    try:
        md5 = hashlib.md5(data)
    except ValueError:          # FIPS mode: no MD5; compare lengths only
        return None
    return "md5-" + base64.b64encode(md5.digest()).decode("ascii")


def _same_content(stored, written):
    """True when ``stored`` (read back) holds exactly what ``written`` wrote."""
    skip = ("_rev", "_attachments", "_revisions", "_conflicts")
    a = dict((k, v) for k, v in stored.items() if k not in skip)
    b = dict((k, v) for k, v in written.items() if k not in skip)
    return json.loads(_dumps(a).decode("utf-8")) == json.loads(_dumps(b).decode("utf-8"))


###############################################################################
# Tokens ######################################################################
###############################################################################
#
# A token is a CouchDB document with ``type: "token"``. Its state is defined
# by the views of the design document ``Monitor`` (see STANDARD_VIEWS):
#
#    claim: write with the _rev seen in todo, answered 201 (a PUT, or in one
#    _bulk_docs request with the pilot's previous result)
#       +------+ ------------------------------------> +--------+
#       | todo |   lock = claim time, pilot_id, claim_id  | locked |  heartbeat = time,
#       +------+ <------------------------------------ +--------+  refreshed while running
#   lock == 0       signal / interrupted pilot: back      |
#   done == 0       to todo, scrub_count unchanged         | result: done = time, exit_code,
#          ^                                               | logs_<id>.out/.err attached
#          |                                               v
#          |   scrub (failed, scrub_count < max_scrub,  +------+  exit_code == 0
#          +----- or `reset`): lock = done = 0, -------- | done |
#                  scrub_count + 1                       +------+
#                                                       | error|  exit_code != 0
#                                                       +------+
#
# Fields: type, lock, done, hostname, scrub_count, input, exit_code, error (a
# list of {time, message, ...}), output, and the batch system's job id
# (dirac_job_id, slurm_job_id, pbs_job_id, htcondor_job_id, cream_job_id,
# wms_job_id). picas.py adds pilot_id (who holds the lock), claim_id (unique
# per claim, so two claims never write identical revisions) and heartbeat
# (unix time, refreshed while the task runs; a token whose heartbeat stops
# moving belongs to a dead pilot).

#: Fields every token has; a token pushed without them gets these values.
TOKEN_DEFAULTS = {"type": "token", "lock": 0, "done": 0, "hostname": "",
                  "scrub_count": 0, "input": "", "exit_code": "", "error": []}

#: The running task's last output, written with each heartbeat (see CommandActor):
#: ``{"out": text, "err": text, "time": unix time}``; gone once the token is finished.
LIVE_LOG_FIELD = "live_log"
#: Fields that describe one claim: removed when a token goes back to todo.
_CLAIM_FIELDS = ("pilot_id", "claim_id", "heartbeat", LIVE_LOG_FIELD)

_VIEW_TEMPLATE = ('function(doc) {\n   if(doc.type == "token") {\n    if(%s) {\n'
                  '      emit(doc._id, doc._id);\n    }\n  }\n}\n')
_STATE_CONDITIONS = [
    ("todo", "doc.lock == 0 && doc.done == 0"),
    ("locked", "doc.lock > 0 && doc.done == 0"),
    ("done", "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) == 0"),
    ("error", "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) != 0"),
]
_OVERVIEW_REDUCE = "function (key, values, rereduce) {\n   return sum(values);\n}\n"


def standard_views(condition=None):
    """Return the standard PiCaS views: todo, locked, done, error, overview_total.

    The map functions are the ones upstream's ``create_views.py`` writes, so
    an existing ``Monitor`` design document stays untouched. ``condition`` is
    an extra JavaScript condition ANDed into every view (``"doc.cores == 1"``).
    """
    extra = " && (%s)" % condition if condition else ""
    views = {}
    lines = []
    for name, cond in _STATE_CONDITIONS:
        views[name] = {"map": _VIEW_TEMPLATE % (cond + extra)}
        lines.append("    if(%s) {\n      emit('%s', 1);\n    }\n" % (cond + extra, name))
    views["overview_total"] = {
        "map": 'function(doc) {\n   if(doc.type == "token") {\n%s  }\n}\n' % "".join(lines),
        "reduce": _OVERVIEW_REDUCE}
    return views


#: A design document of its own (so ``Monitor`` stays as upstream wrote it):
#: tokens with conflicting revisions, as a CouchDB cluster can leave them.
CONFLICTS_DESIGN = "Conflicts"
CONFLICTS_VIEWS = {"conflicts": {"map": (
    'function(doc) {\n  if(doc.type == "token" && doc._conflicts) {\n'
    '    emit(doc._id, doc._conflicts.length);\n  }\n}\n')}}


def _js_number(value):
    """Return ``value`` as JavaScript's ``==`` with a number would see it, or None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return 0
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _parse_int(value):
    """JavaScript's parseInt(), as the views apply it to exit_code; None for NaN."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        text = value.strip()
        digits = ""
        for i, char in enumerate(text):
            if char.isdigit() or (i == 0 and char in "+-"):
                digits += char
            else:
                break
        try:
            return int(digits)
        except ValueError:
            return None
    return None


def _scrub_count(doc):
    """The token's scrub_count as an int: 0 when it is missing or not a number."""
    count = _parse_int(doc.get("scrub_count"))
    return count if count is not None and count > 0 else 0


def token_state(doc):
    """Return the state the standard views give ``doc``: 'todo', 'locked', 'done', 'error' or None."""
    if not isinstance(doc, dict) or doc.get("type") != "token":
        return None
    lock, done = _js_number(doc.get("lock")), _js_number(doc.get("done"))
    if lock is None or done is None:
        return None
    if lock == 0 and done == 0:
        return "todo"
    if lock > 0 and done == 0:
        return "locked"
    if lock > 0 and done > 0:
        return "done" if _parse_int(doc.get("exit_code")) == 0 else "error"
    return None


def _now():
    return int(time.time())


def _hostname():
    """This machine's name; ``$PICAS_HOSTNAME`` overrides it (containers that make one up)."""
    import socket
    return os.environ.get("PICAS_HOSTNAME") or socket.gethostname()


def job_ids(environ=None):
    """Return the batch system job ids found in the environment, as token fields.

    DIRAC, gLite WMS, CREAM, PBS/Torque, SLURM (array jobs as
    ``JOBID_TASKID``) and HTCondor (``ClusterId.ProcId`` from the job ad).
    """
    env = os.environ if environ is None else environ
    ids = {}
    if env.get("DIRACJOBID"):
        ids["dirac_job_id"] = env["DIRACJOBID"]
    if env.get("GLITE_WMS_JOBID", "").startswith("http"):
        ids["wms_job_id"] = env["GLITE_WMS_JOBID"]
    if env.get("CREAM_JOBID"):
        ids["cream_job_id"] = env["CREAM_JOBID"]
    if env.get("PBS_JOBID"):
        ids["pbs_job_id"] = env["PBS_JOBID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        ids["slurm_job_id"] = "%s_%s" % (env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"])
    elif env.get("SLURM_JOB_ID"):
        ids["slurm_job_id"] = env["SLURM_JOB_ID"]
    condor = _htcondor_job_id(env.get("_CONDOR_JOB_AD"))
    if condor:
        ids["htcondor_job_id"] = condor
    return ids


_JOB_ID_FIELDS = ("dirac_job_id", "wms_job_id", "cream_job_id", "pbs_job_id",
                  "slurm_job_id", "htcondor_job_id")


def _htcondor_job_id(ad_path):
    """Read ``ClusterId.ProcId`` from an HTCondor job ad file, or None."""
    if not ad_path:
        return None
    fields = {}
    try:
        with open(ad_path) as fh:
            for line in fh:
                name, sep, value = line.partition("=")
                if sep and name.strip() in ("ClusterId", "ProcId"):
                    fields[name.strip()] = value.strip().strip('"')
    except (OSError, UnicodeDecodeError):
        return None
    if "ClusterId" in fields:
        return "%s.%s" % (fields["ClusterId"], fields.get("ProcId", "0"))
    return None


class Document(dict):
    """A CouchDB document: a dict with ``id``/``rev`` and attachment helpers.

    Upstream picas' Document wrapped a dict in ``.doc``/``.value``; both
    still work and return the document itself.
    """

    def __init__(self, data=None, base=None):
        dict.__init__(self, json.loads(json.dumps(base)) if base else {})
        if data:
            self.update(data)

    @property
    def id(self):
        try:
            return self["_id"]
        except KeyError:
            raise AttributeError("document has no _id yet")

    @id.setter
    def id(self, value):
        self["_id"] = value

    @property
    def rev(self):
        try:
            return self["_rev"]
        except KeyError:
            raise AttributeError("document has no _rev: it was never saved")

    @property
    def value(self):
        return self

    doc = value

    def put_attachment(self, name, data, mimetype=None):
        """Attach ``data`` (bytes or str) under ``name``; stored with the next save."""
        if mimetype is None:
            import mimetypes
            mimetype = mimetypes.guess_type(name)[0] or "text/plain"
        inline_attachment(self, name, data, mimetype)

    def get_attachment(self, name, retrieve_from_database=None):
        """Return ``{"content_type": ..., "data": bytes}`` for attachment ``name``.

        An attachment that is only a stub here is read from
        ``retrieve_from_database`` (a Database) when given.
        """
        info = dict(self.get("_attachments", {})[name])
        if "data" in info:
            info["data"] = base64.b64decode(info["data"])
        elif retrieve_from_database is not None:
            db = _database(getattr(retrieve_from_database, "db", retrieve_from_database))
            # Database's own method: bytes, even on the python-couchdb-style
            # database of CouchDB.db, whose get_attachment gives a file object.
            info["data"] = Database.get_attachment(db, self, name)
        return info

    def remove_attachment(self, name):
        del self.get("_attachments", {})[name]


class Task(Document):
    """A token, with the life-cycle methods of upstream picas' ``Task``.

    A new Task has every standard field and ``type: "token"`` (upstream used
    ``"task"``, which no standard view shows).
    """

    def __init__(self, task=None):
        # A stored document (with _rev) is taken as it is; a new one gets the defaults.
        base = None if task and "_rev" in task else dict(TOKEN_DEFAULTS, output={}, uploads={})
        Document.__init__(self, task, base)
        if "_id" not in self:
            self["_id"] = "task_" + new_id()

    def lock(self):
        self["lock"] = _now()
        self["hostname"] = _hostname()
        self.update(job_ids())
        return self

    def done(self):
        self["done"] = _now()
        return self

    def scrub(self):
        """Send the token back to todo: lock = done = 0, scrub_count + 1."""
        self["scrub_count"] = _scrub_count(self) + 1
        self["lock"] = self["done"] = 0
        for field in _JOB_ID_FIELDS + _CLAIM_FIELDS:
            self.pop(field, None)
        return self

    def error(self, msg=None, exception=None):
        """Record an error: an entry in ``error`` and a state the error view shows.

        Upstream set lock = done = 99, which the views did not always show as
        an error; here lock and done stay times and a zero or missing
        exit_code becomes 1.
        """
        entry = {"time": _now(), "message": msg or (repr(exception) if exception else "error")}
        if exception is not None:
            import traceback
            entry["exception"] = "".join(traceback.format_exception(
                type(exception), exception, exception.__traceback__))
        errors = self.get("error")
        if not isinstance(errors, list):
            errors = [] if errors in (None, "") else [errors]
        errors.append(entry)
        self["error"] = errors
        now = _now()
        if not _js_number(self.get("lock")):
            self["lock"] = now
        if not _js_number(self.get("done")):
            self["done"] = now
        if _parse_int(self.get("exit_code")) in (0, None):
            self["exit_code"] = 1
        return self

    def has_error(self):
        return token_state(self) == "error"

    def get_errors(self):
        return self.get("error") or []

    def is_done(self):
        return bool(_js_number(self.get("done")))

    @property
    def input(self):
        return self.get("input")

    @input.setter
    def input(self, value):
        self["input"] = value

    @property
    def output(self):
        return self.get("output")

    @output.setter
    def output(self, value):
        self["output"] = value

    @property
    def uploads(self):
        return self.get("uploads")


###############################################################################
# Modifiers ###################################################################
###############################################################################

class BasicTokenModifier(object):
    """Change a token's state in memory (save it afterwards), as upstream did.

    Works on any dict. ``scrub`` also resets ``done`` (upstream's did not, so
    a scrubbed finished token never came back).
    """

    def __init__(self, timeout=86400):
        self.timeout = timeout

    def lock(self, token):
        token["hostname"] = _hostname()
        token["lock"] = _now()
        token.update(job_ids())
        return token

    def unlock(self, token):
        token["hostname"] = _hostname()
        token["lock"] = 0
        for field in _JOB_ID_FIELDS + _CLAIM_FIELDS:
            token.pop(field, None)
        return token

    def close(self, token):
        token["done"] = _now()
        return token

    def unclose(self, token):
        token["done"] = 0
        for field in _JOB_ID_FIELDS:
            token.pop(field, None)
        return token

    def add_output(self, token, output):
        token.update(output)
        return token

    def scrub(self, token):
        token["scrub_count"] = _scrub_count(token) + 1
        self.unlock(token)
        token["done"] = 0
        return token

    def set_error(self, token, msg=None):
        Task.error(token, msg or "set_error")
        return token


###############################################################################
# Claiming and iterators ######################################################
###############################################################################

def new_pilot_id():
    """Return a pilot id: host, process id and a random part (unique per pilot)."""
    return "%s:%d:%s" % (_hostname(), os.getpid(), new_id()[:8])


class ClaimStats(object):
    """Counts of one claimer's work, for logs and benchmarks."""

    def __init__(self):
        self.claims = 0          # tokens claimed (lock write answered 201)
        self.conflicts = 0       # lock writes answered 409: someone was faster
        self.accepted = 0        # lock writes answered 202: not a claim (cluster)
        self.skipped = 0         # view rows that were not claimable tokens
        self.view_reads = 0

    def __repr__(self):
        return "ClaimStats(%s)" % ", ".join("%s=%d" % kv for kv in sorted(vars(self).items()))


def _lock_body(doc, pilot_id, lock_fields):
    """The locked token to write: unique to this pilot and this claim."""
    token = Task(doc)
    token.lock()
    token["pilot_id"] = pilot_id
    token["claim_id"] = new_id()
    token["heartbeat"] = token["lock"]
    token.update(lock_fields)
    return token


class _Claimer(object):
    """Claims todo tokens from one view with a compare-and-set per claim.

    A view read (``include_docs``) returns a window of candidates at a random
    position in the view, so that many pilots starting together spread over
    the tokens. Each candidate is checked (``lock == 0 and done == 0`` on the
    returned document: a view row can be older than its document) and locked
    with a PUT carrying the revision that was seen in todo. A 409 means
    another pilot was faster: try another candidate after a short, jittered
    pause. One view read serves several claims while it is fresh.

    Only a 201 answer is a claim. A lock whose outcome is not known -- its
    answer was lost, or it was answered 202 (on a CouchDB cluster: fewer
    copies than the quorum took it, so another pilot may hold the token) --
    is this claimer's one *unsure* lock: nothing else is locked until it is
    resolved, and it is resolved only once a probe write is answered 201 (the
    cluster is whole again, so a read of every copy tells the truth): when
    this claim's revision is the token's only live leaf the token is ours,
    otherwise it is left alone (``reset --stale`` repairs it). While the probe
    is answered 202, :class:`Degraded` is raised: the pilot backs off.

    A finished token's result can carry the next lock in the same
    ``_bulk_docs`` request (:meth:`save_and_claim`), but only with a
    candidate already in memory: saving a result never waits for a view read.
    So when a claim takes the window's last candidate, the next window is
    read right then, before the task runs (:meth:`_read_ahead`).

    Window reads ask first for the index as it stands (``update=lazy``):
    CouchDB then answers at once instead of first taking every write since
    the last read into the index, the wait that queued concurrent pilots
    behind each other. A row of such a read may be stale either way. A row
    whose token was claimed since is passed over by the todo check above; a
    token written since may be missing, so a lazy read that finds nothing is
    followed by an up-to-date read, and only an up-to-date read finds the
    view empty.
    """

    #: Rows fetched per view read.
    window = 16
    #: Rows of the first read, made before the size of the view is known: pilots
    #: starting together pick at random among these.
    first_window = 64
    #: Seconds each request of a read made ahead, while a claimed token waits,
    #: may take: a far window's two requests stay well within STOP_BUDGET (and a
    #: stop between them drops the second), so that a stop during the read still
    #: gives the token back.
    read_ahead_timeout = 1.5
    #: View parameters that shape the returned documents: with any of them, far
    #: windows too are read with ``include_docs`` (``_all_docs`` would drop them).
    _DOC_PARAMS = ("conflicts", "attachments", "att_encoding_info", "att_encoding")
    #: Seconds a view read is used for more claims.
    window_age = 10.0
    #: The largest random ``skip`` used to spread pilots (skip costs grow with it).
    max_skip = 1000
    #: Seconds an empty view read is trusted: a claim right after it returns None.
    empty_memory = 1.0
    #: Pages in a row holding only tokens this pilot avoids (see RunActor._avoids)
    #: after which a read counts as finding nothing.
    max_avoided_pages = 8

    def __init__(self, db, view, design_doc="Monitor", pilot_id=None, **view_params):
        self.db = _database(db)
        self.view_name = view if "/" in view else "%s/%s" % (design_doc, view)
        self.view_params = view_params
        self.pilot_id = pilot_id or new_pilot_id()
        self.stats = ClaimStats()
        self.stop = None            # callable: true when claiming must stop now
        self.lock_fields = {}       # written with every lock (heartbeat_interval)
        self.avoid = None           # callable: true for a todo token this pilot leaves alone
        self.unsure = None          # the one lock body whose outcome is not known yet
        self._candidates = []
        self._fetched = 0.0
        self._total = None          # rows in the view at the last read
        self._warned = set()        # ids of non-tokens already warned about
        self._rows = {}             # id -> view row of the current window
        self._skipped_to = 0        # the random skip of the last window read
        self._misses = 0            # lock writes that lost since the last window read
        self._empty_at = -1e9       # when the view was last found empty (monotonic)
        self._held = None           # a token claimed with the last result, not yet handed out
        self._avoided = 0           # todo rows of the last page the avoid check passed over
        self._told_avoided = False  # the log said once why avoided tokens were passed over
        self.lazy = True            # reads may ask for the index as it stands (update=lazy)
        self._fresh_next = True     # the next read is up to date: the first one, and after
                                    # a read that found nothing

    def claim(self):
        """Claim one token and return it as a :class:`Task`, or None when the view is empty.

        Raises :class:`Degraded` while a cluster answers writes with 202, and
        :class:`ServerUnreachable` through an outage; the unsure lock, if any,
        is kept for the next call.
        """
        held, self._held = self._held, None
        if held is not None:
            return self._read_ahead(held)
        if self.unsure is not None:
            token = self.resolve_unsure()
            if token is not None:
                return token
        while True:
            doc = self._next_candidate()
            if doc is None:
                return None
            token = self._lock(doc)
            if token is not None:
                return self._read_ahead(token)
            self._missed()

    def _read_ahead(self, token):
        """Hand out ``token``; first, if it was the window's last candidate, read the next window.

        Then the result of ``token`` can carry the next lock. Only a quick
        lazy read (``read_ahead_timeout``, no retries), made while ``token``
        waits as the held token, so that a stop during the read gives it
        back. A read that fails or finds nothing leaves the next claim to
        read after the task (up to date when this one found nothing).
        """
        if self._candidates or not self.lazy:
            return token
        self._held = token               # parked first: whatever happens now, a stop finds it
        try:
            if not self._stopping(ahead=1):
                found = self._read_window(lazy=True, timeout=self.read_ahead_timeout)
                self._fresh_next = not found
                if found:
                    self._misses = 0
        except PicasError as exc:
            log.debug("reading %s ahead failed (%s); the next claim reads it again",
                      self.view_name, exc)
        held, self._held = self._held, None
        return held

    def _stopping(self, ahead=0):
        """True when claiming must stop (``ahead``: tokens about to be finished first)."""
        if self.stop is None:
            return False
        try:
            return bool(self.stop(ahead))
        except TypeError:                # a stop callable of one's own, without the argument
            return bool(self.stop())

    def save_and_claim(self, doc):
        """Save ``doc`` (a finished token), with the next lock in the same request if one is ready.

        The lock rides along only when a candidate is already in memory and
        no lock is unsure: the save never waits for, or fails with, a view
        read. Both writes of the ``_bulk_docs`` POST are compare-and-sets on
        their own revisions. A lock answered 201 is kept for the next
        :meth:`claim`; one whose quorum is not known becomes the unsure lock.
        ``doc`` gets its new ``_rev``; a conflict or refusal of ``doc`` is
        raised as with :meth:`Database.save`, after the lock's outcome was
        recorded.
        """
        if token_state(doc) == "todo":
            self.forget_empty()          # it goes back to the view (a scrub): look again
        candidate = None
        if self._held is None and self.unsure is None and not self._stopping():
            while self._candidates and candidate is None:
                candidate = self._candidates.pop(random.randrange(len(self._candidates)))
                candidate = candidate if self._claimable(candidate) else None
        if candidate is None:
            self.db.save(doc)
            return
        body = self.unsure = self._lock_body(candidate)   # until the answer tells
        status, results, unsure = self.db._bulk([doc, body])
        (saved, _, saved_or_error), (locked, _, lock_or_error) = results
        if locked and body["_id"] not in unsure:
            self.unsure = None
            self._held = self._locked(body)
        elif locked:
            log.info("lock of %s sent with a result: quorum not known (HTTP %d); resolved "
                     "before the next claim", body["_id"], status)
        elif isinstance(lock_or_error, Conflict):
            self.unsure = None
            self.stats.conflicts += 1
            self._misses += 1
        else:
            self.unsure = None
            self.stats.skipped += 1          # deleted since the view was read, or refused
        if not saved:
            raise saved_or_error

    def _next_candidate(self):
        """The next todo document to try to lock (reading windows as needed), or None."""
        if self._stopping():
            return None
        now = time.monotonic()
        if not self._candidates or self._misses >= 3 or now - self._fetched > self.window_age:
            if not self._candidates and now - self._empty_at < self.empty_memory:
                return None              # just looked: nothing there
            if not self._fill():
                return None
        return self._candidates.pop(random.randrange(len(self._candidates)))

    def _fill(self):
        """Read candidates into the window; False when an up-to-date read found none.

        A lazy read at a random position may miss tokens the index has not
        taken in yet, and the few left before that position: then an
        up-to-date read from the start of the view decides. After the view
        was found empty, reads are up to date until candidates turn up again
        (an idle pilot makes one request per look); so is a claimer's first
        read (the index may not have been built yet).
        """
        lazy = self.lazy and not self._fresh_next
        if not self._read_window(lazy=lazy) and not (
                (lazy or self._skipped_to) and self._read_window(at_start=True)):
            self._empty_at = time.monotonic()
            self._fresh_next = True
            return False
        self._fresh_next = False
        self._misses = 0
        return True

    def prime(self):
        """Read the first window now (``run`` does, so that a missing view fails before anything).

        An empty view is not remembered: the journal replay that comes before
        the first claim may put tokens back in todo.
        """
        self._fill()
        self.forget_empty()

    def _missed(self):
        """Another pilot was faster: back off a little (more after repeated misses)."""
        self._misses += 1
        if self._misses > 1:
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** self._misses)))

    def forget_empty(self):
        """Look at the view again on the next claim, even if it was empty a moment ago."""
        self._empty_at = -1e9

    def _read_window(self, at_start=False, lazy=False, timeout=None):
        """Read a window of claimable candidates; False when the view has none.

        Rows whose document is not a todo token (the view lags behind the
        documents, or a custom view holds other documents) are passed over,
        paging on through the view until claimable ones turn up or it ends.
        A ``lazy`` read is one page of the index as it stands (see the class
        documentation); with a ``timeout`` it is not retried.
        """
        params = dict(self.view_params, include_docs=True, reduce=False)
        limit = int(params.pop("limit", 0) or 0) or (
            self.first_window if self._total is None else self.window)
        skip = 0
        if not at_start and self._total and self._total > limit:
            skip = random.randint(0, min(self._total - limit, self.max_skip))
        self._skipped_to = skip
        if lazy:
            params["update"] = "lazy"
        passed_over = 0                  # pages of tokens this pilot avoids, and nothing else
        avoided = 0
        while True:
            try:
                result = self._view_rows(params, limit, skip, timeout)
            except BadRequest as exc:
                if not lazy or "update" not in str(exc.reason or ""):
                    raise
                self.lazy = False        # a server without update=lazy
                log.info("%s refuses update=lazy (%s): every view read waits for the index",
                         self.db.server.url, exc)
                return False
            rows = result.get("rows", [])
            if skip or "startkey_docid" not in params:
                self._total = result.get("total_rows")
            self._avoided = 0
            self._candidates = [row["doc"] for row in rows if self._claimable(row.get("doc"))]
            self._rows = dict((row["id"], row) for row in rows)
            passed_over = passed_over + 1 if rows and self._avoided == len(rows) else 0
            avoided += self._avoided
            if self._candidates or len(rows) < limit or passed_over >= self.max_avoided_pages \
                    or lazy:
                break
            params["startkey"], params["startkey_docid"] = rows[-1]["key"], rows[-1]["id"]
            skip = 1
        self._fetched = time.monotonic()
        if avoided and not self._candidates and not self._told_avoided:
            self._told_avoided = True
            log.warning("passed over %d todo tokens in %s that this pilot leaves to others: "
                        "they failed on this host before (failed_hosts; `picas.py reset todo` "
                        "clears it), came back here with a retry exit code, or do not fit "
                        "in the time left (%s)", avoided, self.view_name, RUNTIME_HINT_FIELD)
        return bool(self._candidates)

    #: From this ``skip`` on, a window is read as ids first, then their documents.
    far_skip = 32

    def _view_rows(self, params, limit, skip, timeout):
        """One page of the view, each row with its document (``doc``; None when deleted).

        CouchDB skips rows after loading their documents: with
        ``include_docs`` a ``skip`` of 1,000 costs about 25 times a read from
        the start (measured on 3.4.3, docs/performance.md). So a far window
        is read as ids alone, and their documents then in one ``_all_docs``
        request: two requests, both cheap.
        """
        retry = False if timeout else None
        far = skip >= self.far_skip and not any(params.get(name) for name in self._DOC_PARAMS)
        result = self.db.view(self.view_name, limit=limit, skip=skip or None, _retry=retry,
                              _timeout=timeout, **dict(params, include_docs=not far))
        self.stats.view_reads += 1
        rows = result.get("rows", []) if far else []
        if rows and timeout and self._stopping():
            rows[:] = []                 # a read ahead, and a stop came: no second request
        if rows:
            docs = self.db._query("/_all_docs", {"keys": [row["id"] for row in rows],
                                                 "include_docs": True}, retry, timeout)
            by_id = dict((row.get("key"), row.get("doc")) for row in docs.get("rows", []))
            for row in rows:
                row["doc"] = by_id.get(row["id"])
        return result

    def _claimable(self, doc):
        if token_state(doc) == "todo":
            if self.avoid is not None and self.avoid(doc):
                self.stats.skipped += 1
                self._avoided += 1
                return False
            problems = find_unstorable(doc)
            if not problems:
                return True
            self._refuse(doc, problems)
        self.stats.skipped += 1
        if isinstance(doc, dict) and doc.get("type") != "token" and doc.get("_id") not in self._warned:
            self._warned.add(doc.get("_id"))
            log.warning("view %s holds %r, which is not a token (no type: \"token\"); "
                        "passed over", self.view_name, doc.get("_id"))
        return False

    def _refuse(self, doc, problems):
        """A todo token holding values CouchDB cannot store: put it in error, never run it."""
        message = ("this token cannot be run: %s. Fix the token (CouchDB itself refuses such "
                   "values) and reset it" % "; ".join(problems))
        log.error("token %s: %s", doc.get("_id"), message)
        body = Task(doc)
        body.lock()
        body.error(message)
        body["pilot_id"], body["claim_id"] = self.pilot_id, new_id()
        try:
            self.db.save(body)
        except PicasError as exc:
            log.error("token %s could not be put in error (%s); it is passed over",
                      doc.get("_id"), exc)

    def _lock_body(self, doc):
        return _lock_body(doc, self.pilot_id, self.lock_fields)

    def _lock(self, doc):
        if not self._claimable(doc):
            return None
        token = self.unsure = self._lock_body(doc)     # until the answer tells
        try:
            status, _, result = self.db.request(
                "PUT", "/" + _quote_id(token["_id"]), body=token, retry=True)
        except Conflict as exc:
            if exc.ambiguous:
                return self.resolve_unsure()    # the answer to a first attempt was lost
            self.unsure = None
            self.stats.conflicts += 1
            return None
        except NotFound:
            self.unsure = None
            self.stats.skipped += 1          # deleted since the view was read
            return None
        token["_rev"] = result["rev"]
        if status == 201:
            self.unsure = None
            return self._locked(token)
        log.info("lock of %s answered %d, not 201: not a claim unless the cluster, once "
                 "whole, shows it is the only revision", token["_id"], status)
        return self.resolve_unsure()

    def _locked(self, token):
        """The lock write of ``token`` (its new ``_rev`` set) won: hand it out."""
        self.stats.claims += 1
        row = self._rows.get(token["_id"]) or {}
        token.view_key, token.view_value = row.get("key"), row.get("value")
        return token

    def resolve_unsure(self):
        """Settle the unsure lock: return its token when it is ours, else None.

        First a probe write: while it is answered 202 the cluster is missing
        nodes, a read cannot see every copy, and :class:`Degraded` is raised
        with the lock still unsure. Once it is answered 201, the lock counts
        only when this claim's revision is the token's only live leaf: then no
        other pilot can hold it. Otherwise the token is left alone, never
        written to (``reset --stale`` repairs a token nobody runs).
        """
        body = self.unsure
        if body is None:
            return None
        note = {"pilot_id": self.pilot_id, "uncertain": body["_id"], "claim_id": body["claim_id"]}
        status = self.db.probe(note)
        if status != 201:
            raise Degraded("writes are answered %d, not 201: the cluster is missing nodes; the "
                           "lock of %s stays unsure until it is whole again" % (status, body["_id"]))
        leaves = self.db.live_leaves(body["_id"])
        self.unsure = None
        ours = [leaf for leaf in leaves if leaf.get("claim_id") == body["claim_id"]]
        token = None
        if len(leaves) == 1 and ours:
            body["_rev"] = ours[0]["_rev"]
            token = self._locked(body)          # as good as a 201: nobody else holds it
            log.info("token %s: the unsure lock was ours", body["_id"])
        elif ours:
            self.stats.accepted += 1
            log.warning("token %s: this pilot's lock landed next to another revision (a "
                        "cluster split): not a claim; `reset --stale` will repair it",
                        body["_id"])
        else:
            self.stats.conflicts += 1
        try:
            self.db.probe({"pilot_id": self.pilot_id, "uncertain": None})
        except PicasError:
            pass                                # only a note for `status`
        return token

    def give_back_held(self):
        """The token claimed ahead with the last result, or the unsure lock found ours, if any.

        The caller must give it back. An unsure lock that cannot be settled
        now (the cluster is degraded or away) is left with a message.
        """
        held, self._held = self._held, None
        if held is not None or self.unsure is None:
            return held
        token_id = self.unsure["_id"]
        try:
            return self.resolve_unsure()
        except PicasError as exc:
            log.warning("token %s: the lock this pilot wrote is unsure (%s); it stays locked "
                        "until `picas.py reset locked --stale` frees it", token_id, exc)
            return None


class _ContractDatabase(object):
    """A database object with only upstream picas' contract, as the claim and the pilot use it.

    Upstream's iterators and actor need nothing but ``get_single_from_view(view,
    window_size=..., **params)`` (a random one of the first ``window_size``
    rows' documents; ``IndexError`` when the view is empty), ``get(id)`` and
    ``save(doc)``: test doubles (upstream's own ``MockDB``) and users'
    wrappers offer just that. This gives the pilot those three, with a
    missing document as None and a 409 of any kind as :class:`Conflict`.
    Everything else a :class:`Database` does (``include_docs`` windows,
    ``_bulk_docs``, revision leaves, the journal) is not available.
    """

    def __init__(self, db):
        self.raw = db
        self.name = str(getattr(db, "name", None) or type(db).__name__)

    def __repr__(self):
        return "_ContractDatabase(%r)" % (self.raw,)

    def get_single_from_view(self, view, window_size, **params):
        return self.raw.get_single_from_view(view, window_size=window_size, **params)

    def get(self, doc_id, default=None):
        try:
            doc = self.raw.get(doc_id)
        except Exception as exc:
            # KeyError (dicts, upstream's MockDB), ValueError (upstream's
            # CouchDB.get), a 404 of python-couchdb or ours.
            if isinstance(exc, (KeyError, ValueError)) or _is_status(exc, 404, "ResourceNotFound"):
                return default
            raise
        return default if doc is None else dict(getattr(doc, "value", doc))

    def save(self, doc):
        """Save ``doc`` as a :class:`Document` (upstream's ``save`` reads ``doc.id``).

        The new ``_id`` and ``_rev`` are written back into ``doc``.
        """
        target = doc if isinstance(doc, Document) else Document(doc)
        try:
            self.raw.save(target)
        except Exception as exc:
            if _is_status(exc, 409, "ResourceConflict") and not isinstance(exc, Conflict):
                raise Conflict(409, "conflict", str(exc) or None, "PUT", doc.get("_id"))
            raise
        if target is not doc:
            for field in ("_id", "_rev"):
                if field in target:
                    doc[field] = target[field]
        return doc.get("_id"), doc.get("_rev")


def _is_status(exc, status, name):
    """True when ``exc`` is HTTP error ``status``: ours, python-couchdb's (``name``), or any
    with a ``status`` attribute."""
    return (isinstance(exc, HTTPError) and exc.status == status) or type(exc).__name__ == name \
        or getattr(exc, "status", None) == status


def _store(db):
    """What the claim and the pilot talk to: the :class:`Database` behind ``db`` (the
    fast, strict path), or, for any other object, a :class:`_ContractDatabase` around it."""
    found = _database(db)
    if isinstance(found, (Database, _ContractDatabase)):
        return found
    return _ContractDatabase(found)


class _ContractClaimer(object):
    """Claims through upstream's database contract (see :class:`_ContractDatabase`).

    As safe as that contract allows: the document ``get_single_from_view``
    returns (upstream's client reads it fresh) must still be unclaimed
    (``lock == 0 and done == 0``, missing fields counting as 0: upstream did
    not look), and it is locked by saving it with its ``_rev`` and a unique
    ``claim_id``. On CouchDB that save is a compare-and-set, and a conflict
    means another pilot won: the claimer backs off and draws again. What the
    contract cannot show is whether the write reached a cluster's quorum
    (201 or 202): the strict path of :class:`_Claimer` needs a
    :class:`Database` for that. Nothing is ever locked ahead or unsure.
    """

    #: Rows get_single_from_view draws from (upstream's window_size).
    window = 100
    #: Candidates in a row that were taken or lost before the view counts as empty for now.
    max_misses = 10

    def __init__(self, db, view, design_doc="Monitor", pilot_id=None, **view_params):
        self.db = _store(db)
        design, _, name = view.rpartition("/")
        self.view, self.design_doc = name, design or design_doc
        self.view_params = dict(view_params)
        self.window = int(self.view_params.pop("limit", 0) or 0) or self.window
        self.pilot_id = pilot_id or new_pilot_id()
        self.stats = ClaimStats()
        self.stop = None            # callable: true when claiming must stop now
        self.lock_fields = {}       # written with every lock (heartbeat_interval)
        self.unsure = self._held = None

    def claim(self):
        """Claim one token and return it as a :class:`Task`, or None when the view is empty."""
        misses = 0
        while not (self.stop is not None and self.stop()):
            try:
                doc = self.db.get_single_from_view(self.view, self.window,
                                                   design_doc=self.design_doc, **self.view_params)
            except IndexError:
                return None
            self.stats.view_reads += 1
            doc = dict(getattr(doc, "value", doc))
            if _js_number(doc.get("lock", 0)) == 0 and _js_number(doc.get("done", 0)) == 0:
                token = _lock_body(doc, self.pilot_id, self.lock_fields)
                try:
                    self.db.save(token)
                except Conflict:
                    self.stats.conflicts += 1
                else:
                    self.stats.claims += 1
                    token.view_key = token.view_value = None
                    return token
            else:
                self.stats.skipped += 1          # taken since the view row was written
            misses += 1
            if misses >= self.max_misses:
                log.warning("view %s/%s: %d tokens in a row were taken by others; no claim "
                            "for now", self.design_doc, self.view, misses)
                return None
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** misses)))
        return None

    def forget_empty(self):
        """Nothing to forget: every claim asks the view again."""

    def give_back_held(self):
        return None


def _claimer(db, view, design_doc, pilot_id, **view_params):
    """The claimer for ``db``: the strict one for a :class:`Database`, else the contract one."""
    if isinstance(_database(db), Database):
        return _Claimer(db, view, design_doc, pilot_id, **view_params)
    return _ContractClaimer(db, view, design_doc, pilot_id, **view_params)


class ViewIterator(object):
    """Base of the token iterators: ``stop()``, ``is_stopped()``, ``reset()``."""

    def __init__(self):
        self._stop = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop:
            raise StopIteration
        task = self.claim_task()
        if task is None:
            raise StopIteration
        return task

    next = __next__

    def claim_task(self):
        raise NotImplementedError

    def stop(self):
        self._stop = True

    def is_stopped(self):
        return self._stop

    def reset(self):
        self._stop = False


class TaskViewIterator(ViewIterator):
    """Yield locked tokens (:class:`Task`) from view ``view`` until it is empty.

    ``view`` is a view name in ``design_doc`` (default ``Monitor``) or a full
    ``"Design/view"``; other keyword arguments are view parameters. Every
    yielded token was claimed by this iterator's pilot (see :class:`_Claimer`).
    """

    def __init__(self, database, view="todo", design_doc="Monitor", pilot_id=None, **view_params):
        ViewIterator.__init__(self)
        self.database = database
        self.view = view
        self._claimer = _claimer(database, view, design_doc, pilot_id, **view_params)

    @property
    def pilot_id(self):
        return self._claimer.pilot_id

    @property
    def stats(self):
        return self._claimer.stats

    def _configure(self, stop_check, lock_fields, avoid=None):
        self._claimer.stop = stop_check
        self._claimer.lock_fields = lock_fields
        self._claimer.avoid = avoid

    def claim_task(self):
        return self._claimer.claim()

    def reset(self):
        ViewIterator.reset(self)
        self._claimer.forget_empty()

    def _ahead(self):
        """The claimer that may claim the next token with a result save (strict path only)."""
        return self._claimer if isinstance(self._claimer, _Claimer) else None

    def _claimers(self):
        return [self._claimer]

    def prime(self):
        """Read the first window now: a missing database or view fails here, before any claim."""
        if isinstance(self._claimer, _Claimer):
            self._claimer.prime()

    def reconnect(self, database):
        self.database = database
        self._claimer.db = _store(database)


class PrioritizedViewIterator(ViewIterator):
    """Claim from ``high_priority_view`` first, and from ``low_priority_view`` when it is empty."""

    def __init__(self, database, high_priority_view, low_priority_view, design_doc="Monitor",
                 pilot_id=None, **view_params):
        ViewIterator.__init__(self)
        self.database = database
        pilot_id = pilot_id or new_pilot_id()
        self._high = _claimer(database, high_priority_view, design_doc, pilot_id, **view_params)
        self._low = _claimer(database, low_priority_view, design_doc, pilot_id, **view_params)

    @property
    def pilot_id(self):
        return self._high.pilot_id

    @property
    def stats(self):
        merged = ClaimStats()
        for claimer in (self._high, self._low):
            for name, value in vars(claimer.stats).items():
                setattr(merged, name, getattr(merged, name) + value)
        return merged

    def _configure(self, stop_check, lock_fields, avoid=None):
        for claimer in (self._high, self._low):
            claimer.stop = stop_check
            claimer.lock_fields = lock_fields
            claimer.avoid = avoid

    def claim_task(self):
        for claimer in (self._high, self._low):      # at most one unsure lock, in either
            if claimer.unsure is not None:
                token = claimer.resolve_unsure()
                if token is not None:
                    return token
        return self._high.claim() or self._low.claim()

    def _claimers(self):
        return [self._high, self._low]

    def reset(self):
        ViewIterator.reset(self)
        for claimer in (self._high, self._low):
            claimer.forget_empty()

    def reconnect(self, database):
        self.database = database
        self._high.db = self._low.db = _store(database)


class EndlessViewIterator(ViewIterator):
    """Wrap another iterator and wait for new work instead of stopping when it is empty.

    The wait starts at ``sleep_sec`` and doubles (with jitter) up to
    ``max_sleep_sec``; it is reset once work turns up. Iteration stops when
    ``stop()`` is called or ``stop_callback(**stop_callback_args)`` is true.
    """

    def __init__(self, view_iterator, sleep_sec=10, stop_callback=None, max_sleep_sec=60,
                 **stop_callback_args):
        ViewIterator.__init__(self)
        self.iterator = view_iterator
        self.sleep_sec = sleep_sec
        self.max_sleep_sec = max(max_sleep_sec, sleep_sec)
        self.stop_callback = stop_callback
        self.stop_callback_args = stop_callback_args
        self._extra_stop = None

    @property
    def database(self):
        return self.iterator.database

    @property
    def pilot_id(self):
        return self.iterator.pilot_id

    @property
    def stats(self):
        return self.iterator.stats

    def _configure(self, stop_check, lock_fields, avoid=None):
        self._extra_stop = stop_check
        self.iterator._configure(stop_check, lock_fields, avoid)

    def _stopping(self):
        if self._stop or (self._extra_stop is not None and self._extra_stop()):
            return True
        return bool(self.stop_callback is not None and
                    self.stop_callback(**self.stop_callback_args))

    def claim_task(self):
        """The next claimed token; waits through empty views, outages and degraded clusters."""
        delay = self.sleep_sec
        while not self._stopping():
            try:
                task = self.iterator.claim_task()
            except (ServerUnreachable, ServerError, Degraded) as exc:
                log.warning("cannot claim now (%s); trying again in about %.0f s", exc, delay)
            else:
                if task is not None:
                    return task
                self.iterator.reset()
                log.debug("no work in the view; checking again in %.0f s", delay)
            deadline = time.monotonic() + random.uniform(0.75 * delay, delay)
            while time.monotonic() < deadline and not self._stopping():
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            delay = min(self.max_sleep_sec, delay * 2)
        return None

    def _claimers(self):
        return self.iterator._claimers() if hasattr(self.iterator, "_claimers") else []

    def _ahead(self):
        inner = getattr(self.iterator, "_ahead", None)
        return inner() if inner else None

    def prime(self):
        if hasattr(self.iterator, "prime"):
            self.iterator.prime()

    def reconnect(self, database):
        self.iterator.reconnect(database)


###############################################################################
# Running tasks: process groups, timeouts, logs ###############################
###############################################################################

#: Seconds between SIGTERM and SIGKILL when a task is stopped (below SLURM's
#: default KillWait of 30 s, so the pilot still has time to save the token).
DEFAULT_GRACE = 10.0
#: Bytes of each log kept in the token: the head and the tail, with a marker.
DEFAULT_LOG_LIMIT = 1024 * 1024


class TaskTimeout(BaseException):
    """Raised inside ``process_task`` when ``max_token_time`` has passed.

    A BaseException, so that ``except Exception`` in user code cannot swallow it.
    """


class PilotInterrupted(BaseException):
    """Raised inside ``process_task`` when the pilot received a stop signal."""

    def __init__(self, signum):
        BaseException.__init__(self, "interrupted by signal %d" % signum)
        self.signum = signum


_WATCHDOG_CODE = """
import os, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGXCPU", "SIGALRM"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    try:
        (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    except ValueError:
        pass
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
# Tasks carry PICAS_WATCHDOG=<this pilot's mark> in their environment: also
# the one started in the instant before it was registered, and descendants
# that left its process group.
mark = ("PICAS_WATCHDOG=" + sys.argv[1]).encode()
try:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
except OSError:
    pids = []
for pid in pids:
    try:
        with open("/proc/%d/environ" % pid, "rb") as fh:
            if mark in fh.read().split(b"\\0"):
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


class _Watchdog(object):
    """A tiny helper process that kills the pilot's task process groups when the pilot dies.

    The pilot tells it, over a pipe, which process groups are running. When
    the pipe closes -- the pilot exited, or was killed with SIGKILL, which no
    handler can catch -- it kills every group still registered, and every
    process whose environment holds this pilot's ``PICAS_WATCHDOG`` mark
    (a task started in the instant before it was registered, or a
    grandchild that left the task's process group). So no task outlives its
    pilot, grandchildren included.
    """

    _instance = None
    _pid = None
    _reaped_at_exit = False
    mark = None         # PICAS_WATCHDOG in the environment of this pilot's tasks

    @classmethod
    def get(cls):
        if cls._instance is None or cls._pid != os.getpid():
            cls._instance, cls._pid = None, os.getpid()
            cls.mark = new_id()
            import subprocess
            if not cls._reaped_at_exit:
                import atexit
                atexit.register(cls.reap)
                cls._reaped_at_exit = True
            if sys.executable and hasattr(os, "killpg"):
                try:
                    # Only what starting Python needs: never the password.
                    env = dict((k, v) for k, v in os.environ.items()
                               if k in ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE"))
                    cls._instance = subprocess.Popen(
                        [sys.executable, "-I", "-S", "-c", _WATCHDOG_CODE, cls.mark],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, close_fds=True, env=env,
                        # Its own session: a batch system killing the pilot's
                        # process group must not take the watchdog with it.
                        start_new_session=True)
                except OSError as exc:
                    log.warning("could not start the task watchdog (%s): tasks may outlive "
                                "a killed pilot", exc)
        return cls._instance

    @classmethod
    def reap(cls):
        """At exit: close the pipe, so the watchdog does its last round, and wait for it.

        Its last round is what it would do anyway when this process ends;
        waiting for it leaves no ``subprocess N is still running`` warning.
        """
        proc = cls._instance
        if proc is None or cls._pid != os.getpid():
            return                       # none, or the parent's (inherited over fork)
        cls._instance = None
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except Exception as exc:         # it goes on alone; tasks are still covered
            log.debug("task watchdog did not finish at exit: %r", exc)

    @classmethod
    def tell(cls, line):
        proc = cls.get()
        if proc is None:
            return
        try:
            proc.stdin.write(line.encode("ascii"))
            proc.stdin.flush()
        except (OSError, ValueError):
            pass


def _signal_exit_code(returncode):
    """Map Popen's returncode (negative for signals) to the shell's convention, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _exited(proc):
    """True when the process ``proc`` has exited, whether or not it was waited for yet."""
    if proc is None:
        return False
    if proc.returncode is not None:
        return True
    try:        # WNOWAIT: look, but leave the exit status for proc.wait()
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True                   # reaped by the wait() this signal interrupted
    except (AttributeError, OSError):
        return False


def _group_alive(pgid):
    """True while a process of group ``pgid`` runs (zombies, waiting to be reaped, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True                       # no /proc (not Linux): trust killpg
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
    return False


def _stop_group(proc, grace):
    """SIGTERM the task's whole process group; SIGKILL whatever is left after ``grace`` s."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            log.warning("task process group %d still alive %.0f s after SIGTERM: sending "
                        "SIGKILL", pgid, grace)
    finally:                    # whatever interrupts the wait, nothing of the task survives
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _utf8(text):
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


#: Environment variables that hold the database password: never passed to a task.
SECRET_VARIABLES = ("PICAS_PASSWORD",)
#: Environment variables that may hold a URL with credentials: passed on without them.
URL_VARIABLES = ("PICAS_HOST_URL",)


def task_environment(db=None, environ=None, **extra):
    """The environment a task gets: the pilot's, without credentials, plus ``extra``.

    Variables are removed by name (SECRET_VARIABLES; URL_VARIABLES lose the
    user name and password of their URL), whatever their values are. Keys
    and values are UTF-8 bytes, so that non-ASCII inputs work under any
    locale (Python 3.6 would encode str values as ASCII under LC_ALL=C).
    ``db`` is accepted for symmetry with the pilot (its password is already
    outside every variable this keeps).
    """
    if environ is None:
        environ = getattr(os, "environb", None)
        if environ is None:
            environ = os.environ
    env = {}
    for key, value in environ.items():
        key, value = _utf8(key), _utf8(value)
        name = key.decode("utf-8", "surrogateescape")
        if name in SECRET_VARIABLES:
            continue
        if name in URL_VARIABLES:
            value = _utf8(redact_url(value.decode("utf-8", "surrogateescape")))
        env[key] = value
    for key, value in extra.items():
        env[_utf8(key)] = _utf8(value)
    return env


def run_command(argv, stdout=None, stderr=None, cwd=None, env=None, grace=DEFAULT_GRACE,
                shell=False, on_exit=None):
    """Run ``argv`` in its own process group and return its exit code.

    ``stdout``/``stderr`` are open files (or None to inherit). The task gets
    no stdin. Death by signal N is returned as 128 + N. If anything
    interrupts the wait -- a timeout, a stop signal, an exception -- the whole
    process group, grandchildren included, gets SIGTERM and, after ``grace``
    seconds, SIGKILL, before the exception goes on. Processes the task left
    running in its group when it exits are stopped the same way.
    ``on_exit()`` is called the moment the task has exited (the pilot's
    ``finishing``: a stop signal from then on must not undo its work).
    """
    import subprocess
    _Watchdog.get()                       # started before the task, never in between
    env = task_environment() if env is None else dict(env)
    if any(isinstance(key, bytes) for key in env):
        env[b"PICAS_WATCHDOG"] = _Watchdog.mark.encode("ascii")
        for name in SECRET_VARIABLES:
            env.pop(_utf8(name), None)
    else:
        env["PICAS_WATCHDOG"] = _Watchdog.mark
        for name in SECRET_VARIABLES:
            env.pop(name, None)
    # A stop signal or timeout during Popen() would leave a started task
    # unknown to us: the pilot's handlers hold their exception until we can
    # act on it (see RunActor._interrupt).
    _active["spawning"] = True
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                cwd=cwd, env=env, shell=shell, start_new_session=True,
                                close_fds=True)
    except BaseException:
        _active["spawning"] = False
        pending = _active.pop("pending", None)
        if pending is not None:
            raise pending
        raise
    try:
        try:
            if on_exit is not None:
                _active["proc"] = proc        # see RunActor._interrupt
            _Watchdog.tell("+%d\n" % proc.pid)
            _active["spawning"] = False       # from here on, an interruption stops the group
            pending = _active.pop("pending", None)
            if pending is not None:
                raise pending
            returncode = proc.wait()
            if on_exit is not None:
                on_exit()
        except BaseException:
            _stop_group(proc, grace)
            raise
        if _group_alive(proc.pid):
            log.info("the task left processes running in its process group; stopping them")
            _stop_group(proc, grace)
    finally:
        if on_exit is not None:
            # A stop that came after the task had exited was held: its work is kept.
            _active["proc"] = None
            _active.pop("pending", None)
        if not _group_alive(proc.pid):
            _Watchdog.tell("-%d\n" % proc.pid)     # else the watchdog still guards it
    return _signal_exit_code(returncode)


#: Settings of the pilot that is running now (set by RunActor.run): its grace
#: period, and whether it is an old-API pilot (whose execute() returned 3 values).
_active = {"grace": DEFAULT_GRACE, "old_api": False, "spawning": False, "lease": None}


def execute(args, shell=False, grace=None):
    """Run a command and return ``(proc, returncode, stdout, stderr)``, as upstream did.

    Output is collected through temporary files (no pipe can fill up) and
    returned as bytes. The command runs in its own process group, so a
    timeout or stop signal kills it with everything it started, after the
    running pilot's grace period (or ``grace`` seconds). Inside an old-API
    pilot (``process_token``) it returns ``(returncode, stdout, stderr)``,
    as the old API did.
    """
    import subprocess
    import tempfile
    grace = _active["grace"] if grace is None else grace
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        returncode = run_command(args, stdout=out, stderr=err, shell=shell, grace=grace)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if _active["old_api"]:
        return returncode, stdout, stderr
    return subprocess.CompletedProcess(args, returncode, stdout, stderr), returncode, stdout, stderr


def read_log(path, limit=DEFAULT_LOG_LIMIT):
    """Return the file at ``path`` as bytes, at most ``limit`` of them.

    A longer file keeps its first quarter and last three quarters of the
    limit, with a line in between saying how much was cut.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return b""
    with open(path, "rb") as fh:
        if size <= limit:
            return fh.read()
        head = fh.read(limit // 4)
        fh.seek(size - (limit - limit // 4))
        tail = fh.read()
    marker = ("\n[... picas.py cut %d bytes from the middle of this log ...]\n"
              % (size - len(head) - len(tail))).encode("ascii")
    return head + marker + tail


###############################################################################
# The result journal ##########################################################
###############################################################################
#
# A finished result is written to local disk, and fsynced, before any network
# write; it is removed once the server holds it. A pilot killed in between
# (SIGKILL after its stop signal, a lost node, a server that never came back)
# leaves the entry behind; the next pilot in the same directory, or
# ``picas.py replay DIR`` on the machine the files were brought back to, saves
# it. A replay never runs anything and never overwrites a newer result.

#: Where results wait for the server: ``$PICAS_JOURNAL``, else this folder of
#: the working directory.
DEFAULT_JOURNAL = "picas-journal"


class Journal(object):
    """A folder of finished results not yet known to be held by the server.

    One JSON file per result, named after a hash of the token id and the
    claim (any id fits in a file name), written to a temporary name, fsynced
    and renamed, so an entry is either whole or absent. Entries that cannot be
    saved for good (their token was deleted) are set aside as
    ``*.json.deleted``, never removed.
    """

    def __init__(self, directory=None):
        self.directory = os.path.abspath(directory or os.environ.get("PICAS_JOURNAL")
                                         or DEFAULT_JOURNAL)

    def __repr__(self):
        return "Journal(%r)" % self.directory

    def path_for(self, token):
        """The entry's file: a hash of the token id, and the claim (``token`` as claimed)."""
        import hashlib
        digest = hashlib.sha1(_utf8(str(token.get("_id")))).hexdigest()[:16]
        claim = "".join(c for c in str(token.get("claim_id") or "") if c.isalnum())[:12]
        return os.path.join(self.directory, "%s-%s.json" % (digest, claim or "noclaim"))

    def write(self, token, claimed, database, pilot_id):
        """Keep ``token`` (a finished result) durably; return the entry's path, or None.

        Never raises: a full or read-only disk is logged, and the result goes
        on to the server without a local copy.
        """
        entry = {"picas_journal": 1, "written": _now(), "database": database.name,
                 "server": database.server.url, "pilot_id": pilot_id,
                 "claim_id": claimed.get("claim_id"), "result": token,
                 "claimed": dict((k, v) for k, v in claimed.items() if k != "_attachments")}
        path = self.path_for(claimed)      # the claim names it: a scrubbed result has none
        tmp = "%s.%s.tmp" % (path, new_id()[:8])
        try:
            data = _dumps(entry)
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(self.directory)
            return path
        except (OSError, PicasError) as exc:
            _remove(tmp)
            log.warning("token %s: could not keep the result in the journal %s (%s); it goes "
                        "to the server without a local copy", token.get("_id"), self.directory, exc)
            return None

    def remove(self, path):
        if path and _remove(path):
            _fsync_dir(self.directory)

    def set_aside(self, path, why):
        """Keep an entry that can never be saved out of later replays (``.<why>`` appended)."""
        try:
            os.rename(path, "%s.%s" % (path, why))
        except OSError:
            pass

    def entries(self):
        """Paths of the entries waiting, oldest first."""
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(".json")]
        except OSError:
            return []
        paths = [os.path.join(self.directory, n) for n in names]
        return sorted(paths, key=lambda p: (_mtime(p), p))

    def tidy(self):
        """Remove the folder when nothing is left in it (so a working directory stays clean)."""
        try:
            os.rmdir(self.directory)
        except OSError:
            pass


def _remove(path):
    try:
        os.remove(path)
        return True
    except OSError:
        return False


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replay_journal(db, journal, pilot_id=None):
    """Save the results waiting in ``journal`` that belong to ``db``; return counts.

    Each entry is settled as :func:`_settle_result` says: written on top of
    the token while its claim still holds it or ``reset`` freed it since,
    dropped when the token already holds it, kept in the token's ``error``
    list when another claim has the token; nothing newer is ever
    overwritten and nothing is run. Entries stay while the server is away or
    refuses them. Returns a dict with ``saved``, ``already``,
    ``in_error_list``, ``left`` and ``deleted``.
    """
    counts = dict.fromkeys(("saved", "already", "in_error_list", "left", "deleted"), 0)
    for path in journal.entries():
        try:
            with open(path, "rb") as fh:
                entry = json.loads(fh.read().decode("utf-8"))
            result, claimed = entry["result"], entry["claimed"]
            result["_id"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("journal entry %s is not readable (%s); left alone", path, exc)
            counts["left"] += 1
            continue
        if entry.get("database") != db.name:
            counts["left"] += 1
            log.debug("journal entry %s belongs to database %r; left alone", path,
                      entry.get("database"))
            continue
        try:
            outcome = _settle_result(db, result, claimed, entry.get("pilot_id") or pilot_id)
        except (ServerUnreachable, ServerError) as exc:
            log.warning("replaying the journal stopped: %s; %s stays for a later replay",
                        exc, path)
            counts["left"] += 1
            break
        except PicasError as exc:
            log.error("token %s: the server refused the journaled result (%s); %s stays",
                      result["_id"], exc, path)
            counts["left"] += 1
            continue
        counts[outcome] += 1
        if outcome == "deleted":
            journal.set_aside(path, "deleted")
            log.error("token %s was deleted; its journaled result is kept in %s.deleted",
                      result["_id"], path)
        else:
            journal.remove(path)
            log.info("token %s: journaled result %s (%s)", result["_id"], {
                "saved": "saved", "already": "was already there",
                "in_error_list": "kept in the token's error list: another claim had it"}[outcome],
                os.path.basename(path))
    return counts


def _rev_number(doc):
    try:
        return int(str(doc.get("_rev", "0")).split("-", 1)[0])
    except ValueError:
        return 0


def _freed_since(db, current, claimed):
    """True when ``current`` is ``claimed`` sent back to todo by ``reset`` while still locked.

    That is: todo, nobody's claim, the same input, scrubbed once since the
    claim, and the revision just before the scrub still locked by that claim
    (so no result was stored and then reset on purpose, to run it again).
    A parent revision that compaction removed counts as not freed.
    """
    if not (token_state(current) == "todo" and not current.get("claim_id")
            and current.get("input") == claimed.get("input")
            and _scrub_count(current) == _scrub_count(claimed) + 1
            and _rev_number(current) > _rev_number(claimed)):
        return False
    history = (db.get(current["_id"], rev=current["_rev"], revs=True) or {}).get("_revisions")
    if not history or len(history.get("ids") or []) < 2:
        return False
    parent = db.get(current["_id"], rev="%d-%s" % (history["start"] - 1, history["ids"][1]))
    return (parent is not None and token_state(parent) == "locked"
            and parent.get("claim_id") == claimed.get("claim_id"))


def _settle_result(db, result, claimed, pilot_id):
    """Write ``result`` of the claim ``claimed`` where it belongs; return what happened.

    The claim is ``claimed["claim_id"]`` (the result itself may have lost it
    to a scrub). ``saved``: the token was still locked by that claim, or was
    freed by ``reset`` since and run by nobody (then the result is written
    whole, lock and claim included, so the token is in the done or error
    view and the work is not done twice); ``already``: the token holds that
    claim's result, or the result was itself a scrub back to todo and the
    token is in todo; ``in_error_list``: another claim has or finished the
    token, which keeps its state and gets the result in its ``error`` list;
    ``deleted``: the token is gone.
    """
    claim = claimed.get("claim_id")
    for _ in range(10):
        current = db.get(result["_id"])
        if current is None:
            return "deleted"
        state = token_state(current)
        same_claim = claim is not None and current.get("claim_id") == claim
        if same_claim and state in ("done", "error"):
            return "already"
        freed = _freed_since(db, current, claimed)
        if token_state(result) == "todo" and state == "todo" and not current.get("claim_id"):
            return "already"          # a scrub: the token is back in todo either way
        if not (same_claim and state == "locked") and not freed:
            _keep_in_error_list(db, current, result, pilot_id)
            return "in_error_list"
        body = dict(result)
        _reapply(body, claimed, current)
        if freed:
            for field in ("lock", "done", "hostname", "exit_code") + _CLAIM_FIELDS + _JOB_ID_FIELDS:
                if field in result:
                    body[field] = result[field]
        try:
            db.save(body)
            return "saved"
        except Conflict:
            continue
    raise PicasError("token %s keeps changing; try the replay again" % result["_id"])


def _keep_in_error_list(db, current, result, pilot_id):
    """Add ``result`` to the error list of ``current`` (a token another claim has), keeping all else."""
    message = ("pilot %s finished this token (claim %s, exit code %s) after it had been reset "
               "or taken by another pilot; the result is kept here"
               % (pilot_id, result.get("claim_id"), result.get("exit_code")))
    log.error("token %s: %s", current.get("_id"), message)
    entry = {"time": _now(), "message": message, "hostname": _hostname(),
             "result": dict((k, v) for k, v in result.items()
                            if k not in ("_id", "_rev", "_attachments", "error"))}
    for _ in range(10):
        errors = current.get("error")
        current["error"] = (errors if isinstance(errors, list) else
                            [] if errors in (None, "") else [errors]) + [entry]
        try:
            db.save(current)
            return
        except Conflict:
            current = db.get(current["_id"])
            if current is None:
                raise NotFound(404, "not_found", "deleted", "GET", result["_id"])
    raise PicasError("token %s keeps changing; its result stays in the journal" % result["_id"])


def _reapply(task, claimed, current):
    """Rebuild ``task`` as ``current`` plus the changes ``task`` made to ``claimed``.

    Fields this pilot changed or added win (``claimed`` is a deep copy taken
    at the claim, so changes made in place inside nested values count too);
    fields it did not touch keep the other writer's values; new attachments
    are kept next to the other writer's. The result is written into ``task``
    in place, on ``current``'s _rev.
    """
    changes = dict((k, v) for k, v in task.items()
                   if k not in ("_rev", "_attachments") and claimed.get(k, _MISSING) != v)
    if isinstance(changes.get("error"), list) and isinstance(current.get("error"), list):
        # Both added errors (another pilot's result kept here, say): keep them all.
        theirs = current["error"]
        changes["error"] = theirs + [e for e in changes["error"] if e not in theirs]
    removed = [k for k in claimed if k not in task and k not in ("_rev", "_attachments")]
    ours = task.get("_attachments") or {}
    merged = dict(current)
    merged.update(changes)
    for key in removed:
        merged.pop(key, None)
    if LIVE_LOG_FIELD not in task:
        merged.pop(LIVE_LOG_FIELD, None)      # the heartbeat's, not part of the result
    attachments = {}
    for name, info in (current.get("_attachments") or {}).items():
        attachments[name] = {"stub": True, "content_type": info.get("content_type"),
                             "length": info.get("length"), "digest": info.get("digest")}
    attachments.update((name, info) for name, info in ours.items() if not info.get("stub"))
    if attachments:
        merged["_attachments"] = attachments
    task.clear()
    task.update(merged)


def _deep_copy(doc):
    """A copy of a token sharing nothing with it (its attachment stubs included)."""
    try:
        return json.loads(json.dumps(doc))
    except (TypeError, ValueError):
        import copy
        return copy.deepcopy(dict(doc))


###############################################################################
# A pilot's time and health: walltime, learned runtimes, black holes #########
###############################################################################

#: Seconds before the batch system's end of the job when claiming stops (the
#: last result still has to be saved, and the pilot to exit on its own).
WALLTIME_RESERVE = 60.0
#: Seconds one query of the batch system (squeue, scontrol, qstat) may take.
WALLTIME_QUERY_TIMEOUT = 10.0


def _epoch(value):
    """``value`` as a positive number of seconds, or None."""
    try:
        number = float(str(value).strip().strip('"'))
    except (TypeError, ValueError):
        return None
    return number if number > 0 and number == number and number != float("inf") else None


def _clock_seconds(text):
    """Seconds in ``[days-]hours:minutes:seconds`` (or ``minutes:seconds``, or ``minutes``).

    SLURM's time format (``squeue -o %L``) and PBS's walltime (``hh:mm:ss``).
    None for anything else ("UNLIMITED", "NOT_SET", "INVALID", garbage).
    """
    text = (text or "").strip()
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not parts or len(parts) > 3 or not all(p.strip().isdigit() for p in parts):
        return None
    values = [int(p) for p in parts]
    if len(parts) == 1:
        seconds = values[0] * 60             # SLURM: a bare number is minutes
    else:
        while len(values) < 3:
            values.insert(0, 0)
        seconds = values[0] * 3600 + values[1] * 60 + values[2]
    return float(days * 86400 + seconds)


def _query(argv, environ):
    """The standard output of a batch-system command, or None (missing, failing, too slow)."""
    import subprocess
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, env=dict(environ),
                              timeout=WALLTIME_QUERY_TIMEOUT, universal_newlines=True)
    except subprocess.TimeoutExpired:
        log.warning("%s did not answer within %.0f s: walltime not taken from it",
                    argv[0], WALLTIME_QUERY_TIMEOUT)
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.debug("%s: %s", argv[0], exc)
        return None
    return proc.stdout if proc.returncode == 0 else None


def _read_ad(path):
    """An HTCondor ClassAd file as {name: text}, or {}."""
    ad = {}
    try:
        with open(path) as fh:
            for line in fh:
                name, sep, value = line.partition("=")
                if sep:
                    ad[name.strip()] = value.strip()
    except (OSError, UnicodeDecodeError, TypeError):
        pass
    return ad


def _slurm_end(env, now):
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    end = _epoch(env.get("SLURM_JOB_END_TIME"))
    if end:
        return end, "SLURM_JOB_END_TIME of SLURM job %s" % job
    if not job:
        return None
    out = _query(["squeue", "-h", "-j", job, "-o", "%L"], env)
    left = _clock_seconds(out.strip().splitlines()[0]) if out and out.strip() else None
    if left is not None:
        return now + left, "squeue (time left of SLURM job %s)" % job
    out = _query(["scontrol", "show", "job", "-o", job], env)
    for field in (out or "").split():
        name, _, value = field.partition("=")
        if name == "EndTime":
            try:
                # scontrol prints the end in the node's local time.
                return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S")), \
                    "scontrol (EndTime of SLURM job %s)" % job
            except (ValueError, OverflowError):
                return None
    return None


def _pbs_end(env, now):
    job = env.get("PBS_JOBID")
    if not job:
        return None
    out = _query(["qstat", "-f", job], env) or ""
    fields = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            fields[name.strip()] = value.strip()
    left = _epoch(fields.get("Walltime.Remaining"))          # Torque
    if left:
        return now + left, "qstat (Walltime.Remaining of PBS job %s)" % job
    limit = _clock_seconds(fields.get("Resource_List.walltime"))
    used = _clock_seconds(fields.get("resources_used.walltime")) or 0.0
    if limit:
        return now + limit - used, "qstat (walltime limit minus used of PBS job %s)" % job
    limit = _epoch(env.get("PBS_WALLTIME"))                  # Torque sets it in seconds
    if limit:
        return now + limit, "PBS_WALLTIME of PBS job %s (counted from now)" % job
    return None


def _htcondor_end(env, now):
    found = []
    job = _read_ad(env.get("_CONDOR_JOB_AD"))
    started = _epoch(job.get("JobCurrentStartDate")) or _epoch(job.get("JobStartDate")) or now
    seconds = _epoch(job.get("MaxRuntime"))
    if seconds is None and _epoch(job.get("MaxWallTimeMins")):
        seconds = _epoch(job.get("MaxWallTimeMins")) * 60
    if seconds:
        found.append((started + seconds, "the HTCondor job ad (MaxRuntime / MaxWallTimeMins)"))
    machine = _read_ad(env.get("_CONDOR_MACHINE_AD"))
    to_die = _epoch(machine.get("GLIDEIN_ToDie"))
    if to_die:
        found.append((to_die, "the HTCondor machine ad (GLIDEIN_ToDie)"))
    return min(found) if found else None


def detect_walltime(environ=None, now=None):
    """When does this batch job end? Returns ``(end, source)``: a Unix time and where
    it was found, or ``(None, what was looked at)``.

    Looked at, and the earliest end found wins: ``$PICAS_END_TIME`` (a Unix
    time, for any wrapper that knows better, e.g. a DIRAC job given its
    CPUTime); SLURM: ``SLURM_JOB_END_TIME``, else ``squeue -j $SLURM_JOB_ID
    -o %L``, else ``scontrol show job``; PBS/Torque: ``qstat -f $PBS_JOBID``,
    else ``PBS_WALLTIME``; HTCondor: ``MaxRuntime`` or ``MaxWallTimeMins`` in
    the job ad, ``GLIDEIN_ToDie`` in the machine ad. A query tool that is
    missing, fails or takes longer than WALLTIME_QUERY_TIMEOUT seconds is
    passed over: detection never blocks or fails a pilot.
    """
    env = os.environ if environ is None else environ
    now = time.time() if now is None else now
    found = []
    end = _epoch(env.get("PICAS_END_TIME"))
    if end:
        found.append((end, "PICAS_END_TIME"))
    looked = ["PICAS_END_TIME"]
    for name, probe, marker in (("SLURM", _slurm_end, ("SLURM_JOB_ID", "SLURM_JOBID")),
                                ("PBS", _pbs_end, ("PBS_JOBID",)),
                                ("HTCondor", _htcondor_end, ("_CONDOR_JOB_AD",
                                                             "_CONDOR_MACHINE_AD"))):
        if not any(env.get(m) for m in marker):
            continue
        looked.append(name)
        try:
            end = probe(env, now)
        except Exception as exc:             # a strange batch system never stops a pilot
            log.warning("could not read the walltime from %s: %r", name, exc)
            end = None
        if end:
            found.append(end)
    if found:
        return min(found)
    return None, "no time limit found (looked at %s)" % ", ".join(looked)


def walltime_limit(environ=None, reserve=WALLTIME_RESERVE):
    """Seconds from now until claiming should stop (the job's end less ``reserve``), or
    None when no limit was found; says in the log what it found and where."""
    end, source = detect_walltime(environ)
    if end is None:
        log.info("walltime: %s; claiming goes on until the view is empty", source)
        return None
    left = end - time.time()
    log.info("walltime: this job ends at %s UTC (from %s), in %s; claiming stops %.0f s "
             "before", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(end)), source,
             _duration(max(0, left)), reserve)
    return max(0.0, left - reserve)


#: Learned runtimes: a token is claimed only when the time left is at least
#: MARGIN x (the 90th percentile of the known run times) + SLACK seconds.
RUNTIME_MARGIN = 1.25
RUNTIME_SLACK = 2.0
#: How many run times of its own a pilot keeps, and how many finished tokens
#: of the pool it reads (the latest changes) when it starts with a time limit.
RUNTIME_SAMPLES = 50
#: A token may say how long it needs: ``expected_run_seconds`` (a number).
RUNTIME_HINT_FIELD = "expected_run_seconds"


class _Runtimes(object):
    """What this pilot knows about how long tokens take.

    Its own finished runs (a run killed by max_token_time counts as that
    long) come first: once it has three, the pool's are no longer used. The
    pool's are the ``run_seconds`` of the latest successfully finished
    tokens, read once from ``_changes``. Until anything is known,
    :meth:`needed` is None: claim.
    """

    def __init__(self):
        self.own = []
        self.pool = []

    def learn(self, seconds):
        if seconds is not None and seconds >= 0:
            self.own = (self.own + [float(seconds)])[-RUNTIME_SAMPLES:]

    def read_pool(self, db):
        """Read the run times of the pool's latest finished tokens (one request)."""
        try:
            result = db.request("GET", "/_changes", params={
                "descending": True, "limit": RUNTIME_SAMPLES * 4, "include_docs": True},
                retry=True, timeout=DEFAULT_TIMEOUT)[2]
        except PicasError as exc:
            log.debug("could not read the pool's run times: %s", exc)
            return
        samples = []
        for change in (result or {}).get("results", []) if isinstance(result, dict) else []:
            doc = change.get("doc") or {}
            seconds = doc.get("run_seconds")
            if doc.get("type") == "token" and token_state(doc) == "done" and \
                    isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and \
                    0 <= seconds < 1e9:
                samples.append(float(seconds))
        self.pool = samples[:RUNTIME_SAMPLES]

    def samples(self):
        return self.own if len(self.own) >= 3 else self.own + self.pool

    def needed(self, max_token_time=None):
        """Seconds the next token should be given, margin included; None when unknown."""
        samples = sorted(self.samples())
        if not samples:
            return None
        p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
        need = RUNTIME_MARGIN * p90 + RUNTIME_SLACK
        return min(need, max_token_time + RUNTIME_SLACK) if max_token_time else need

    def describe(self):
        own, pool = len(self.own), len(self.pool) if len(self.own) < 3 else 0
        return "%d runs of this pilot%s" % (own, " and %d of the pool" % pool if pool else "")


#: Exit codes of a task that mean "not this token's fault, try again later"
#: (75 is EX_TEMPFAIL): the token goes back to todo without a scrub.
RETRY_EXIT_CODES = (75,)
#: A token sent back that way more often than this goes to error.
MAX_RETRIES = 10
#: A token that was killed by max_token_time, or whose pilot died running it,
#: this many times goes to error as "poison" (it would loop forever).
POISON_AFTER = 3
#: A black hole: this many tasks in a row failing within FAST_FAILURE seconds
#: (or with exit code 126 or 127: not executable, command not found) stop the
#: pilot; its exit status is EXIT_BLACK_HOLE.
BLACK_HOLE = 3
FAST_FAILURE = 10.0


class _HostHealth(object):
    """The black-hole detector: this host's streak of fast failures.

    A failure counts when it was fast (or exit code 126/127) and the token
    had not already failed on another host (then it is the token's fault);
    a success ends the streak. ``record`` returns True when the streak
    reaches ``limit``: the host is broken.
    """

    def __init__(self, limit=BLACK_HOLE, fast=FAST_FAILURE):
        self.limit = limit or 0
        self.fast = fast
        self.streak = []             # (token id, revision saved, scrub_count before) in a row
        self.broken = None           # why this host stopped claiming

    def judge(self, code, seconds, token):
        """True when a failure with exit ``code`` after ``seconds`` blames the host.

        A slow failure of a token that failed nowhere else ends the streak
        (this host ran something for a while). One that failed on another
        host already, or a token already in the streak (one token failing
        again and again proves nothing about the host), leaves it as it is.
        """
        if not self.limit or code in (0, None):
            return False
        if [h for h in _failed_hosts(token) if h != _hostname()] or \
                token.get("_id") in [entry[0] for entry in self.streak]:
            return False
        if code in (126, 127) or (seconds is not None and seconds < self.fast):
            return True
        self.success()
        return False

    def success(self):
        del self.streak[:]

    def tripped(self):
        return bool(self.limit) and len(self.streak) + 1 >= self.limit


def _failed_hosts(doc):
    hosts = doc.get("failed_hosts") if isinstance(doc, dict) else None
    return [h for h in hosts if isinstance(h, str)] if isinstance(hosts, list) else []


def _requeue(doc, why=None, **counts):
    """Put ``doc`` back to todo in memory without charging a scrub (lock = done = 0).

    ``counts`` are fields to raise by one (``retries``); logs, exit code and
    the error list stay to explain the attempt; ``why`` is logged into it.
    """
    doc["lock"] = doc["done"] = 0
    for field in _JOB_ID_FIELDS + _CLAIM_FIELDS:
        doc.pop(field, None)
    for field in counts:
        doc[field] = (_parse_int(doc.get(field)) or 0) + 1
    if why:
        errors = doc.get("error") if isinstance(doc.get("error"), list) else []
        doc["error"] = errors + [{"time": _now(), "message": why, "hostname": _hostname()}]
    return doc


def _poison(doc, why):
    """Put ``doc`` in error for good: it was killed or took its pilot down too often."""
    doc["poison"] = why
    Task.error(doc, "poison: " + why)
    return doc


###############################################################################
# The actor loop ##############################################################
###############################################################################

#: Seconds between heartbeats of a running token (0 switches them off).
DEFAULT_HEARTBEAT = 300.0
#: Signals that make a pilot stop: finish nothing new, give the running
#: token back, clean up, and exit with 128 + the signal number.
STOP_SIGNALS = tuple(getattr(signal, name) for name in
                     ("SIGTERM", "SIGINT", "SIGUSR1", "SIGXCPU") if hasattr(signal, name))
#: Seconds a pilot keeps trying to save a result through a server outage
#: (the journal holds it meanwhile), and the pause between its tries.
RESULT_SAVE_PATIENCE = 3600.0
RESULT_RETRY_PAUSE = (5.0, 15.0)
#: Seconds a pilot without --endless waits through an outage or a degraded
#: cluster before it gives up claiming; the first and the longest pause.
OUTAGE_PATIENCE = 900.0
OUTAGE_PAUSE = (5.0, 60.0)
#: After a stop signal, the seconds left for talking to the server (giving a
#: token back, saving a result, settling an unsure lock); what is not done by
#: then stays in the journal or for ``reset --stale``. With ``grace`` for the
#: task, a stop takes at most grace + STOP_BUDGET + about a second.
STOP_BUDGET = 5.0
#: A task that died of a stop signal the pilot has not received yet: seconds to
#: wait for the pilot's own copy of it (a batch system signals everything).
STOP_SIGNAL_WAIT = 1.0


class StopBudgetExceeded(BaseException):
    """Raised in the pilot when the talking after a stop signal took longer than STOP_BUDGET."""


class _Lease(object):
    """The running token's heartbeat, and the revision this pilot last wrote.

    ``lost`` is set to the document found when the token was reset or taken
    by someone else. While the lease is active, a save of the same token by
    user code (``db.save(token)`` in ``process_task``) and a heartbeat never
    overlap (:meth:`Database.save` takes the lease's lock), so user saves
    never meet a conflict the heartbeat made; a heartbeat after a user save
    keeps the user's changes and hands the new revision to the token object.

    ``extra_fields``, when set, is called (in the heartbeat thread) for more
    fields to write with each heartbeat, such as CommandActor's ``live_log``.
    It must be quick; when it raises, the heartbeat goes without them.
    """

    def __init__(self, db, token, claimed, interval):
        self.db = db
        self.task = token
        self.claim_id = claimed.get("claim_id")
        self.rev = token.get("_rev")
        self.interval = interval
        self.lost = None
        self.extra_fields = None
        self._base = dict(claimed, _rev=self.rev)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        _active["lease"] = self
        beat = _js_number(claimed.get("heartbeat")) or 0
        if interval and interval > 0 and beat and claimed.get("claim_id") and \
                _now() - beat > interval / 2.0:
            # Claimed a while ago (an unsure lock settled after an outage, a lock sent
            # with the last result): refresh it before the task starts, or learn it is gone.
            try:
                self.beat()
            except PicasError as exc:
                log.warning("heartbeat of %s failed: %s", token.get("_id"), exc)
        if interval and interval > 0 and self.lost is None:
            self._thread = threading.Thread(target=self._beat_loop, name="picas-heartbeat")
            self._thread.daemon = True
            self._thread.start()

    def guards(self, database, doc):
        """True when ``doc`` saved to ``database`` is this lease's token."""
        return doc.get("_id") == self.task.get("_id") and database.name == self.db.name

    def _beat_loop(self):
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:           # never let the heartbeat kill the pilot
                log.warning("heartbeat of %s failed: %s", self.task.get("_id"), exc)
            if self.lost is not None:
                return

    def beat(self):
        """Write ``heartbeat = now`` to the token, on the revision this pilot knows."""
        with self.lock:
            if self.lost is not None or self._stop.is_set():
                return
            extra = self._extra()
            body = dict(self._base, heartbeat=_now(), _rev=self.rev, **extra)
            for _ in range(5):
                based_on = body["_rev"]
                try:
                    self.db.save(body)
                    break
                except Conflict:
                    current = self.db.get(body["_id"])
                    if not self.owns(current):
                        self.lost = current or {}
                        log.warning("token %s was reset or taken by someone else while this "
                                    "pilot ran it; its result will be kept in the token's "
                                    "error list", body["_id"])
                        return
                    body = dict(current, heartbeat=_now(), **extra)   # keep what others wrote
            else:
                return
            self.rev = body["_rev"]
            self._base = body
            # The running token object moves to the new revision only when the
            # heartbeat was written on top of what that object holds (its own
            # revision, or the one user code just saved from it). When someone
            # else wrote in between, it keeps its old revision: the result save
            # then meets the conflict and re-applies the result on top of theirs.
            if self.task.get("_rev") == based_on and not self._stop.is_set():
                self.task["_rev"] = self.rev
                self.task["heartbeat"] = body["heartbeat"]

    def _extra(self):
        """The fields ``extra_fields`` gives for this heartbeat ({} when none or when it fails)."""
        hook = self.extra_fields
        if hook is None:
            return {}
        try:
            return dict((key, value) for key, value in dict(hook() or {}).items()
                        if key not in ("_id", "_rev", "heartbeat"))
        except Exception as exc:               # a heartbeat never fails for its extras
            log.debug("heartbeat of %s: extra fields failed: %r", self.task.get("_id"), exc)
            return {}

    def owns(self, current):
        """True while ``current`` (the stored token) still belongs to this claim."""
        return (current is not None and current.get("claim_id") == self.claim_id
                and token_state(current) in ("locked", "done", "error"))

    def stop(self, wait=2.0):
        """Stop the heartbeats. Waits at most ``wait`` s for one being written right now:
        one answered later no longer touches the token object (the result save then
        meets its revision as a conflict, and re-applies)."""
        self._stop.set()
        if _active.get("lease") is self:
            _active["lease"] = None
        if self.lock.acquire(timeout=wait):
            self.lock.release()


class _TokenRun(object):
    """One claimed token's life in this pilot. ``state`` goes, in order::

        claimed -> running -> finished -> journaling -> journaled -> saved
                         |                   (or kept: only the journal has it;
                         |                    in-error-list: another claim had it)
                         +-> stopping-task -> interrupted -> given-back
                                                             (or left-locked)

    A stop signal interrupts only ``running``; its time budget waits for
    ``journaling``. ``claimed`` is a deep copy of the token as it was
    claimed: what the result changed is measured against it, nested values
    included. ``journal_path`` is the local copy of the result while it exists.
    """

    def __init__(self, db, token, heartbeat):
        self.token = token
        self.claimed = _deep_copy(token)
        self.state = "claimed"
        self.outcome = None          # finished, timeout, failed or interrupted
        self.seconds = None          # how long prepare_run and process_task took
        self.journal_path = None
        self.lease = _Lease(db, token, self.claimed, heartbeat)

    def __repr__(self):
        return "_TokenRun(%r, state=%r)" % (self.token.get("_id"), self.state)


def _ensure_log_output():
    """Show the pilot's INFO lines on stderr when the application configured no logging.

    A library should not configure logging, but a pilot whose log goes
    nowhere leaves users blind in their job output; upstream printed too.
    """
    if not logging.getLogger().handlers and not any(
            not isinstance(h, logging.NullHandler) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s picas: %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


class RunActor(object):
    """The pilot: claim tokens one by one, run them, save the results.

    Subclass it and override ``process_task(token)``; the token is a
    :class:`Task` (a dict). Set ``token["exit_code"]`` and add output and
    attachments there; the actor saves the token after ``process_task``
    returns. The other hooks, ``prepare_env``, ``prepare_run``,
    ``cleanup_run`` and ``cleanup_env``, do nothing unless overridden.

    ``db`` is a :class:`Database`; ``iterator`` defaults to a
    :class:`TaskViewIterator` over ``view`` in ``design_doc``;
    ``token_reset_values`` are the (lock, done) an interrupted token gets
    back (default todo); ``heartbeat`` is the seconds between heartbeats;
    ``journal`` the :class:`Journal` (a folder) results wait in until the
    server holds them (default ``$PICAS_JOURNAL`` or ``./picas-journal``).
    ``retry_exit_codes`` (default 75) send a token back to todo without a
    scrub, at most ``max_retries`` times; ``poison_after`` timeouts put a
    token in error for good; ``black_hole`` tasks in a row failing within
    ``fast_failure`` seconds stop the pilot (``host_failure`` says why; off
    by default here, as upstream had no such rule; ``picas.py run`` uses 3).

    Guarantees (each proven by the test suite; see the README):

    * A token is run only after this pilot's lock write was answered 201, or
      a lock whose answer was lost or 202 was found, once the cluster was
      whole, to be the token's only revision. While a cluster answers 202
      the pilot claims nothing and waits, holding at most one unsure lock.
    * ``max_token_time`` interrupts ``process_task`` (SIGALRM) and kills the
      task's whole process group (SIGTERM, SIGKILL after ``grace``); the token
      gets exit_code 124 and an entry in ``error``.
    * SIGTERM, SIGINT, SIGUSR1 and SIGXCPU stop the pilot: no new claim, the
      running task is stopped, its token goes back to todo (not counted as a
      scrub; also when the task died of the same signal first), ``cleanup_env``
      runs, and ``run`` raises ``SystemExit(128 + N)`` within about ``grace`` +
      STOP_BUDGET seconds whatever the server does. A token whose result was
      saved is never sent back.
    * A finished result is in the journal (fsynced) before it is sent, and
      leaves it only once the server holds it; a conflict re-applies it while
      the token is still this pilot's, otherwise it goes into the token's
      ``error`` list. The journal is replayed before the first claim.
    """

    def __init__(self, db, iterator=None, view="todo", token_reset_values=(0, 0),
                 design_doc="Monitor", heartbeat=DEFAULT_HEARTBEAT, grace=DEFAULT_GRACE,
                 journal=None, retry_exit_codes=RETRY_EXIT_CODES, max_retries=MAX_RETRIES,
                 poison_after=POISON_AFTER, black_hole=0, fast_failure=FAST_FAILURE,
                 **view_params):
        if isinstance(db, ViewIterator) and hasattr(db, "client"):
            # The old API: RunActor(iterator, modifier).
            iterator, self.modifier, self.client = db, iterator, db.client
            db = db.client.db
        self.db = db
        if iterator is None:
            iterator = TaskViewIterator(db, view, design_doc=design_doc, **view_params)
        self.iterator = iterator
        self.token_reset_values = token_reset_values
        self.heartbeat = heartbeat
        self.grace = grace
        self.journal = journal if isinstance(journal, Journal) else Journal(journal)
        self.retry_exit_codes = tuple(retry_exit_codes or ())
        self.max_retries = max_retries
        self.poison_after = poison_after
        self.black_hole = black_hole
        self.fast_failure = fast_failure
        self.host_failure = None     # why this host stopped claiming (a black hole), if it did
        self.current_task = None
        self.tasks_processed = 0
        self.subprocess = None
        self.stop_signal = None
        self._phase = "idle"
        self._token_run = None       # the _TokenRun of the token being processed
        self._running = False        # in run(), or in a _run() called on its own
        self._stop_requested = False  # stop_function said stop after the last token

    @property
    def pilot_id(self):
        return getattr(self.iterator, "pilot_id", None)

    @property
    def _db(self):
        return _store(getattr(self, "db", None) or self.iterator.database)

    # -- hooks --------------------------------------------------------------

    def prepare_env(self, *args, **kwargs):
        """Called once before the first claim."""

    def prepare_run(self, *args, **kwargs):
        """Called after each claim, before ``process_task``."""

    def process_task(self, task):
        """Do the work of one token. Override this."""
        raise NotImplementedError("subclass RunActor and define process_task(self, token)")

    def cleanup_run(self, *args, **kwargs):
        """Called after each token's result was saved."""

    def cleanup_env(self, *args, **kwargs):
        """Called once at the end, also after a stop signal."""

    # -- the loop -----------------------------------------------------------

    def run(self, max_token_time=None, max_total_time=None, max_tasks=None, max_scrub=0,
            stop_function=None, **stop_function_args):
        """Process tokens until the view is empty or a stop criterion holds.

        No new token is claimed once ``max_tasks`` tokens were processed,
        ``max_total_time`` seconds have passed (``"auto"``: the batch job's
        end found by :func:`detect_walltime`, less WALLTIME_RESERVE), the time
        left is shorter than a token is expected to need (with ``"auto"`` or
        ``max_token_time`` only: learned from run times, see
        :class:`_Runtimes`; until anything is known, it claims;
        ``max_token_time`` caps the estimate and stays the kill limit), the
        host turned out to be a black hole, or
        ``stop_function(**stop_function_args)``, asked after each token with
        ``current_task`` still set (as upstream), was true. A failed token with
        ``scrub_count < max_scrub`` goes back to todo with ``scrub_count + 1``.
        Through a server outage or a degraded cluster the pilot waits (up to
        OUTAGE_PATIENCE seconds, unless its iterator is endless) and then
        raises the error.
        """
        if stop_function is None and "maxtime" in stop_function_args:
            maxtime = stop_function_args.pop("maxtime")      # the old API's run(maxtime=...)
            max_total_time = maxtime if maxtime and maxtime > 0 else max_total_time
        elif self._old_api() and max_token_time is not None and max_total_time is None:
            # The old API's run(maxtime) with its one argument given by position:
            # the pilot's total time (-1: no limit), not a limit per token.
            maxtime, max_token_time = max_token_time, None
            max_total_time = maxtime if maxtime > 0 else None
        self._settle(max_token_time, max_total_time, max_tasks, max_scrub, stop_function,
                     stop_function_args)
        saved = self._enter()
        try:
            try:
                self.prepare_env()
                self._replay_journal()
                if self._limits[1] is not None and isinstance(self._db, Database):
                    self._runtimes.read_pool(self._db)
                self._loop()
            except StopBudgetExceeded:
                log.error("stopping took longer than %.0f s; what was not written is in the "
                          "journal %s or stays locked for `picas.py reset locked --stale`",
                          STOP_BUDGET, self.journal.directory)
            finally:
                self._phase = "stopping"
                try:
                    self._give_back_held()
                    self._disarm_budget()
                except StopBudgetExceeded:
                    log.error("no time left to give back the tokens locked ahead; "
                              "`picas.py reset locked --stale` frees them")
                try:
                    self.cleanup_env()
                finally:
                    self.journal.tidy()
        finally:
            self._leave(saved)
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def _settle(self, max_token_time, max_total_time, max_tasks, max_scrub, stop_function,
                stop_function_args):
        """Set the limits of this run (see :meth:`run`), before anything starts."""
        _ensure_log_output()
        self._defaults()
        self._start = time.monotonic()
        self._hard_limit = max_total_time == "auto"     # the batch system ends the job then
        if max_total_time == "auto":
            max_total_time = walltime_limit()
        self._limits = (max_token_time, max_total_time, max_tasks, stop_function,
                        stop_function_args)
        self._max_scrub = max_scrub or 0
        self._max_token_time = max_token_time
        self._budget_armed = False
        self._stop_requested = False
        self._stop_told = False          # the reason to stop claiming was logged
        self._runtimes = _Runtimes()
        self._health = _HostHealth(self.black_hole, self.fast_failure)
        self._retried_here = set()       # ids sent back with a retry exit code by this pilot
        self.host_failure = None
        if hasattr(self.iterator, "_configure"):
            self.iterator._configure(lambda finishing=0: not self._may_claim(finishing),
                                     {"heartbeat_interval": self.heartbeat or 0}, self._avoids)

    def _enter(self):
        """Become the running pilot: its signal handlers, and the settings tasks read (_active)."""
        saved = (self._install_signal_handlers(), dict(_active))
        _active.update(grace=self.grace, old_api=self._old_api())
        self._running = True
        return saved

    def _leave(self, saved):
        handlers, outer = saved
        self._running = False
        self._restore_signal_handlers(handlers)
        _active.update(outer)

    def _loop(self):
        outage = None                    # (since, next pause) while the server is away
        while self._may_claim():
            self._phase = "claiming"
            try:
                task = next(self.iterator)
            except StopIteration:
                break
            except (ServerUnreachable, ServerError, Degraded) as exc:
                outage = self._wait_out(exc, outage)
                continue
            finally:
                self._phase = "idle"
            outage = None
            if isinstance(task, tuple):          # old API: (key, ref, token)
                task = task[-1]
            self._run(task, self._max_token_time)
            # Asked after each token, as upstream did: current_task is still set.
            stop_function, kwargs = self._limits[3:]
            if stop_function is not None and self.stop_signal is None and stop_function(**kwargs):
                self._stop_requested = True

    def _run(self, task, timeout):
        """Process one claimed token: ``prepare_run``, ``process_task`` (stopped after
        ``timeout`` seconds), save the result or give the token back, ``cleanup_run``.

        Upstream's name for one step of :meth:`run`, which calls it for every
        token (a subclass may wrap it). Called on its own, outside ``run``, it
        is a pilot for this one token: signal handlers and settings as in
        ``run``, and ``SystemExit(128 + N)`` after a stop signal N.
        """
        if self._running:
            self._max_token_time = timeout
            self._process(task)
            return
        self._settle(timeout, None, None, 0, None, {})
        saved = self._enter()
        try:
            self._process(task)
            if self.stop_signal is not None:
                self._phase = "stopping"
                self.cleanup_env()
        finally:
            self._disarm_budget()
            self._leave(saved)
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def _wait_out(self, exc, outage):
        """Claiming failed for a reason that passes (outage, degraded cluster): wait, or give up."""
        now = time.monotonic()
        since, pause = outage or (now, OUTAGE_PAUSE[0])
        if now - since > OUTAGE_PATIENCE:
            log.error("the server stayed unavailable for %.0f s; giving up", now - since)
            raise exc
        log.warning("cannot claim now: %s; trying again in about %.0f s", exc, pause)
        deadline = now + random.uniform(0.75 * pause, pause)
        while time.monotonic() < deadline and self.stop_signal is None:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        return since, min(OUTAGE_PAUSE[1], pause * 2)

    def _replay_journal(self):
        if not isinstance(self._db, Database) or not self.journal.entries():
            return                    # a _ContractDatabase has no journal: see _finish
        log.info("saving results left in the journal %s", self.journal.directory)
        try:
            counts = replay_journal(self._db, self.journal, self.pilot_id)
        except PicasError as exc:
            log.warning("could not replay the journal now (%s); it is kept", exc)
            return
        log.info("journal: %(saved)d saved, %(already)d already there, %(in_error_list)d kept "
                 "in error lists, %(left)d left, %(deleted)d of deleted tokens set aside" % counts)

    def _defaults(self):
        # Old-API subclasses often set their attributes without calling
        # RunActor.__init__; give them what the loop needs.
        for name, value in (("token_reset_values", (0, 0)), ("heartbeat", DEFAULT_HEARTBEAT),
                            ("grace", DEFAULT_GRACE), ("current_task", None),
                            ("tasks_processed", 0), ("subprocess", None), ("stop_signal", None),
                            ("_phase", "idle"), ("_token_run", None), ("_running", False),
                            ("_stop_requested", False), ("retry_exit_codes", RETRY_EXIT_CODES),
                            ("max_retries", MAX_RETRIES), ("poison_after", POISON_AFTER),
                            ("black_hole", 0), ("fast_failure", FAST_FAILURE),
                            ("host_failure", None), ("_hard_limit", False)):
            if not hasattr(self, name):
                setattr(self, name, value)
        if not isinstance(getattr(self, "journal", None), Journal):
            self.journal = Journal(getattr(self, "journal", None))

    def _old_api(self):
        """True for old-API actors: they define process_token(key, token) and save tokens themselves."""
        return (hasattr(self, "process_token") and
                getattr(type(self).process_task, "__func__", type(self).process_task)
                is RunActor.process_task)

    def _may_claim(self, finishing=0):
        """True while a new token may be claimed (``finishing``: tokens about to be counted)."""
        max_token_time, max_total_time, max_tasks = self._limits[:3]
        if self.stop_signal is not None or self._stop_requested or self.host_failure:
            return False
        if max_tasks and self.tasks_processed + finishing >= max_tasks:
            return False
        remaining = self._time_left()
        if remaining is not None:
            need = self._runtimes.needed(max_token_time) if self._fit_check() else None
            if remaining <= 0 or (need is not None and remaining < need):
                if not self._stop_told:
                    self._stop_told = True
                    log.info("stopping: %.0f s of the time limit left%s", max(0, remaining),
                             ", and a token needs about %.0f s (from %s)" % (
                                 need, self._runtimes.describe()) if need is not None else "")
                return False
        return True

    def _fit_check(self):
        """True when a token is started only if it is expected to finish in time: with a
        walltime from the batch system, or with ``max_token_time`` (upstream's rule,
        which took every token to need all of it). A ``max_total_time`` alone means,
        as upstream, "claim nothing after"."""
        return self._hard_limit or bool(self._limits[0])

    def _time_left(self):
        """Seconds left of ``max_total_time``, or None without a limit."""
        max_total_time = self._limits[1]
        if max_total_time is None:
            return None
        return max_total_time - (time.monotonic() - self._start)

    def _avoids(self, doc):
        """True for a todo token this pilot leaves to others (checked before locking it).

        One it sent back with a retry exit code already; one that failed
        this host as a black hole before (``failed_hosts``); one whose
        ``expected_run_seconds`` (+ RUNTIME_SLACK) does not fit in the time left.
        """
        if doc.get("_id") in self._retried_here or _hostname() in _failed_hosts(doc):
            return True
        hint = doc.get(RUNTIME_HINT_FIELD)
        left = self._time_left()
        return (left is not None and self._fit_check() and isinstance(hint, (int, float)) and
                not isinstance(hint, bool) and hint + RUNTIME_SLACK > left)

    def _process(self, task):
        """Run one claimed token and save its result (or give it back)."""
        self.current_task = task
        run = self._token_run = _TokenRun(self._db, task, self.heartbeat)
        try:
            try:
                if self.stop_signal is not None:
                    run.outcome = "interrupted"          # the signal came while claiming
                elif run.lease.lost is not None:
                    run.outcome = "lost"                 # reset or taken before it started
                else:
                    started = time.monotonic()
                    try:
                        run.outcome = self._run_hooks(run)
                    finally:
                        run.seconds = time.monotonic() - started
            except (SystemExit, KeyboardInterrupt):
                # User code ended the pilot (sys.exit() in process_task): not a result.
                run.lease.stop()
                run.state = "interrupted"
                self._give_back(run)
                raise
            finally:
                run.lease.stop()
                if run.outcome in ("interrupted", "timeout"):
                    self._stop_subprocess()
                self.subprocess = None
            if run.outcome == "finished" and self._killed_by_stop(task):
                log.warning("token %s: the task died of the stop signal the pilot received "
                            "(exit code %s): not its result", task["_id"], task.get("exit_code"))
                run.outcome = "interrupted"
            if run.outcome == "lost":
                log.warning("token %s was reset or taken by another pilot before it started "
                            "here: not run", task["_id"])
            elif run.outcome == "interrupted":
                run.state = "interrupted"
                self._arm_budget()
                self._give_back(run)
            elif self._old_api():
                # Old-API actors save their tokens themselves; only a failure is recorded here.
                run.state = "finished"
                if run.outcome != "finished":
                    self._record_failure(run)
                self.cleanup_run()
                self.tasks_processed += 1
            else:
                self._finish(run)
                self.cleanup_run()
                self.tasks_processed += 1
        except StopBudgetExceeded:
            if run.state == "journaled":
                log.error("token %s: no time left to save the result; it is kept in %s "
                          "(`picas.py replay` saves it)", task["_id"], run.journal_path)
            elif run.state in ("claimed", "interrupted"):
                log.error("token %s: no time left to give it back; it stays locked until "
                          "`picas.py reset locked --stale` frees it", task["_id"])
            raise
        finally:
            self._token_run = None

    def _killed_by_stop(self, task):
        """True when the task died of the stop signal this pilot received (or gets in a moment)."""
        code = _parse_int(task.get("exit_code"))
        if code is None or not (code - 128 in STOP_SIGNALS or -code in STOP_SIGNALS):
            return False
        deadline = time.monotonic() + STOP_SIGNAL_WAIT
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.stop_signal is not None and code in (128 + self.stop_signal, -self.stop_signal)

    def _run_hooks(self, run):
        """Call prepare_run and process_task under the timeout; return the outcome."""
        task = run.token
        timer = self._max_token_time
        run.state = "running"
        try:
            if self.stop_signal is not None:
                # The signal came after the claim, before the task could be interrupted.
                raise PilotInterrupted(self.stop_signal)
            if timer and hasattr(signal, "setitimer") and \
                    threading.current_thread() is threading.main_thread():
                signal.setitimer(signal.ITIMER_REAL, timer)
            self.prepare_run()
            if self._old_api():
                # The old loop: for key, ref, token in iterator: process_token(ref, token)
                ref = getattr(task, "view_value", None)
                self.process_token(task["_id"] if ref is None else ref, task)
            else:
                self.process_task(task)
            run.state = "finished"
            return "finished"
        except TaskTimeout:
            run.state = "finished"
            log.warning("token %s: timed out after %s s (max_token_time)", task["_id"], timer)
            task.error("timed out after %s s (max_token_time); the task was killed" % timer)
            task["exit_code"] = 124
            return "timeout"
        except PilotInterrupted:
            run.state = "interrupted"
            return "interrupted"
        except PicasError as exc:
            run.state = "finished"
            log.error("token %s: %s", task["_id"], exc)
            task.error(str(exc))
            return "failed"
        except Exception as exc:
            run.state = "finished"
            log.exception("token %s: process_task raised %r", task["_id"], exc)
            task.error("process_task raised %r" % (exc,), exc)
            return "failed"
        finally:
            if run.state == "running":
                run.state = "finished"
            if timer and hasattr(signal, "setitimer") and self._budget_armed is False:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def finishing(self):
        """Tell the actor the task's work is complete: signals no longer interrupt it.

        Call this from ``process_task`` once the result exists and only needs
        to be recorded, so that a stop signal arriving now lets the result be
        saved instead of sending the token back to todo.
        """
        run = self._token_run
        if run is not None and run.state == "running":
            run.state = "finished"
            if self._max_token_time and hasattr(signal, "setitimer") and \
                    getattr(self, "_budget_armed", False) is False:
                signal.setitimer(signal.ITIMER_REAL, 0)

    # -- results ------------------------------------------------------------

    def _finish(self, run):
        """Mark the token done (scrubbed if it failed and may be retried), journal it, save it."""
        self._arm_budget()                # a stop that was held: bounded from now
        task = run.token
        task.pop(LIVE_LOG_FIELD, None)    # only while it runs
        if not _js_number(task.get("done")):
            task["done"] = _now()
        if task.get("exit_code") in ("", None):
            task["exit_code"] = 0
        problems = find_unstorable(dict((k, v) for k, v in task.items() if k != "_attachments"))
        if problems:
            clean = make_storable(dict((k, v) for k, v in task.items() if k != "_attachments"))
            task.update(clean)
            message = ("the result holds values JSON cannot hold, stored as text instead: %s"
                       % "; ".join(problems))
            log.error("token %s: %s", task["_id"], message)
            task.error(message)
        blames_host = self._dispose(run)
        run.state = "journaling"          # a stop's time budget waits for this write
        if isinstance(self._db, Database):
            run.journal_path = self.journal.write(task, run.claimed, self._db, self.pilot_id)
        # else: a _ContractDatabase cannot say which database it is, so no replay
        # could find the right one: its results are not journaled.
        run.state = "journaled"
        saved = self._save_result(run) == "saved"
        if self.host_failure:
            self._clear_streak()
        elif blames_host and saved:
            self._health.streak.append((task["_id"], task.get("_rev"), _scrub_count(run.claimed)))

    def _dispose(self, run):
        """Decide where a finished token goes; return True when its failure blames the host.

        In this order: success: done. A fast failure that completes a black
        hole's streak: back to todo, not charged, this host in
        ``failed_hosts``, and the pilot stops claiming. A retry exit code:
        back to todo, not charged (error after ``max_retries``). Killed by
        max_token_time ``poison_after`` times: error for good. Otherwise a
        failure: back to todo with a scrub while ``max_scrub`` allows, else
        error (the error view's test: the claim set lock, done is set, the
        exit code is not 0; also for a _ContractDatabase's documents, which
        may have no type field).
        """
        task = run.token
        code = _parse_int(task.get("exit_code"))
        if code == 0:
            self._runtimes.learn(run.seconds)
            self._health.success()
            return False
        if run.outcome == "timeout":
            self._runtimes.learn(self._max_token_time)
        # A task killed by max_token_time ran as long as it was let: never "fast".
        blames_host = run.outcome != "timeout" and self._health.judge(code, run.seconds, task)
        if blames_host and self._health.tripped():
            self.host_failure = ("%d tasks in a row failed on %s within %.0f s or could not "
                                 "be executed (exit codes 126/127); the last one %s exited "
                                 "with %s" % (self._health.limit, _hostname(),
                                              self._health.fast, task["_id"], code))
            log.error("this host looks broken (a black hole): %s. Stopping; the tokens it "
                      "failed go back to todo, not charged, and name this host in "
                      "failed_hosts, so pilots here pass them over", self.host_failure)
            task["scrub_count"] = _scrub_count(run.claimed)
            _requeue(task, "failed on a host that looks broken: " + self.host_failure)
            task["failed_hosts"] = _failed_hosts(task) + [_hostname()]
            return True
        if code in self.retry_exit_codes and run.outcome == "finished":
            retries = (_parse_int(task.get("retries")) or 0) + 1
            if self.max_retries is not None and retries > self.max_retries:
                task["retries"] = retries
                Task.error(task, "exit code %d (try again later) came back %d times: given "
                           "up" % (code, retries))
            else:
                log.info("token %s: exit code %d (try again later): back to todo, not "
                         "charged (retry %d of %s)", task["_id"], code, retries,
                         self.max_retries)
                _requeue(task, None, retries=1)
                self._retried_here.add(task["_id"])
            return blames_host
        if run.outcome == "timeout":
            timeouts = task["timeouts"] = (_parse_int(task.get("timeouts")) or 0) + 1
            if self.poison_after and timeouts >= self.poison_after:
                log.error("token %s was killed by max_token_time %d times: poison, to error "
                          "for good", task["_id"], timeouts)
                _poison(task, "killed by max_token_time (%s s) %d times" %
                        (self._max_token_time, timeouts))
                return False
        if _scrub_count(task) < self._max_scrub:
            log.info("token %s failed (exit code %s): back to todo for attempt %d of %d",
                     task["_id"], task.get("exit_code"), _scrub_count(task) + 2,
                     self._max_scrub + 1)
            Task.scrub(task)
        return blames_host

    def _clear_streak(self):
        """A black hole: the tokens it failed before the last one go back to todo, uncharged.

        Only those nobody changed since this pilot saved them (compare-and-set
        on that revision); this host is added to their ``failed_hosts``.
        """
        streak, self._health.streak = self._health.streak, []
        for token_id, rev, scrub_count in streak:
            try:
                current = self._db.get(token_id)
                if current is None or current.get("_rev") != rev:
                    continue                 # run or changed by someone since: left alone
                current["scrub_count"] = scrub_count
                _requeue(current, "failed on a host that looks broken: " + self.host_failure)
                current["failed_hosts"] = _failed_hosts(current) + [_hostname()]
                self._db.save(current)
                log.info("token %s back to todo, not charged (failed on this broken host)",
                         token_id)
            except PicasError as exc:
                log.warning("token %s: could not send it back to todo (%s); it keeps the "
                            "failure this host gave it", token_id, exc)

    def _claim_ahead(self):
        """The claimer that may lock the next token in the same request as this result.

        Only when the next claim would follow anyway: no stop criterion holds
        once this token counts, and no user ``stop_function`` (which upstream
        calls after ``cleanup_run``) has to be asked first.
        """
        if self._limits[3] is not None or self._old_api() or not self._may_claim(finishing=1):
            return None
        ahead = getattr(self.iterator, "_ahead", None)
        return ahead() if ahead is not None else None

    def _save_result(self, run):
        """Save the result on the claim's revision; on any failure it stays in the journal.

        Returns the final state: saved, in-error-list or kept.
        """
        task, lease = run.token, run.lease
        deadline = time.monotonic() + RESULT_SAVE_PATIENCE
        ahead = self._claim_ahead()
        while True:
            try:
                if lease.lost is not None:
                    return self._keep_orphan_result(run, lease.lost)
                conflict = False
                try:
                    if ahead is not None:
                        claimer, ahead = ahead, None          # only the first attempt
                        claimer.save_and_claim(task)
                    else:
                        self._db.save(task)
                except Conflict:
                    conflict = True
                if not conflict:
                    self.journal.remove(run.journal_path)
                    run.state = "saved"
                    return run.state
                current = self._db.get(task["_id"])
                if lease.owns(current):
                    # Someone changed another field or added an attachment while
                    # the token was ours: apply our changes on top of theirs.
                    _reapply(task, run.claimed, current)
                else:
                    lease.lost = current or {}
            except (ServerUnreachable, ServerError) as exc:
                if self.stop_signal is not None or time.monotonic() > deadline:
                    return self._kept(run, "the server stayed unreachable: %s" % exc)
                log.warning("saving the result of %s failed (%s); trying again (the journal "
                            "holds it meanwhile)", task["_id"], exc)
                time.sleep(random.uniform(*RESULT_RETRY_PAUSE))
            except PicasError as exc:
                # Refused for good (403 from a validate_doc_update, 413 too large...): the
                # journal keeps it, and the token goes to error, so it does not come back
                # through `reset --stale` to be run and refused again.
                self._refused(run, exc)
                return self._kept(run, "the server refused it: %s" % exc)

    def _refused(self, run, exc):
        try:
            current = self._db.get(run.token["_id"])
            if run.lease.owns(current) and token_state(current) == "locked":
                Task.error(current, "the server refused this token's result (%s); the result "
                           "is kept in the journal of pilot %s" % (exc, self.pilot_id))
                self._db.save(current)
        except PicasError as err:
            log.debug("could not put %s in error either: %s", run.token["_id"], err)

    def _kept(self, run, why):
        run.state = "kept"
        if run.journal_path:
            log.error("the result of token %s is not in the database (%s); it is kept in %s: "
                      "`picas.py replay %s` saves it", run.token["_id"], why, run.journal_path,
                      os.path.dirname(run.journal_path))
        else:
            log.error("the result of token %s is not in the database (%s), and the journal "
                      "could not keep it: it is lost", run.token["_id"], why)
        return run.state

    def _keep_orphan_result(self, run, current):
        """The token is no longer this claim's: settle the result as a replay would.

        Freed by ``reset`` and run by nobody since: the result is written (the
        work is not done twice). Taken or finished by another claim: the result
        goes into its error list. Deleted: the journal entry is set aside.
        """
        try:
            outcome = _settle_result(self._db, run.token, run.claimed, self.pilot_id)
        except (ServerUnreachable, ServerError) as exc:
            return self._kept(run, "the token was reset or taken, and the server went away: "
                              "%s" % exc)
        except PicasError as exc:
            return self._kept(run, "the token was reset or taken and could not be annotated: "
                              "%s" % exc)
        if outcome == "deleted":
            if run.journal_path:
                self.journal.set_aside(run.journal_path, "deleted")
                run.journal_path += ".deleted"
            return self._kept(run, "the token was deleted while it ran")
        self.journal.remove(run.journal_path)
        run.state = "in-error-list" if outcome == "in_error_list" else "saved"
        if run.state == "saved":
            log.warning("token %s had been sent back to todo while this pilot ran it (its "
                        "heartbeat looked stale); nobody ran it since, so the result is saved",
                        run.token["_id"])
        return run.state

    def _record_failure(self, run):
        """Old API: put the error the user code hit into the token, if it is still ours."""
        task, lease = run.token, run.lease
        errors = task.get("error") if isinstance(task.get("error"), list) else []
        for _ in range(10):
            current = self._db.get(task["_id"])
            if not lease.owns(current) or token_state(current) != "locked":
                return
            current["error"] = (current.get("error") if isinstance(current.get("error"), list)
                                else []) + errors[-1:]
            Task.error(current, errors[-1]["message"] if errors else "process_token failed")
            try:
                self._db.save(current)
                return
            except Conflict:
                continue

    def _give_back_held(self):
        """Give back the tokens locked ahead (with the last result, or an unsure lock found ours)."""
        claimers = self.iterator._claimers() if hasattr(self.iterator, "_claimers") else []
        if getattr(self, "_budget_armed", False) is None:
            if any(c._held is not None or c.unsure is not None for c in claimers):
                log.error("no time left to give back the token locked ahead; "
                          "`picas.py reset locked --stale` frees it")
            return
        for claimer in claimers:
            self._arm_budget()
            try:
                held = claimer.give_back_held()
            except PicasError as exc:
                log.error("could not check the token locked with the last result (%s); "
                          "`picas.py reset locked --stale` frees it if it stayed locked", exc)
                continue
            if held is not None:
                self._give_back_unrun(held)

    def _give_back_unrun(self, token):
        """Give back a token this pilot holds a lock on but does not run (no heartbeat)."""
        run = _TokenRun(self._db, token, 0)
        run.lease.stop()
        run.state = "interrupted"
        self._give_back(run)

    def _give_back(self, run):
        """Put an interrupted token back to todo, if it is still this pilot's and unfinished."""
        self._arm_budget()
        task, lease = run.token, run.lease

        def unclaimed(doc):
            body = Task(dict(doc))
            body["lock"], body["done"] = self.token_reset_values
            for field in _CLAIM_FIELDS + _JOB_ID_FIELDS:
                body.pop(field, None)
            return body
        body = unclaimed(dict(lease._base, _rev=lease.rev))
        run.state = "left-locked"
        for _ in range(10):
            try:
                try:
                    self._db.save(body)
                    run.state = "given-back"
                    log.warning("token %s went back to todo (the pilot was stopped)", task["_id"])
                    return
                except Conflict:
                    current = self._db.get(task["_id"])
                if not lease.owns(current) or token_state(current) != "locked":
                    # Taken or reset meanwhile, or finished: user code saved its
                    # result itself (old API). A finished token never goes back.
                    run.state = "given-back" if current is None else run.state
                    return
                body = unclaimed(current)
            except PicasError as exc:
                log.error("could not give token %s back (%s): it stays locked; "
                          "`picas.py reset locked --stale` will free it", task["_id"], exc)
                return

    # -- signals ------------------------------------------------------------

    def setup_handler(self):
        """Install :meth:`handler` for the stop signals and the max_token_time alarm for SIGALRM.

        Upstream's name; :meth:`run` calls it (and puts the handlers that were
        there back at the end), so a subclass may override it.
        """
        log.info("Setting up signal handlers")
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handler)
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._on_alarm)

    def handler(self, signum, frame):
        """The stop-signal handler (upstream's name).

        In a running pilot (``run``, or ``_run`` called on its own) it starts
        the stop: no new claim, the running task is interrupted and its token
        given back, ``cleanup_env`` runs and ``run`` raises ``SystemExit(128 +
        N)``. Called when no pilot runs (a script installed it with
        :meth:`setup_handler`, or calls it), it stops at once: it stops
        ``self.subprocess``, gives ``current_task`` back when it is still
        locked and unfinished (a finished token is never sent back), calls
        ``cleanup_env`` and raises ``SystemExit(128 + N)``.
        """
        if getattr(self, "_running", False):
            self._on_stop_signal(signum, frame)
            return
        self._defaults()
        self.stop_signal = signum
        log.warning("received signal %d: stopping", signum)
        self._stop_subprocess()
        task = self.current_task
        if task is not None and _js_number(task.get("lock")) and not _js_number(task.get("done")):
            self._give_back_unrun(task)
        self.cleanup_env()
        raise SystemExit(128 + signum)

    def _stop_subprocess(self):
        """Stop ``self.subprocess``, a process user code started and set there (as upstream's
        handler did): SIGTERM, SIGKILL after ``grace`` seconds."""
        proc = self.subprocess
        if proc is None or not hasattr(proc, "poll") or proc.poll() is not None:
            return
        import subprocess
        try:
            proc.terminate()
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        except OSError:
            pass

    def _install_signal_handlers(self):
        """Call :meth:`setup_handler`; return the handlers it replaced (None off the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("RunActor.run() is not in the main thread: no signal handling "
                        "and no max_token_time")
            self._max_token_time = None
            return None
        signums = STOP_SIGNALS + ((signal.SIGALRM,) if hasattr(signal, "SIGALRM") else ())
        saved = dict((signum, signal.getsignal(signum)) for signum in signums)
        self.setup_handler()
        return saved

    def _restore_signal_handlers(self, saved):
        for signum, handler in (saved or {}).items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _arm_budget(self):
        """After a stop signal: from now, STOP_BUDGET seconds for talking to the server."""
        if self.stop_signal is None or not getattr(self, "_running", False) or \
                getattr(self, "_budget_armed", None) is not False or \
                not hasattr(signal, "setitimer") or \
                threading.current_thread() is not threading.main_thread():
            return
        self._budget_armed = True
        signal.setitimer(signal.ITIMER_REAL, STOP_BUDGET)

    def _disarm_budget(self):
        if getattr(self, "_budget_armed", None) is True and hasattr(signal, "setitimer"):
            self._budget_armed = None             # spent: no alarm can come after this
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_stop_signal(self, signum, frame):
        if self.stop_signal is None:
            self.stop_signal = signum
            log.warning("received signal %d: stopping after this token is given back or saved",
                        signum)
        run = self._token_run
        if run is not None and run.state == "running":
            self._interrupt(PilotInterrupted(signum))
        elif run is None or run.state != "stopping-task":
            self._arm_budget()           # claiming, saving or giving back: bounded from now
        # (While the task is being stopped, the budget starts once it is: see _process.)

    def _on_alarm(self, signum, frame):
        run = self._token_run
        if getattr(self, "_budget_armed", None) is True:
            if run is not None and run.state in ("finished", "journaling") and \
                    not self._old_api():
                # A result exists: wait until it is in the journal (the pilot's own
                # steps up to that point are bounded; user code after finishing() is not).
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                return
            self._budget_armed = None                          # spent: never armed again
            raise StopBudgetExceeded()
        if run is not None and run.state == "running":
            self._interrupt(TaskTimeout("max_token_time passed"))

    def _interrupt(self, exc):
        """Raise ``exc`` in the running task's code, once; only while a task runs.

        While a task process is being started, the exception is held for
        run_command() to raise as soon as it knows the process. Once the task
        process of ``run`` has exited (even if not yet waited for), its work is
        done: the exception is held and dropped, the result saved (unless the
        task died of the stop signal itself: see _killed_by_stop).
        """
        run = self._token_run
        run.state = "stopping-task"
        if _active.get("spawning") or _exited(_active.get("proc")):
            _active["pending"] = exc
        else:
            raise exc


###############################################################################
# The generic pilot: run a command for every token ############################
###############################################################################

#: Linux limits one argument or environment string to 128 KiB (MAX_ARG_STRLEN).
_MAX_ARG = 128 * 1024
#: The longest input: it is an argument and also ``PICAS_TOKEN_INPUT=<input>``
#: (one string with its terminating NUL).
_MAX_INPUT = _MAX_ARG - len("PICAS_TOKEN_INPUT=") - 1


#: The largest ``$PICAS_OUTPUT_FILE`` merged into the token's ``output`` (the
#: token is one JSON document: CouchDB's max_document_size is 8 MB by default).
OUTPUT_FILE_LIMIT = 1024 * 1024
#: Bytes ``--attach`` attaches at most of one file, and of all a token's files
#: together. They travel inline (base64) in the result save, which CouchDB
#: bounds by max_attachment_size and max_http_request_size, not by
#: max_document_size; the journal keeps a copy until the server holds them.
ATTACH_LIMIT = 16 * 1024 * 1024
ATTACH_TOTAL = 64 * 1024 * 1024
#: Bytes of the end of stdout and of stderr written with each heartbeat (``live_log``).
LIVE_LOG_BYTES = 4096
#: Characters of a token id kept in the name of its working directory (the rest is a hash).
_WORKDIR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_attach_pattern(pattern):
    """Raise ValueError unless the glob ``pattern`` stays inside the task's working directory."""
    parts = pattern.replace(os.sep, "/").split("/")
    if not pattern or os.path.isabs(pattern) or ".." in parts:
        raise ValueError("--attach %r: give a pattern relative to the task's working directory, "
                         "such as 'results/*.csv' (absolute paths and '..' are refused: a "
                         "task's files never come from outside it)" % pattern)
    return pattern


def _match_inside(base, pattern):
    """The paths under ``base`` matching the glob ``pattern``, relative and sorted.

    As :mod:`glob` matches (``*`` within one name, ``**`` for any depth,
    names starting with a dot only when the pattern's do), but without
    ever entering a symlinked folder: the search stays inside ``base``.
    """
    import fnmatch
    parts = [part for part in pattern.replace(os.sep, "/").split("/") if part not in ("", ".")]
    found = set()

    def entries(rel):
        try:
            return sorted(os.scandir(os.path.join(base, rel) if rel else base),
                          key=lambda entry: entry.name)
        except OSError:
            return []

    def walk(rel, i):
        part = parts[i]
        last = i + 1 == len(parts)
        if part == "**":
            if last:
                found.update(rel + "/" + e.name if rel else e.name for e in entries(rel)
                             if not e.name.startswith("."))
            else:
                walk(rel, i + 1)
            for entry in entries(rel):
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    walk(rel + "/" + entry.name if rel else entry.name, i)
            return
        for entry in entries(rel):
            if entry.name.startswith(".") and not part.startswith("."):
                continue
            if fnmatch.fnmatchcase(entry.name, part):
                name = rel + "/" + entry.name if rel else entry.name
                if last:
                    found.add(name)
                elif entry.is_dir(follow_symlinks=False):
                    walk(name, i + 1)
    if parts:
        walk("", 0)
    return sorted(found)


def _tail(path, size):
    """The last ``size`` bytes of the file at ``path`` as text (bad UTF-8 replaced)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - size))
        return fh.read(size).decode("utf-8", "replace")


def _json_kind(value):
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


class CommandActor(RunActor):
    """The pilot behind ``picas.py run -- COMMAND ARGS...``.

    For each token it runs ``COMMAND ARGS... INPUT TOKEN_ID`` (a non-string
    input is passed as JSON), with ``PICAS_TOKEN_ID``, ``PICAS_TOKEN_INPUT``
    and ``PICAS_TOKEN_FILE`` (a JSON copy of the token) in its environment and
    the database password removed from it. The token's input is passed as an
    argument, never pasted into a shell command line by picas.py. stdout and
    stderr go to files, are attached as ``logs_<id>.out``/``.err`` (head and
    tail kept when longer than ``log_limit`` bytes), and the exit code is
    recorded. While the task runs, each heartbeat writes the end of both to
    the token's ``live_log``.

    Outputs: a JSON object the task writes to ``$PICAS_OUTPUT_FILE`` is merged
    into the token's ``output``. Files of the task's working directory
    matching the globs ``attach`` are attached, each at most ``attach_limit``
    bytes and all together ``attach_total``; what is left out is listed in
    ``attach_skipped``. With ``workdir`` (a folder, or "" for the pilot's
    temporary folder) each token runs in a fresh folder inside it
    (``$PICAS_WORKDIR``), removed after the result is saved unless
    ``keep_workdir``; without it the task runs in the pilot's folder.
    Problems with outputs never change the exit code or lose the result:
    they are noted in the token (``output_note``, ``attach_skipped``).
    """

    def __init__(self, db, command, log_limit=DEFAULT_LOG_LIMIT, attach=(),
                 attach_limit=ATTACH_LIMIT, attach_total=ATTACH_TOTAL, workdir=None,
                 keep_workdir=False, **kwargs):
        RunActor.__init__(self, db, **kwargs)
        self.command = list(command)
        self.log_limit = log_limit
        self.attach = [check_attach_pattern(p) for p in attach]
        self.attach_limit = attach_limit
        self.attach_total = attach_total
        self.workdir = None if workdir is None else os.path.abspath(workdir) if workdir else ""
        self.keep_workdir = keep_workdir
        if self.workdir is not None and self.command and os.sep in self.command[0]:
            # The task starts in another folder: ./process_task.sh must still be found.
            self.command[0] = os.path.abspath(self.command[0])
        self._task_dir = None        # this token's fresh working directory, while it exists
        self.results = {"done": 0, "error": 0, "todo": 0}

    def prepare_env(self):
        import tempfile
        self.tmpdir = tempfile.mkdtemp(prefix="picas-pilot-")
        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)

    def cleanup_env(self):
        import shutil
        self._drop_task_dir()
        shutil.rmtree(getattr(self, "tmpdir", ""), ignore_errors=True)

    def process_task(self, token):
        value = token.get("input")
        arg = value if isinstance(value, str) else json.dumps(value)
        tid = token["_id"]
        problems = find_unstorable(arg, "input")
        if problems:
            raise PicasError("the token cannot be run: %s" % "; ".join(problems))
        size = len(arg.encode("utf-8", "surrogateescape"))
        if size > _MAX_INPUT:
            raise PicasError("the token's input is %d bytes, more than one command-line argument "
                             "and environment variable may hold (%d); keep large data in a file "
                             "or an attachment and put its name in the input"
                             % (size, _MAX_INPUT))
        if "\0" in arg:
            raise PicasError("the token's input holds a null character (\\0), which no "
                             "command-line argument can hold; keep such data in a file or an "
                             "attachment and put its name in the input")
        # The notes of an earlier run describe that run; the names it attached may be replaced.
        attached_before = token.get("attached") if isinstance(token.get("attached"), list) else []
        for field in ("output_note", "attach_skipped", "attached"):
            token.pop(field, None)
        # Files named after a hash of the id: any id fits in a file name.
        safe = os.path.basename(self.journal.path_for({"_id": tid}))[:16]
        token_file = os.path.join(self.tmpdir, "token-%s.json" % safe)
        with open(token_file, "wb") as fh:
            fh.write(_dumps(token))
        output_file = os.path.join(self.tmpdir, "output-%s.json" % safe)
        _remove(output_file)
        self._drop_task_dir()            # one a stopped token left
        cwd = self._new_task_dir(tid, safe) if self.workdir is not None else None
        env = task_environment(self._db, PICAS_TOKEN_ID=tid, PICAS_TOKEN_INPUT=arg,
                               PICAS_TOKEN_FILE=token_file, PICAS_OUTPUT_FILE=output_file,
                               PICAS_WORKDIR=cwd or os.getcwd())
        argv = [_utf8(a) for a in self.command + [arg, tid]]
        paths = [os.path.join(self.tmpdir, "logs_%s.%s" % (safe, ext)) for ext in ("out", "err")]
        run = getattr(self, "_token_run", None)
        lease = run.lease if run is not None else None
        exited = False                   # the task ran to its end, or max_token_time ended it
        started = time.monotonic()
        try:
            with open(paths[0], "wb") as out, open(paths[1], "wb") as err:
                if lease is not None:
                    lease.extra_fields = lambda: self._live_log(paths)
                try:
                    code = run_command(argv, stdout=out, stderr=err, cwd=cwd, env=env,
                                       grace=self.grace, on_exit=self.finishing)
                    exited = True
                except TaskTimeout:
                    exited = True
                    raise
            self.finishing()
            token["exit_code"] = code
        finally:
            if lease is not None:
                lease.extra_fields = None
            for path, ext in zip(paths, ("out", "err")):
                inline_attachment(token, "logs_%s.%s" % (tid, ext),
                                  read_log(path, self.log_limit), "text/plain")
                _remove(path)
            if exited:
                self._collect_outputs(token, output_file, cwd or os.getcwd(), attached_before)
            _remove(output_file)
            os.remove(token_file)
            token["run_seconds"] = round(time.monotonic() - started, 3)

    def cleanup_run(self):
        token = self.current_task
        state = token_state(token)
        if state in self.results:
            self.results[state] += 1
        log.info("token %s: exit code %s in %.1f s -> %s", token["_id"], token.get("exit_code"),
                 token.get("run_seconds", 0), state or "?")
        self._drop_task_dir()

    # -- outputs ------------------------------------------------------------

    def _live_log(self, paths):
        """The ``live_log`` field a heartbeat writes: the ends of stdout and stderr so far."""
        out, err = (_tail(path, LIVE_LOG_BYTES) for path in paths)
        return {LIVE_LOG_FIELD: {"out": out, "err": err, "time": _now()}}

    def _new_task_dir(self, tid, safe):
        """A fresh folder for this token: its id's plain characters, a hash and a random tail."""
        import tempfile
        plain = "".join(c if c in _WORKDIR_CHARS else "_" for c in tid[:40]).lstrip(".")
        self._task_dir = tempfile.mkdtemp(prefix="%s-%s-" % (plain or "token", safe[:8]),
                                          dir=self.workdir or self.tmpdir)
        return self._task_dir

    def _drop_task_dir(self):
        import shutil
        folder, self._task_dir = self._task_dir, None
        if folder is None:
            return
        if self.keep_workdir:
            log.info("the task's working directory %s is kept (--keep-workdir)", folder)
            return
        # A task may leave folders it made read-only: make them writable (never a
        # symlink's target) so that they can be emptied.
        for root, dirs, _ in os.walk(folder):
            for name in dirs:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    try:
                        os.chmod(path, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.lexists(folder):
            log.warning("could not remove the task's working directory %s: remove it by hand",
                        folder)

    def _collect_outputs(self, token, output_file, cwd, attached_before):
        """Merge ``$PICAS_OUTPUT_FILE`` and attach the ``attach`` files; never fail the result."""
        try:
            self._merge_output_file(token, output_file)
        except Exception as exc:
            self._output_note(token, "$PICAS_OUTPUT_FILE could not be read (%r): not merged "
                              "into output" % (exc,))
        if self.attach:
            try:
                self._attach_files(token, cwd, attached_before)
            except Exception as exc:
                log.exception("token %s: attaching files failed", token["_id"])
                token["attach_skipped"] = (token.get("attach_skipped") or []) + [
                    {"name": ", ".join(self.attach), "reason": "attaching failed: %r" % (exc,)}]

    def _output_note(self, token, message):
        log.warning("token %s: %s", token["_id"], message)
        note = token.get("output_note")
        token["output_note"] = "%s; %s" % (note, message) if note else message

    def _merge_output_file(self, token, path):
        """Merge the JSON object at ``path`` into ``token["output"]`` (key by key).

        A file that is too large, not JSON or not an object is not merged: it
        is attached as ``output_<id>.json`` (when it fits ``attach_limit``)
        and ``output_note`` says why. Values CouchDB cannot store (lone
        surrogates, NaN) are stored as make_storable makes them, with a note.
        """
        try:
            size = os.path.getsize(path)
        except OSError:
            return                                   # the task wrote none
        tid = token["_id"]
        value, problem = None, None
        if size > OUTPUT_FILE_LIMIT:
            problem = ("is %d bytes, more than the %d merged into a token's output; write "
                       "large results to a file and attach it (--attach)"
                       % (size, OUTPUT_FILE_LIMIT))
        else:
            with open(path, "rb") as fh:
                data = fh.read(OUTPUT_FILE_LIMIT + 1)
            try:
                value = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problem = "is not UTF-8 text (%s); write one JSON object" % exc
            except ValueError as exc:
                problem = ("is not valid JSON (%s); write one JSON object, such as "
                           '{"score": 0.9}' % exc)
            except RecursionError:
                problem = "is nested too deeply to be read; write a flatter JSON object"
            else:
                if not isinstance(value, dict):
                    problem = ("holds %s, not a JSON object; write an object, such as "
                               '{"result": ...}' % _json_kind(value))
        if problem is not None:
            name = "output_%s.json" % tid
            if size <= self.attach_limit:
                with open(path, "rb") as fh:
                    inline_attachment(token, name, fh.read(self.attach_limit + 1),
                                      "application/json")
                kept = "the file is attached as %s" % name
            else:
                kept = "the file is not kept (over --attach-limit too)"
            self._output_note(token, "$PICAS_OUTPUT_FILE %s. Not merged into output; %s"
                              % (problem, kept))
            return
        problems = find_unstorable(value, "output")
        if problems:
            value = make_storable(value)
            self._output_note(token, "$PICAS_OUTPUT_FILE holds values CouchDB cannot store, "
                              "stored as text instead: %s" % "; ".join(problems))
        old = token.get("output")
        if isinstance(old, dict):
            merged = dict(old)
            merged.update(value)
        elif old in (None, ""):
            merged = dict(value)
        else:
            key = "previous_output"
            while key in value:
                key = "_" + key
            merged = dict(value)
            merged[key] = old
            self._output_note(token, "the token's output was %s, not an object: it is kept "
                              "as output.%s" % (_json_kind(old), key))
        token["output"] = merged

    def _attach_files(self, token, cwd, attached_before):
        """Attach the files matching ``attach`` in ``cwd``; list those left out, and why."""
        import mimetypes
        import stat
        tid = token["_id"]
        base = os.path.realpath(cwd)
        reserved = set(["logs_%s.out" % tid, "logs_%s.err" % tid, "output_%s.json" % tid])
        others = set(token.get("_attachments") or {}) - reserved - set(attached_before)
        matches, seen = [], set()
        for pattern in self.attach:
            found = _match_inside(base, pattern)
            if not found:
                log.info("token %s: --attach %s matched no file in %s", tid, pattern, base)
            for name in found:
                if name not in seen:
                    seen.add(name)
                    # A folder "**" went through is not left out: its files are matched.
                    matches.append((name, pattern.rstrip("/").endswith("**")))
        attached, skipped, total = [], [], 0
        for name, through in matches:
            path = os.path.join(base, name)
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            real = os.path.realpath(path)
            data, reason = None, None
            try:
                info = os.stat(path)
            except OSError as exc:
                info, reason = None, "cannot be read: %s" % (exc.strerror or exc)
            if shown != name:
                reason = "its name is not UTF-8 text; rename it"
            elif real != base and not real.startswith(base + os.sep):
                reason = "a symlink pointing outside the working directory"
            elif info is None:
                pass
            elif stat.S_ISDIR(info.st_mode) and through:
                continue
            elif stat.S_ISDIR(info.st_mode):
                reason = "a directory: attach the files in it with a pattern such as %s/*" % name
            elif not stat.S_ISREG(info.st_mode):
                reason = "not a regular file"
            elif name.startswith("_"):
                reason = "CouchDB refuses attachment names starting with _; rename it"
            elif name in reserved:
                reason = "the name is taken by the task's logs or output file"
            elif name in others:
                reason = "the token already has an attachment of that name; it is not replaced"
            elif info.st_size > self.attach_limit:
                reason = ("%d bytes, over the limit of %d for one file (--attach-limit)"
                          % (info.st_size, self.attach_limit))
            elif total + info.st_size > self.attach_total:
                reason = ("%d bytes, over the limit of %d for all files of a token "
                          "(--attach-total; %d bytes attached before it)"
                          % (info.st_size, self.attach_total, total))
            else:
                try:
                    with open(path, "rb") as fh:
                        data = fh.read(self.attach_limit + 1)
                except OSError as exc:
                    reason = "cannot be read: %s" % (exc.strerror or exc)
                else:
                    if len(data) > self.attach_limit or total + len(data) > self.attach_total:
                        data, reason = None, "it grew past the size limits while being read"
            if reason is not None:
                skipped.append({"name": shown, "reason": reason})
                continue
            inline_attachment(token, name, data,
                              mimetypes.guess_type(name)[0] or "application/octet-stream")
            total += len(data)
            attached.append(name)
        if attached:
            token["attached"] = attached
        if skipped:
            token["attach_skipped"] = skipped
            log.warning("token %s: %d files not attached (listed in its attach_skipped): %s",
                        tid, len(skipped), "; ".join("%s: %s" % (s["name"], s["reason"])
                                                     for s in skipped[:5]))


###############################################################################
# Admin operations ############################################################
###############################################################################

STATES = ("todo", "locked", "done", "error")


def count_states(db, design_doc="Monitor"):
    """Return ``{"todo": n, "locked": n, "done": n, "error": n}`` from ``overview_total``."""
    result = db.view("%s/overview_total" % design_doc, group=True)
    counts = dict.fromkeys(STATES, 0)
    for row in result.get("rows", []):
        if row.get("key") in counts:
            counts[row["key"]] = int(row.get("value") or 0)
    return counts


def push_tokens(db, lines=None, tokens=None, id_prefix="token", batch=500):
    """Create tokens in bulk: one per text line (``input`` = the line), or from dicts.

    Token ids are ``<id_prefix>-<n>`` with ``n`` the 1-based position, so
    pushing the same input again creates nothing new: existing ids holding
    the same input are counted as ``existing``, never overwritten. An
    existing id holding a different token (the same prefix used for other
    work) is a failure: that token was not stored. Returns a dict with counts
    ``created``, ``existing`` and ``failed`` and the list of ``errors``.
    """
    report = {"created": 0, "existing": 0, "failed": 0, "errors": []}
    pending = []
    # What makes a token this token; the rest is state a pilot changes.
    state_fields = set(TOKEN_DEFAULTS) - set(["type", "input"])
    state_fields.update(_CLAIM_FIELDS + _JOB_ID_FIELDS + ("_rev", "_attachments"))

    def flush():
        clashes = []
        for doc, (ok, doc_id, rev_or_error) in zip(pending, db.update(pending)):
            if ok:
                report["created"] += 1
            elif isinstance(rev_or_error, Conflict):
                clashes.append(doc)
            else:
                report["failed"] += 1
                report["errors"].append("%s: %s" % (doc_id, rev_or_error))
        if clashes:
            rows = db.all_docs(keys=[d["_id"] for d in clashes], include_docs=True)["rows"]
            stored = dict((row["id"], row.get("doc")) for row in rows if row.get("doc"))
            for doc in clashes:
                there = stored.get(doc["_id"]) or {}
                if all(there.get(k, _MISSING) == v for k, v in doc.items()
                       if k not in state_fields):
                    report["existing"] += 1
                else:
                    report["failed"] += 1
                    report["errors"].append(
                        "%s: this id already holds a different token (input %r); use another "
                        "--id-prefix for other work" % (doc["_id"], there.get("input")))
        del pending[:]

    source = ((dict(TOKEN_DEFAULTS, input=line) for line in lines) if lines is not None
              else tokens)
    for number, body in enumerate(source, 1):
        token = dict(TOKEN_DEFAULTS)
        token["error"] = []
        token.update(body)
        token.setdefault("_id", "%s-%d" % (id_prefix, number))
        token.pop("_rev", None)
        problems = find_unstorable(token)
        if problems:
            report["failed"] += 1
            report["errors"].append("token %d (id %s): %s; fix it in the input" % (
                number, make_storable(token["_id"]), "; ".join(problems)))
            continue
        pending.append(token)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return report


def scrub_token(token):
    """Reset ``token`` to todo in memory: lock = done = 0, scrub_count + 1.

    Logs, the error list and the last exit_code stay, to explain the last attempt.
    """
    return Task.scrub(token)


def is_stale(doc, now=None, lease=None):
    """True when ``doc`` is locked by a pilot that stopped sending heartbeats.

    Its ``heartbeat`` (or lock time, when there is none) is older than the
    lease: by default three times its ``heartbeat_interval`` plus a minute;
    ``lease`` seconds when given, but never less than twice the interval (a
    live pilot is never declared dead). Tokens without a heartbeat interval
    (upstream pilots, or heartbeats switched off) have no default lease:
    they are stale only when ``lease`` is given and their lock time (or last
    heartbeat) is older than that.
    """
    now = time.time() if now is None else now
    interval = _js_number(doc.get("heartbeat_interval")) or 0
    beat = _js_number(doc.get("heartbeat")) or _js_number(doc.get("lock")) or 0
    if interval <= 0 and lease is None:
        return False
    limit = 3 * interval + 60 if lease is None else max(lease, 2 * interval)
    return token_state(doc) == "locked" and now - beat > limit


def select_tokens(db, view, design_doc="Monitor", older_than=None, stale=False, now=None,
                  lease=None):
    """Yield the documents in ``view`` that ``reset``/``delete`` should touch.

    ``older_than`` (seconds) keeps tokens locked longer ago than that;
    ``stale`` keeps locked tokens whose pilot is gone (:func:`is_stale`).
    Documents come with their ``_conflicts``, if any.
    """
    now = time.time() if now is None else now
    name = view if "/" in view else "%s/%s" % (design_doc, view)
    for row in db.iterview(name, batch=500, include_docs=True, conflicts=True):
        doc = row.get("doc")
        if not doc or doc.get("_id", "").startswith("_design/"):
            continue
        if older_than is not None:
            lock = _js_number(doc.get("lock")) or 0
            if not (lock > 0 and now - lock > older_than):
                continue
        if stale and not is_stale(doc, now, lease):
            continue
        yield doc


def iter_tokens(db, view=None, design_doc="Monitor", batch=500):
    """Yield every token of ``view`` (``"todo"``, ``"Design/view"``), or of the whole
    database when ``view`` is None, ``batch`` documents per request.

    Paged, so a pool of any size streams in bounded memory. Documents come
    with attachment stubs (names, sizes), never attachment data.
    """
    if view is not None:
        name = view if "/" in view else "%s/%s" % (design_doc, view)
        for row in db.iterview(name, batch=batch, include_docs=True):
            doc = row.get("doc")
            if doc and not doc.get("_id", "").startswith("_design/"):
                yield doc
        return
    params = {"include_docs": True, "limit": batch}
    while True:
        rows = db.all_docs(**params)["rows"]
        for row in rows:
            doc = row.get("doc")
            if doc and doc.get("type") == "token":
                yield doc
        if len(rows) < batch:
            return
        params.update(startkey=rows[-1]["id"], skip=1)


#: Exit codes with a meaning of their own, as ``status --errors`` names them.
_EXIT_MEANINGS = {124: "killed: max-token-time", 126: "not executable",
                  127: "command not found", 75: "try again later"}


def exit_meaning(code):
    """A few words on what exit ``code`` usually means, or ''."""
    code = _parse_int(code)
    if code in _EXIT_MEANINGS:
        return _EXIT_MEANINGS[code]
    if code is not None and 128 < code < 128 + 65:
        try:
            return "killed by %s" % signal.Signals(code - 128).name
        except ValueError:
            return "killed by signal %d" % (code - 128)
    return ""


def _error_entries(doc):
    errors = doc.get("error")
    if isinstance(errors, dict):
        errors = [errors]
    if not isinstance(errors, list):
        return [{"message": errors}] if errors not in (None, "", []) else []
    return [e if isinstance(e, dict) else {"message": e} for e in errors]


def failure_summary(db, latest=10, batch=500):
    """Where tokens fail: per exit code, per host, and the latest error messages.

    Reads every token once (paged). Returns a dict:

    - ``error_tokens``: tokens in error now;
    - ``exit_codes``: {code: {"error": tokens in error with that exit code,
      "todo": tokens back in todo whose last run exited with it (a scrub, a
      retry code, a black hole)}};
    - ``hosts``: {host: {"error": tokens in error that last ran there,
      "failed_hosts": tokens a pilot there gave back as a black hole,
      "messages": error entries written there (also of tokens retried since)}};
    - ``latest``: the ``latest`` newest error entries of any token, newest
      first: {time, id, state, hostname, exit_code, message}.
    """
    import heapq
    summary = {"error_tokens": 0, "exit_codes": {}, "hosts": {}, "latest": []}
    newest = []                         # a heap of (time, n, entry): the latest kept
    hosts = summary["hosts"]

    def host(name):
        return hosts.setdefault(name or "(unknown)",
                                {"error": 0, "failed_hosts": 0, "messages": 0})

    for number, doc in enumerate(iter_tokens(db, batch=batch)):
        state = token_state(doc)
        code = _parse_int(doc.get("exit_code"))
        if state == "error" or (state == "todo" and code):
            key = str(code if code is not None else doc.get("exit_code"))
            row = summary["exit_codes"].setdefault(key, {"error": 0, "todo": 0})
            row[state] += 1
        if state == "error":
            summary["error_tokens"] += 1
            host(doc.get("hostname"))["error"] += 1
        for name in set(_failed_hosts(doc)):
            host(name)["failed_hosts"] += 1
        for index, entry in enumerate(_error_entries(doc)):
            host(entry.get("hostname") or doc.get("hostname"))["messages"] += 1
            when = _js_number(entry.get("time")) or 0
            item = {"time": when, "id": doc.get("_id"), "state": state,
                    "hostname": entry.get("hostname") or doc.get("hostname") or "",
                    "exit_code": doc.get("exit_code"),
                    "message": _one_line(entry.get("message"))}
            heapq.heappush(newest, (when, number, index, item))
            if len(newest) > latest:
                heapq.heappop(newest)
    summary["latest"] = [item for _, _, _, item in sorted(newest, reverse=True)]
    return summary


def _one_line(message, limit=300):
    """An error message as one line of at most ``limit`` characters."""
    text = message if isinstance(message, str) else json.dumps(message)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def token_history(db, doc, limit=50):
    """The claims of a token, oldest first, from the revisions the server still holds.

    CouchDB keeps old revisions' bodies until the database is compacted;
    each claim (a new ``claim_id``, or lock time for upstream pilots) is
    reported once, with the last state it reached: ``{"rev", "lock",
    "hostname", "pilot_id", "state", "exit_code", "done"}``. Returns
    ``(claims, missing)``: ``missing`` counts revisions compacted away.
    """
    info = db.get(doc["_id"], revs_info=True) or {}
    revs = [r["rev"] for r in info.get("_revs_info", []) if r.get("status") == "available"]
    missing = len(info.get("_revs_info", [])) - len(revs)
    bodies = []
    if revs[:limit]:
        answer = db.request("GET", "/" + _quote_id(doc["_id"]), params={
            "open_revs": json.dumps(revs[:limit], separators=(",", ":"))})[2]
        bodies = [item["ok"] for item in answer if isinstance(item, dict) and "ok" in item]
        missing += sum(1 for item in answer if isinstance(item, dict) and "missing" in item)
    bodies.sort(key=lambda d: int(str(d.get("_rev", "0")).split("-")[0]))
    claims = []
    for body in bodies:
        state = token_state(body)
        if state == "todo":
            # A claim that ended back in todo (a scrub, a retry code, a black hole,
            # reset): its outcome is in this revision; the next claim starts anew.
            if claims and claims[-1]["key"] is not None:
                claims[-1].update(state="todo again", exit_code=body.get("exit_code"),
                                  rev=body.get("_rev"), key=None)
            continue
        if state is None:
            continue
        key = body.get("claim_id") or body.get("lock")
        if not claims or claims[-1]["key"] != key:
            claims.append({"key": key})
        claims[-1].update(rev=body.get("_rev"), lock=body.get("lock"), state=state,
                          hostname=body.get("hostname"), pilot_id=body.get("pilot_id"),
                          exit_code=body.get("exit_code"), done=body.get("done"))
    for claim in claims:
        del claim["key"]
    return claims, missing + max(0, len(revs) - limit)


def conflicted_tokens(db):
    """Ids of tokens with conflicting revisions, or None when the Conflicts view is missing."""
    try:
        return [row["id"] for row in db.iterview("%s/conflicts" % CONFLICTS_DESIGN)]
    except NotFound:
        return None


def _tombstone(doc):
    return {"_id": doc["_id"], "_rev": doc["_rev"], "_deleted": True}


def free_stale(doc, poison_after=POISON_AFTER):
    """A token whose pilot died, back to todo in memory (a scrub), counted in ``lost_pilots``.

    The ``poison_after``-th time (0: never) it goes to error for good instead,
    as poison: a token that takes its pilot down (out of memory, a crash of
    the node) would otherwise do it again and again.
    """
    lost = doc["lost_pilots"] = (_parse_int(doc.get("lost_pilots")) or 0) + 1
    if poison_after and lost >= poison_after:
        return _poison(doc, "%d pilots died while running it (no heartbeat: killed, out of "
                       "memory, or their node was lost)" % lost)
    return scrub_token(doc)


def repair_plan(db, doc, now=None, lease=None, poison_after=POISON_AFTER):
    """The writes that free a token from dead pilots: a list of documents, maybe empty.

    A token on a CouchDB cluster can hold several revisions ("leaves") after
    concurrent lock writes. Leaves locked by a pilot that is gone
    (:func:`is_stale`) are removed; if the winning leaf is such a leaf and no
    other leaf is alive, the token goes back to todo instead (or to error as
    poison: :func:`free_stale`). Leaves that hold a result or a live lock are
    never touched.
    """
    winner = dict(doc)
    conflict_revs = winner.pop("_conflicts", None) or []
    losers = [leaf for leaf in (db.get(doc["_id"], rev=rev) for rev in conflict_revs) if leaf]
    writes = [_tombstone(leaf) for leaf in losers if is_stale(leaf, now, lease)]
    if is_stale(winner, now, lease):
        if len(writes) < len(losers):
            writes.append(_tombstone(winner))      # a live or finished leaf takes over
        else:
            writes.append(free_stale(winner, poison_after))
    return writes


def bulk_apply(db, docs, change, batch=500):
    """Apply ``change(doc)`` to each document and write them back in bulk (compare-and-set).

    Returns ``(changed, conflicts)``: documents that someone else changed
    since they were read are left alone and counted as conflicts.
    """
    changed = conflicts = 0
    pending = []

    def flush():
        ok_count = bad = 0
        for ok, doc_id, err in db.update(pending):
            if ok:
                ok_count += 1
            elif isinstance(err, Conflict):
                bad += 1
            else:
                raise err
        del pending[:]
        return ok_count, bad

    for doc in docs:
        result = change(doc)
        pending.extend(result if isinstance(result, list) else [result])
        if len(pending) >= batch:
            a, b = flush()
            changed, conflicts = changed + a, conflicts + b
    if pending:
        a, b = flush()
        changed, conflicts = changed + a, conflicts + b
    return changed, conflicts


###############################################################################
# Upstream picas names: scripts written for picas keep working ###############
###############################################################################
#
# Both upstream APIs are served from this file: the current one (CouchDB,
# Task, RunActor.process_task) and the old one of SURF's documentation
# (CouchClient, BasicViewIterator yielding (key, ref, token), RunActor
# (iterator, modifier) with process_token(key, token) that saves the token
# itself). The module names upstream scripts import -- picas.clients,
# picas.iterators, picas.actors, ... -- are registered below. Deliberate
# differences are listed in the README ("Coming from picas").

#: Upstream's name for the version.
VERSION = __version__

ResourceNotFound = NotFound
ResourceConflict = Conflict


class _CouchDatabase(Database):
    """A :class:`Database` with python-couchdb's signatures, for old scripts' ``client.db``."""

    def __setitem__(self, doc_id, doc):
        doc["_id"] = doc_id
        self.save(doc)

    def put_attachment(self, doc, content, filename=None, content_type=None):
        if hasattr(content, "read"):
            filename = filename or os.path.basename(getattr(content, "name", "attachment"))
            content = content.read()
        if content_type is None:
            import mimetypes
            content_type = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
        return Database.put_attachment(self, doc, filename, content, content_type)

    def get_attachment(self, id_or_doc, filename, default=None):
        import io
        data = Database.get_attachment(self, id_or_doc, filename)
        return default if data is None else io.BytesIO(data)


class _ClosingClient(object):
    """``close()`` and ``with`` for the clients below, which hold a :class:`Server`."""

    def close(self):
        """Close the connections to the server (a later call opens a new one)."""
        self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class CouchDB(_ClosingClient):
    """Upstream picas' client: ``CouchDB(url, db, username, password, ssl_verification, create)``.

    ``create=True`` creates the database (an error if it exists); otherwise
    it must exist. ``.db`` is the database with python-couchdb's methods.
    """

    def __init__(self, url="http://localhost:5984", db="test", username=None, password="",
                 ssl_verification=True, create=False):
        self.server = Server(url, username, password, verify=ssl_verification)
        self._settings = (url, db, username, password, ssl_verification)
        self.db = _CouchDatabase(self.server, db)
        if create:
            self.server.create_database(db)
        elif not self.db.exists():
            raise NotFound(404, "not_found", "database %r does not exist" % db, "HEAD", "/" + db)

    def __repr__(self):
        return "CouchDB(%r, %r)" % (self.server.url, self.db.name)

    @property
    def _picas_database(self):
        return self.db

    def copy(self):
        url, db, username, password, verify = self._settings
        return CouchDB(url, db, username, password, verify)

    def __getitem__(self, doc_id):
        return self.db[doc_id]

    def get(self, doc_id):
        doc = self.db.get(doc_id)
        if doc is None:
            raise ValueError("document %r not found" % doc_id)
        return Document(doc)

    def view(self, view, design_doc="Monitor", **params):
        return self.db.view("%s/%s" % (design_doc, view), **params)

    def get_from_view(self, view, design_doc="Monitor", **params):
        params["include_docs"] = True
        return [Document(row["doc"]) for row in self.view(view, design_doc, **params)
                if row.get("doc")]

    def get_single_from_view(self, view, window_size=1, design_doc="Monitor", **params):
        rows = [row for row in self.view(view, design_doc, limit=window_size,
                                         include_docs=True, **params) if row.get("doc")]
        if not rows:
            raise IndexError("view %s/%s is empty" % (design_doc, view))
        return Document(random.choice(rows)["doc"])

    def save(self, doc):
        self.db.save(doc)
        return doc

    def save_documents(self, docs):
        return [ok for ok, _, _ in self.db.update(docs)]

    def add_view(self, view, map_fun, reduce_fun=None, design_doc="Monitor", *args, **kwargs):
        definition = {"map": map_fun}
        if reduce_fun:
            definition["reduce"] = reduce_fun
        self.db.ensure_design(design_doc, {view: definition})

    def delete(self, doc):
        self.db.delete(doc)

    def delete_documents(self, docs):
        tombstones = [{"_id": d["_id"], "_rev": d["_rev"], "_deleted": True} for d in docs]
        return [ok for ok, _, _ in self.db.update(tombstones)]

    def delete_from_view(self, view, design_doc="Monitor"):
        return self.delete_documents(self.get_from_view(view, design_doc))

    def set_users(self, admins=None, members=None, admin_roles=None, member_roles=None):
        security = self.db.request("GET", "/_security")[2] or {}
        for group, names, roles in (("admins", admins, admin_roles),
                                    ("members", members, member_roles)):
            entry = security.setdefault(group, {})
            for key, values in (("names", names), ("roles", roles)):
                merged = list(entry.get(key, []))
                merged += [v for v in (values or []) if v not in merged]
                entry[key] = merged
        self.db.request("PUT", "/_security", body=security, retry=True)

    def is_view_nonempty(self, view, design_doc="Monitor", **params):
        try:
            return len(self.view(view, design_doc, limit=1, **params)) > 0
        except NotFound:
            return False

    def doc_count(self):
        """The documents in the database, as upstream's client counts them on the same database.

        CouchDB's ``doc_count`` (design documents included), less picas.py's own
        ``_design/Conflicts``, which upstream never writes: scripts that number
        new tokens from it (upstream's push_tokens.py: ``token_<doc_count()+i>``)
        get the same ids as with upstream's create_views.py.
        """
        count = self.db.info()["doc_count"]
        if "_design/" + CONFLICTS_DESIGN in self.db:
            count -= 1
        return count


class CouchClient(_ClosingClient):
    """The old API's client: ``.server`` and ``.db`` (python-couchdb style)."""

    def __init__(self, url="http://localhost:5984", db="test", username="", password="",
                 ssl_verification=True):
        self.server = Server(url, username or None, password, verify=ssl_verification)
        self.db = _CouchDatabase(self.server, db)

    @property
    def _picas_database(self):
        return self.db

    def get_all(self, view_location, view_params=None):
        return list(self.db.view(view_location, **(view_params or {})))

    def modify_token(self, token):
        self.db.save(token)
        return token

    def update_all(self, docs):
        return self.db.update(docs)


class BasicViewIterator(ViewIterator):
    """The old API's iterator: yields ``(key, ref, token)`` for each claimed token.

    ``key`` and ``ref`` are the view row's key and value (the standard views
    emit the token id for both); ``token`` is the locked token (a dict).
    """

    def __init__(self, client, view_location, modifier=None, view_params=None):
        ViewIterator.__init__(self)
        self.client = client
        self.modifier = modifier
        self.database = client.db
        self._claimer = _Claimer(client.db, view_location, **(view_params or {}))

    pilot_id = property(lambda self: self._claimer.pilot_id)
    stats = property(lambda self: self._claimer.stats)
    _configure = TaskViewIterator._configure
    _claimers = TaskViewIterator._claimers

    def claim_task(self):
        return self._claimer.claim()

    def __next__(self):
        token = ViewIterator.__next__(self)
        return token.view_key, token.view_value, token

    next = __next__


AbstractRunActor = RunActor
TokenModifier = BasicTokenModifier


class Timer(object):
    """Seconds since it was made or last reset."""

    def __init__(self):
        self.reset()

    def elapsed(self):
        return time.monotonic() - self.start

    def reset(self):
        self.start = time.monotonic()


def time_elapsed(timer, max=30.0):
    """True when ``timer`` has run longer than ``max`` seconds."""
    return timer.elapsed() > max


def merge_dicts(dict1, dict2):
    """A deep copy of ``dict1`` updated with ``dict2``."""
    merged = json.loads(json.dumps(dict1))
    merged.update(dict2)
    return merged


def seconds():
    return _now()


def add_job_id(doc):
    """Record the batch system's job id in ``doc`` as upstream did: only the first one found.

    In this order (the outermost of layered systems first): DIRACJOBID,
    GLITE_WMS_JOBID (``wms_job_id`` is None unless it is a URL), CREAM_JOBID,
    PBS_JOBID, SLURM_ARRAY_JOB_ID + "_" + SLURM_ARRAY_TASK_ID, SLURM_JOB_ID;
    HTCondor's after those. picas.py's own claims record every id found
    (:func:`job_ids`).
    """
    env = os.environ
    if env.get("DIRACJOBID") is not None:
        doc["dirac_job_id"] = env["DIRACJOBID"]
    elif env.get("GLITE_WMS_JOBID") is not None:
        wms = env["GLITE_WMS_JOBID"]
        doc["wms_job_id"] = wms if wms.startswith("http") else None
    elif env.get("CREAM_JOBID") is not None:
        doc["cream_job_id"] = env["CREAM_JOBID"]
    elif env.get("PBS_JOBID") is not None:
        doc["pbs_job_id"] = env["PBS_JOBID"]
    elif env.get("SLURM_ARRAY_JOB_ID") is not None and env.get("SLURM_ARRAY_TASK_ID") is not None:
        doc["slurm_job_id"] = "%s_%s" % (env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"])
    elif env.get("SLURM_JOB_ID") is not None:
        doc["slurm_job_id"] = env["SLURM_JOB_ID"]
    else:
        condor = _htcondor_job_id(env.get("_CONDOR_JOB_AD"))
        if condor:
            doc["htcondor_job_id"] = condor
    return doc


def remove_job_id(doc):
    for field in _JOB_ID_FIELDS:
        doc.pop(field, None)
    return doc


class TokenGenerator(object):
    @staticmethod
    def get_empty_token():
        return {"lock": 0, "done": 0, "hostname": "", "scrub_count": 0, "type": "token"}


def execute_old(cmd):
    """Upstream's ``os.system`` runner, in its own process group like every task here."""
    return run_command(cmd, shell=True)


class _UpstreamModule(type(sys)):          # types.ModuleType
    """One of upstream's module names (``picas.actors``...): a view of names of this file.

    Setting one of its names sets this file's name too, as setting it in
    upstream's module changed what that module's code used: a test that
    patches ``picas.actors.log`` sees the lines the actor logs.
    """

    def __init__(self, name, names, namespace):
        type(sys).__init__(self, name, "Upstream picas' %s names, served by picas.py."
                           % name.rpartition(".")[2])
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_namespace", namespace)
        for attr in names:
            object.__setattr__(self, attr, namespace[attr])

    def __setattr__(self, attr, value):
        object.__setattr__(self, attr, value)
        if attr in self._names:
            self._namespace[attr] = value


def _register_upstream_modules():
    """Make ``picas.clients``, ``picas.iterators``, ... importable from this one file.

    Works when this file is imported as ``picas`` (or vendored under another
    name) and when it runs as a script (then it also answers to ``picas``).
    """
    here = globals()
    this = sys.modules.get(__name__)
    if this is not None and vars(this) is not here:
        this = None     # run by exec() under another module's name (cProfile, runpy...)
    base = __name__
    if __name__ == "__main__" or this is None:
        base = "picas"
        if this is not None:
            sys.modules.setdefault("picas", this)
    submodules = {
        "clients": ("CouchDB", "CouchClient"),
        "documents": ("Document", "Task"),
        "iterators": ("ViewIterator", "TaskViewIterator", "PrioritizedViewIterator",
                      "EndlessViewIterator", "BasicViewIterator"),
        "modifiers": ("TokenModifier", "BasicTokenModifier"),
        "actors": ("RunActor", "AbstractRunActor", "log"),
        "executers": ("execute", "execute_old"),
        "util": ("Timer", "time_elapsed", "merge_dicts", "seconds"),
        "jobid": ("add_job_id", "remove_job_id"),
        "generators": ("TokenGenerator",),
        "picaslogger": ("picaslogger",),
    }
    for name, names in submodules.items():
        module = _UpstreamModule("%s.%s" % (base, name), names, here)
        sys.modules[module.__name__] = module
        here[name] = module


#: Upstream's logger name.
picaslogger = log
_register_upstream_modules()


###############################################################################
# The command line ############################################################
###############################################################################

#: Exit statuses of ``picas.py`` (``run`` adds 128 + N when stopped by signal N).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_WORK, EXIT_BLACK_HOLE = 0, 1, 2, 3, 4

_EPILOG = """\
connection settings, highest precedence first: the --url/--db/--user flags; the
environment variables PICAS_HOST_URL, PICAS_DATABASE, PICAS_USERNAME and
PICAS_PASSWORD; a picasconfig.py (in the working directory, on PYTHONPATH, or
named with --config) defining those four names. The password is never taken
from the command line.

examples:
  python picas.py views                          create the standard views
  python picas.py push quickExample.txt          one token per line
  python picas.py run -- ./process_task.sh       $1 = input, $2 = token id
  python picas.py --db other run --max-tasks 10 --max-time 3600 -- ./task.sh
  python picas.py status --watch 10
  python picas.py status --errors 5              failures per exit code and host
  python picas.py show ID                        one token's story; logs ID [--err] [--follow]
  python picas.py export done --format csv > done.csv
  python picas.py has-work todo && sbatch pilot.sh
  python picas.py reset locked --stale           free tokens of dead pilots
  python picas.py reset error --yes              retry failed tokens
  python picas.py replay picas-journal           save results a killed pilot left
  python picas.py report --html report.html      a campaign report to open in a browser

exit status: 0 done, 1 error, 2 bad usage or settings, 3 no work found
(run, has-work), 4 this host looks broken: its tasks failed fast in a row (run),
128+N stopped by signal N (run).
"""


class UsageError(PicasError):
    """Bad command-line usage or settings: exit status 2."""


def _load_config_file(path):
    """Read the PICAS_* names from a picasconfig.py without running it if possible."""
    import ast
    names = ("PICAS_HOST_URL", "PICAS_DATABASE", "PICAS_USERNAME", "PICAS_PASSWORD")
    try:
        with open(path, "rb") as fh:
            source = fh.read()
        tree = ast.parse(source, path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UsageError("cannot read config file %s: %s" % (path, exc))
    found, dynamic = {}, False
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in names:
                    try:
                        value = ast.literal_eval(node.value)
                    except ValueError:
                        dynamic = True
                        continue
                    if value is not None and not isinstance(value, str):
                        raise UsageError("config file %s: %s must be a string"
                                         % (path, target.id))
                    found[target.id] = value
    if dynamic:
        # Upstream's newer picasconfig.py computes the values (decrypting the
        # password); that needs running it, and its own dependencies.
        import runpy
        try:
            values = runpy.run_path(path)
        except Exception as exc:
            raise UsageError("config file %s computes its values and running it failed: %r. "
                             "Set the PICAS_* environment variables instead." % (path, exc))
        found = dict((n, values.get(n)) for n in names if values.get(n) is not None)
    if found.get("PICAS_PASSWORD") and os.stat(path).st_mode & 0o044:
        log.warning("%s holds a password and other users can read it: chmod 600 %s", path, path)
    return found


def _find_config(explicit):
    if explicit:
        if not os.path.isfile(explicit):
            raise UsageError("config file %s does not exist" % explicit)
        return explicit
    for folder in [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]:
        path = os.path.join(folder, "picasconfig.py")
        if os.path.isfile(path):
            return path
    return None


def connection_settings(args, environ=None):
    """Resolve url, database, username and password: flags, then environment, then picasconfig.py."""
    env = os.environ if environ is None else environ
    config = {}
    path = _find_config(args.config)
    if path:
        config = _load_config_file(path)
        log.debug("read settings from %s", path)

    def pick(flag, name):
        return flag or env.get(name) or config.get(name)

    url = pick(args.url, "PICAS_HOST_URL")
    dbname = pick(args.db, "PICAS_DATABASE")
    user = pick(args.user, "PICAS_USERNAME")
    password = env.get("PICAS_PASSWORD") or config.get("PICAS_PASSWORD")
    if not url:
        raise UsageError("no server URL: use --url, PICAS_HOST_URL or a picasconfig.py")
    if not dbname:
        raise UsageError("no database name: use --db, PICAS_DATABASE or a picasconfig.py")
    if user and password is None and sys.stdin.isatty():
        import getpass
        password = getpass.getpass("CouchDB password for %s: " % user)
    return url, dbname, user, password


def _number(kind, minimum, inclusive=True):
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum`` (> when not inclusive)."""
    import argparse

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not %s" % (
                text, "a whole number" if kind is int else "a number"))
        if value != value or value in (float("inf"), float("-inf")) or \
                value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError("%r: must be %s %s" % (
                text, "at least" if inclusive else "more than", minimum))
        return value
    return convert


def _max_time(text):
    """--max-time: ``auto`` or a number of seconds."""
    return "auto" if text.strip().lower() == "auto" else _number(float, 0, False)(text)


def _exit_codes(text):
    """--retry-codes: a comma-separated list of exit codes 1-255 (empty for none)."""
    import argparse
    codes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 256:
            raise argparse.ArgumentTypeError(
                "%r: give exit codes from 1 to 255, separated by commas (e.g. 75,99)" % part)
        codes.append(int(part))
    return tuple(codes)


def _build_parser():
    import argparse
    prog = os.path.basename(sys.argv[0] or "") if sys.argv else ""
    parser = argparse.ArgumentParser(
        prog=prog if prog in ("picas", "picas.py") else "picas.py",
        description=__doc__.splitlines()[0], epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="picas.py " + __version__)
    parser.add_argument("--url", help="CouchDB server URL (https://host:6984)")
    parser.add_argument("--db", help="database name")
    parser.add_argument("--user", help="user name")
    parser.add_argument("--config", help="a picasconfig.py to read settings from")
    parser.add_argument("--design-doc", default="Monitor", metavar="NAME",
                        help="design document holding the views (default: Monitor)")
    parser.add_argument("--cafile", help="CA certificate file for https")
    parser.add_argument("--capath", help="CA certificate directory (X509_CERT_DIR is honoured)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's TLS certificate (unsafe)")
    parser.add_argument("--timeout", type=_number(float, 0, False), default=DEFAULT_TIMEOUT,
                        help="seconds per request (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("views", help="create or update the standard views")
    p.add_argument("--filter", metavar="JS", help='extra condition for every view, e.g. "doc.cores == 1"')
    p.add_argument("--create-db", action="store_true", help="create the database if it is missing")
    p.add_argument("--single-copy", action="store_true",
                   help="with --create-db: one copy of each document (n=1) on a cluster")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("push", help="create tokens from a file (one per line) or JSON")
    p.add_argument("file", help="a file, or - for standard input")
    p.add_argument("--json", action="store_true",
                   help="the file is a JSON array or JSON lines of token bodies")
    p.add_argument("--id-prefix", help="token ids are PREFIX-<n> (default: the file name and "
                   "a hash of its content, so pushing the same file again adds nothing)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("status", help="count tokens per state")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--watch", type=_number(float, 0, False), metavar="SECONDS",
                   help="refresh a progress line every SECONDS")
    p.add_argument("--errors", type=_number(int, 0), nargs="?", const=10, metavar="N",
                   help="also the failures per exit code and per host, and the latest N "
                   "error messages (default N: 10); reads every token")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("show", help="one token: state, fields, claims, errors, attachments")
    p.add_argument("id", help="the token's id")
    p.add_argument("--json", action="store_true", help="print the stored document as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("logs", help="print a token's task output (live while it runs)")
    p.add_argument("id", help="the token's id")
    p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing while the token runs, until it finishes")
    p.add_argument("--interval", type=_number(float, 0, False), default=5.0, metavar="S",
                   help="with --follow: seconds between looks (default: %(default)s)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("export", help="stream the tokens of a view as JSON lines or CSV")
    p.add_argument("view", help="todo, locked, done, error, all (every token), or Design/view")
    p.add_argument("--fields", metavar="A,B", help="only these fields, in this order; "
                   "a.b for nested ones, state for the token's state (CSV default: %s)"
                   % ",".join(EXPORT_CSV_FIELDS))
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl: one JSON object per line (default); csv: a header and rows")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("has-work", help="exit 0 when a view has tokens, 3 when not (for scripts)")
    p.add_argument("view", nargs="?", default="todo",
                   help="todo (default), another view, or Design/view")
    p.set_defaults(func=cmd_has_work)

    p = sub.add_parser("run", help="run a command for every token (the generic pilot)")
    p.add_argument("--view", default="todo", help="view to take tokens from (default: todo)")
    p.add_argument("--max-tasks", type=_number(int, 1), metavar="N", help="stop after N tokens")
    p.add_argument("--max-time", type=_max_time, default="auto", metavar="auto|S",
                   help="claim nothing after S seconds; auto (the default): the batch job's "
                   "end (SLURM, PBS/Torque, HTCondor, $PICAS_END_TIME) less %.0f s, if found"
                   % WALLTIME_RESERVE)
    p.add_argument("--max-token-time", type=_number(float, 0, False), metavar="S",
                   help="kill a task after S seconds (exit code 124)")
    p.add_argument("--max-scrub", type=_number(int, 0), default=0, metavar="N",
                   help="retry a failed token up to N times")
    p.add_argument("--retry-codes", type=_exit_codes, default=RETRY_EXIT_CODES, metavar="LIST",
                   help="task exit codes that mean 'try again later': back to todo, not "
                   "charged (default: %s; '' for none)" % ",".join(map(str, RETRY_EXIT_CODES)))
    p.add_argument("--max-retries", type=_number(int, 0), default=MAX_RETRIES, metavar="N",
                   help="a token given back with a retry code more than N times goes to "
                   "error (default: %(default)s)")
    p.add_argument("--poison-after", type=_number(int, 0), default=POISON_AFTER, metavar="N",
                   help="a token killed by --max-token-time N times goes to error for good "
                   "(default: %(default)s; 0: never)")
    p.add_argument("--black-hole", type=_number(int, 0), default=BLACK_HOLE, metavar="N",
                   help="stop (exit status 4) after N tasks in a row failed fast or with exit "
                   "code 126/127; their tokens go back to todo (default: %(default)s; 0: off)")
    p.add_argument("--fast-failure", type=_number(float, 0, False), default=FAST_FAILURE,
                   metavar="S", help="a failure within S seconds counts for --black-hole "
                   "(default: %(default)s)")
    p.add_argument("--endless", action="store_true", help="wait for new tokens when the view is empty")
    p.add_argument("--sleep", type=_number(float, 0, False), default=10.0, metavar="S",
                   help="with --endless: the first wait for new tokens; it doubles up to "
                   "60 s or S, whichever is more (default: %(default)s)")
    p.add_argument("--heartbeat", type=_number(float, 0), default=DEFAULT_HEARTBEAT, metavar="S",
                   help="seconds between heartbeats (default: %(default)s; 0: off)")
    p.add_argument("--grace", type=_number(float, 0), default=DEFAULT_GRACE, metavar="S",
                   help="seconds between SIGTERM and SIGKILL for a task (default: %(default)s)")
    p.add_argument("--log-limit", type=_number(int, 0), default=DEFAULT_LOG_LIMIT, metavar="BYTES",
                   help="bytes of each log kept in the token (default: %(default)s)")
    p.add_argument("--journal", metavar="DIR",
                   help="folder where finished results wait until the server holds them "
                   "(default: $PICAS_JOURNAL or ./%s)" % DEFAULT_JOURNAL)
    p.add_argument("--attach", action="append", default=[], metavar="GLOB",
                   help="attach the files matching GLOB in the task's working directory to "
                   "the token (repeatable; e.g. 'results/*.csv')")
    p.add_argument("--attach-limit", type=_number(int, 0), default=ATTACH_LIMIT,
                   metavar="BYTES", help="largest file --attach attaches "
                   "(default: %(default)s)")
    p.add_argument("--attach-total", type=_number(int, 0), default=ATTACH_TOTAL,
                   metavar="BYTES", help="most bytes --attach attaches to one token "
                   "(default: %(default)s)")
    p.add_argument("--workdir", nargs="?", const="", metavar="DIR",
                   help="run every token in a fresh folder inside DIR (default: the pilot's "
                   "temporary folder), removed once the result is saved")
    p.add_argument("--keep-workdir", action="store_true",
                   help="with --workdir: keep each token's folder")
    p.add_argument("task", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="save the results a pilot left in its journal")
    p.add_argument("journal", nargs="?", metavar="DIR",
                   help="the journal folder (default: $PICAS_JOURNAL or ./%s)" % DEFAULT_JOURNAL)
    p.set_defaults(func=cmd_replay)

    for name, what in (("reset", "send tokens in a view back to todo"),
                       ("delete", "delete the tokens in a view")):
        p = sub.add_parser(name, help=what)
        p.add_argument("view", help="locked, error, done, todo, or Design/view")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if name == "reset":
            group = p.add_mutually_exclusive_group()
            group.add_argument("--older-than", type=_number(float, 0), metavar="HOURS",
                               help="only tokens locked more than HOURS ago")
            group.add_argument("--stale", action="store_true",
                               help="only locked tokens whose pilot stopped its heartbeat")
            p.add_argument("--lease", type=_number(float, 0, False), metavar="S",
                           help="with --stale: a heartbeat older than S seconds is a dead pilot "
                                "(default: 3 x its interval + 60; never less than 2 x)")
            p.add_argument("--poison-after", type=_number(int, 0), default=POISON_AFTER,
                           metavar="N", help="with --stale: a token whose pilot died N times "
                           "goes to error as poison (default: %(default)s; 0: never)")
        p.set_defaults(func=cmd_reset if name == "reset" else cmd_delete)

    p = sub.add_parser("report", help="write a campaign report: one self-contained HTML page")
    p.add_argument("--html", metavar="FILE",
                   help="write the page to FILE (- for standard output); it opens from disk")
    p.add_argument("--json", action="store_true", help="print the report's figures as JSON")
    p.add_argument("--top", type=_number(int, 1), default=REPORT_TOP, metavar="N",
                   help="list the N slowest and N latest failed tokens (default: %(default)s)")
    p.set_defaults(func=cmd_report)
    return parser


def split_global_options(argv):
    """Return (picas.py's global options, the rest) of ``argv``, wherever the options stand.

    For the scripts in scripts/, which take ``--db NAME`` before or after
    their own arguments; ``picas.py`` itself wants global options first.
    Everything after ``--`` belongs to the rest.
    """
    takes_value = {}
    for action in _build_parser()._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    front, rest = [], []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0]
        if arg == "--":
            rest.append(arg)
            rest.extend(args)
        elif name in takes_value and name != "-h" and name != "--help":
            front.append(arg)
            if takes_value[name] and "=" not in arg:
                front.append(next(args, ""))
        elif len(arg) > 1 and arg[0] == "-" and set(arg[1:]) <= set("vq"):   # -vv, -q
            front.append(arg)
        else:
            rest.append(arg)
    return front, rest


def script_main(command, argv=None, rewrite=None):
    """Run ``picas.py COMMAND`` for a script in scripts/: global options may stand anywhere.

    ``rewrite(rest)`` may turn the script's own arguments into the command's.
    """
    front, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    return main(front + [command] + (rewrite(rest) if rewrite else rest))


def _setup_logging(verbose, quiet):
    """Send picas' log to stderr for the command line; return what to restore afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("picas: %(message)s"))
    saved = (handler, log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    return saved


def _restore_logging(saved):
    handler, level, propagate = saved
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def main(argv=None):
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--password" or a.startswith("--password=") for a in argv):
        print("picas.py: the password is never taken from the command line (it would show in "
              "`ps` and shell history): set PICAS_PASSWORD or use picasconfig.py", file=sys.stderr)
        return EXIT_USAGE
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.url and _split_url(args.url)[1] is not None:
        print("picas.py: --url holds a user name and password; the password is never taken "
              "from the command line: use --user and PICAS_PASSWORD", file=sys.stderr)
        return EXIT_USAGE
    saved = _setup_logging(args.verbose, args.quiet)
    try:
        url, dbname, user, password = connection_settings(args)
        try:
            server = Server(url, user, password, timeout=args.timeout,
                            verify=not args.insecure, cafile=args.cafile, capath=args.capath)
        except PicasError as exc:
            raise UsageError(str(exc))
        return args.func(args, server.database(dbname))
    except UsageError as exc:
        print("picas.py: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    except Unauthorized as exc:
        print("picas.py: the server refused the request (HTTP %d %s): check the user name and "
              "password (PICAS_USERNAME/PICAS_PASSWORD) and that the user may use this database"
              % (exc.status, exc.error or ""), file=sys.stderr)
        return EXIT_ERROR
    except PicasError as exc:
        print("picas.py: %s" % exc, file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("picas.py: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        _restore_logging(saved)


def _confirm(question, yes):
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError("%s -- not on a terminal, so not asking: add --yes" % question)
    answer = input("%s [y/N] " % question)
    return answer.strip().lower() in ("y", "yes")


def _require_db(db):
    if not db.exists():
        raise UsageError("database %r does not exist on %s: check --db / PICAS_DATABASE, or "
                         "create it with `python picas.py views --create-db`"
                         % (db.name, db.server.url))


def cmd_views(args, db):
    if args.create_db and not db.exists():
        db.server.create_database(db.name, n=1 if args.single_copy else None)
        log.info("created database %s", db.name)
    elif args.single_copy:
        log.warning("--single-copy applies only when --create-db creates the database; %s "
                    "exists and keeps its number of copies", db.name)
    _require_db(db)
    if args.filter is not None:
        _check_filter(args.filter)
    changed = db.ensure_design(args.design_doc, standard_views(args.filter))
    db.ensure_design(CONFLICTS_DESIGN, CONFLICTS_VIEWS)
    if args.filter is not None:
        # CouchDB reports a JavaScript error when the view is queried.
        try:
            db.view("%s/overview_total" % args.design_doc, limit=0)
        except HTTPError as exc:
            raise UsageError("the views with --filter %r do not work on the server (%s); fix "
                             "the condition and run views again" % (args.filter, exc))
    log.info("views in _design/%s %s: %s", args.design_doc,
             "created or updated" if changed else "already up to date",
             ", ".join(name for name, _ in _STATE_CONDITIONS) + ", overview_total")
    return EXIT_OK


def _check_filter(condition):
    """Refuse a --filter that is empty or would break out of its parentheses in the views."""
    depth, quote_char, escaped = 0, None, False
    for char in condition:
        if quote_char:
            if char == quote_char and not escaped:
                quote_char = None
            escaped = not escaped and char == "\\"
            continue
        if char in "\"'":
            quote_char = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                break
    if not condition.strip() or depth != 0 or quote_char:
        raise UsageError("--filter %r is not one JavaScript condition with balanced brackets "
                         "and quotes, e.g. \"doc.cores == 1\"" % condition)


def cmd_push(args, db):
    import hashlib
    _require_db(db)
    if args.file == "-":
        data = sys.stdin.buffer.read()
        stem = "stdin"
    else:
        try:
            with open(args.file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise UsageError("cannot read %s: %s" % (args.file, exc.strerror))
        stem = os.path.splitext(os.path.basename(args.file))[0] or "tokens"
    prefix = args.id_prefix or "%s-%s" % (stem, hashlib.sha1(data).hexdigest()[:8])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError("%s is not UTF-8 text (%s)" % (args.file, exc))
    if args.json:
        tokens = _parse_json_tokens(text, args.file)
        report = push_tokens(db, tokens=tokens, id_prefix=prefix)
    else:
        lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        report = push_tokens(db, lines=lines, id_prefix=prefix)
    print("created %d tokens%s%s" % (
        report["created"],
        ", %d already existed (pushed before)" % report["existing"] if report["existing"] else "",
        ", %d FAILED" % report["failed"] if report["failed"] else ""))
    for line in report["errors"][:20]:
        print("  failed: %s" % line, file=sys.stderr)
    return EXIT_ERROR if report["failed"] else EXIT_OK


def _parse_json_tokens(text, name):
    stripped = text.strip()
    if not stripped:
        return []
    try:
        if stripped.startswith("["):
            items = json.loads(stripped)
        else:
            items = [json.loads(line) for line in stripped.splitlines() if line.strip()]
    except ValueError as exc:
        raise UsageError("%s is not a JSON array or JSON lines: %s" % (name, exc))
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise UsageError("%s: token %d is not a JSON object" % (name, number))
    return items


class _IndexWatch(object):
    """Says so while a view query waits for CouchDB to build the view's index.

    A first query of a view on a large pool makes CouchDB index every token
    first (seconds to many minutes, in silence). After ``quiet`` seconds
    this logs that it is waiting, and then, every ``every`` seconds, the
    indexer's progress from ``_active_tasks`` where the server shows it
    (CouchDB does to admins). Used as ``with _IndexWatch(db, "Monitor"):``.
    """

    def __init__(self, db, design, quiet=2.0, every=10.0):
        self.db, self.design = db, design
        self.quiet, self.every = quiet, every
        self._done = threading.Event()
        self._thread = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, name="picas-index-watch")
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()

    def progress(self):
        """``(percent, changes done, changes in all)`` of the indexers of this design, or None."""
        try:
            tasks = self.db.server.request("GET", "/_active_tasks", retry=False, timeout=5)[2]
        except PicasError:
            return None
        done = total = 0
        found = False
        for task in tasks if isinstance(tasks, list) else []:
            shard = str(task.get("database", ""))
            if task.get("type") == "indexer" and \
                    task.get("design_document") == "_design/" + self.design and \
                    (shard == self.db.name or shard.rsplit("/", 1)[-1].split(".")[0] == self.db.name):
                found = True
                done += int(task.get("changes_done") or 0)
                total += int(task.get("total_changes") or 0)
        if not found:
            return None
        return (100.0 * done / total if total else 0.0), done, total

    def _watch(self):
        if self._done.wait(self.quiet):
            return
        log.info("waiting for CouchDB to build the index of _design/%s in %s (a first query "
                 "of a large pool indexes every token once; this can take minutes)",
                 self.design, self.db.name)
        while True:
            progress = self.progress()
            if progress is not None:
                log.info("indexing _design/%s: %.0f%% (%d of %d changes)", self.design, *progress)
            if self._done.wait(self.every):
                return


def cmd_status(args, db):
    """Counts per state; with --watch a progress line (finished of total, rate, ETA).

    On a terminal the watch line is rewritten in place; otherwise (a job's
    log file) a new line is printed at every refresh.
    """
    if args.errors is not None and args.watch:
        raise UsageError("status --errors reads every token: not with --watch (run it now "
                         "and then, e.g. watch -n 600 python picas.py status --errors)")
    _require_db(db)
    live = bool(args.watch) and not args.json and sys.stdout.isatty()
    first = None
    try:
        while True:
            with _IndexWatch(db, args.design_doc):
                counts = count_states(db, args.design_doc)
            conflicted = conflicted_tokens(db)
            uncertain = sorted(set(note["uncertain"] for note in db.pilot_notes()
                                   if note.get("uncertain")))
            failures = failure_summary(db, args.errors) if args.errors is not None else None
            if args.json:
                print(json.dumps(counts if failures is None else dict(counts, failures=failures),
                                 sort_keys=True), flush=True)
                if conflicted:
                    log.warning("%d tokens have conflicting revisions (a CouchDB cluster "
                                "split): `reset locked --stale` repairs them", len(conflicted))
                if uncertain:
                    log.warning("%d tokens have a lock whose outcome a pilot does not know yet "
                                "(a degraded cluster answered 202): %s", len(uncertain),
                                ", ".join(uncertain[:10]))
            else:
                total = sum(counts.values())
                line = "todo %(todo)d  locked %(locked)d  done %(done)d  error %(error)d" % counts
                line += "  (%d tokens)" % total
                if uncertain:
                    line += "  UNCERTAIN %d (%s%s: pilots wait for the cluster)" % (
                        len(uncertain), ", ".join(uncertain[:3]), "..." if len(uncertain) > 3 else "")
                if conflicted:
                    line += "  CONFLICTED %d (reset locked --stale repairs them)" % len(conflicted)
                elif conflicted is None and first is None:
                    log.info("conflicting revisions not checked: the database has no "
                             "_design/%s view (python picas.py views adds it)", CONFLICTS_DESIGN)
                now = time.time()
                finished = counts["done"] + counts["error"]
                if args.watch:
                    line += "  finished %d of %d (%.0f%%)" % (
                        finished, total, 100.0 * finished / total if total else 100.0)
                if first is not None and now > first[0]:
                    rate = (finished - first[1]) / (now - first[0])
                    left = counts["todo"] + counts["locked"]
                    line += "  %.2f tokens/s" % rate
                    if rate > 0 and left:
                        line += ", ETA %s" % _duration(left / rate)
                if first is None:
                    first = (now, finished)
                if live:
                    sys.stdout.write("\r\x1b[K" + line)
                    sys.stdout.flush()
                else:
                    print(line, flush=True)
                if failures is not None:
                    _print_failures(failures, args.errors)
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)
    finally:
        if live:
            sys.stdout.write("\n")


def _shown(value):
    """``value`` as text safe for a terminal: control characters (escape sequences a
    hostile token id or message could hold) are shown as ``\\xNN``."""
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256 else
                   "\\u%04x" % ord(c) for c in text)


def _print_failures(failures, latest):
    """The text of ``status --errors``: exit codes, hosts, latest messages."""
    codes = sorted(failures["exit_codes"].items(),
                   key=lambda kv: (-kv[1]["error"] - kv[1]["todo"], kv[0]))
    print("\n%d tokens in error. Failures per exit code (in error / back in todo after a "
          "failed run):" % failures["error_tokens"])
    for code, row in codes:
        meaning = exit_meaning(code)
        print("  %7d  %7d   exit code %s%s" % (row["error"], row["todo"], _shown(code),
                                              " (%s)" % meaning if meaning else ""))
    hosts = sorted(failures["hosts"].items(),
                   key=lambda kv: (-kv[1]["error"] - kv[1]["failed_hosts"], kv[0]))
    if hosts:
        print("\nPer host (tokens in error that last ran there / tokens its pilots gave back "
              "as a black hole / error messages written there):")
        for name, row in hosts:
            print("  %7d  %7d  %7d   %s%s" % (
                row["error"], row["failed_hosts"], row["messages"], _shown(name),
                "   <- looks broken (failed_hosts)" if row["failed_hosts"] else ""))
    if latest:
        print("\nThe latest %d error messages, newest first:" % len(failures["latest"]))
        for item in failures["latest"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item["time"])) \
                if item["time"] else "(no time)          "
            print("  %s  %s  [%s, %s, exit %s]  %s" % (
                when, _shown(item["id"]), item["state"] or "?", _shown(item["hostname"] or "?"),
                _shown(item["exit_code"]) if item["exit_code"] not in (None, "") else "-",
                _shown(item["message"])))


def _duration(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return "%d s" % seconds
    if seconds < 7200:
        return "%d min" % (seconds // 60)
    return "%.1f h" % (seconds / 3600.0)


def _token_or_fail(db, token_id):
    doc = db.get(token_id, conflicts=True)
    if doc is None:
        raise PicasError("no token %r in database %s (ids are exact: `python picas.py export "
                         "all --fields _id` lists them)" % (token_id, db.name))
    return doc


def _when(value, form="%Y-%m-%d %H:%M:%S UTC"):
    """A unix time (a token field: any type) as UTC text, or '-'."""
    stamp = _js_number(value)
    return time.strftime(form, time.gmtime(stamp)) if stamp else "-"


#: The fields ``show`` prints in its own words (the rest are listed as they are).
_SHOWN_FIELDS = ("_id", "_rev", "type", "lock", "done", "hostname", "exit_code", "input",
                 "error", "scrub_count", "pilot_id", "claim_id", "heartbeat",
                 "heartbeat_interval", "run_seconds", "retries", "timeouts", "lost_pilots",
                 "poison", "failed_hosts", "live_log", "_attachments", "_conflicts") + \
    _JOB_ID_FIELDS


def cmd_show(args, db):
    """One token in words: state, claim, counters, other fields, history, attachments."""
    _require_db(db)
    doc = _token_or_fail(db, args.id)
    if args.json:
        print(json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False))
        return EXIT_OK
    state = token_state(doc)
    out = []
    out.append("token %s  (revision %s)" % (_shown(doc["_id"]), doc.get("_rev")))
    out.append("  state        %s" % (state or "in no standard view (type %r, lock %r, done %r)"
                                      % (doc.get("type"), doc.get("lock"), doc.get("done"))))
    out.append("  input        %s" % _one_line(_shown(doc.get("input")), 500))
    if state in ("locked", "done", "error"):
        out.append("  claimed      %s on %s%s" % (
            _when(doc.get("lock")), _shown(doc.get("hostname") or "?"),
            " by pilot %s" % _shown(doc["pilot_id"]) if doc.get("pilot_id") else ""))
        jobs = ["%s %s" % (f.replace("_job_id", ""), _shown(doc[f]))
                for f in _JOB_ID_FIELDS if doc.get(f)]
        if jobs:
            out.append("  batch job    %s" % ", ".join(jobs))
    if state == "locked":
        beat = _js_number(doc.get("heartbeat"))
        out.append("  heartbeat    %s" % ("%s (%s ago; every %s s)" % (
            _when(beat), _duration(max(0, time.time() - beat)),
            _shown(doc.get("heartbeat_interval", "?"))) if beat else "none (an upstream pilot, or "
            "heartbeats off): reset --stale --lease S decides by the lock time"))
        if is_stale(doc):
            out.append("               STALE: its pilot looks dead; `reset locked --stale` "
                       "frees it")
    if state in ("done", "error"):
        code = doc.get("exit_code")
        meaning = exit_meaning(code)
        out.append("  finished     %s, exit code %s%s%s" % (
            _when(doc.get("done")), _shown(code), " (%s)" % meaning if meaning else "",
            ", ran %s s" % _shown(doc["run_seconds"]) if doc.get("run_seconds") is not None
            else ""))
    counters = ["%s %s" % (f, _shown(doc[f])) for f in ("scrub_count", "retries", "timeouts",
                                                        "lost_pilots") if doc.get(f)]
    if counters:
        out.append("  attempts     %s" % ", ".join(counters))
    if doc.get("poison"):
        out.append("  poison       %s" % _shown(doc["poison"]))
    if _failed_hosts(doc):
        out.append("  failed on    %s (black-hole hosts: pilots there pass it over; "
                   "`reset` clears it)" % ", ".join(map(_shown, _failed_hosts(doc))))
    if doc.get("_conflicts"):
        out.append("  CONFLICTED   %d other revisions (a cluster split): `reset locked "
                   "--stale` repairs it" % len(doc["_conflicts"]))
    others = sorted(k for k in doc if k not in _SHOWN_FIELDS)
    if others:
        out.append("  other fields")
        for key in others:
            out.append("    %-12s %s" % (_shown(key), _one_line(_shown(doc[key]), 300)))
    claims, missing = token_history(db, doc)
    out.append("  claims       %d seen in the revisions the server still holds%s" % (
        len(claims), " (%d older revisions were compacted away)" % missing if missing else ""))
    for claim in claims:
        out.append("    %s  %-10s on %s%s%s" % (
            _when(claim["lock"]), claim["state"], _shown(claim["hostname"] or "?"),
            ", exit code %s" % _shown(claim["exit_code"])
            if claim["state"] != "locked" and claim["exit_code"] not in (None, "") else "",
            " (pilot %s)" % _shown(claim["pilot_id"]) if claim["pilot_id"] else ""))
    errors = _error_entries(doc)
    out.append("  errors       %d" % len(errors))
    for entry in errors:
        out.append("    %s  %s%s" % (_when(entry.get("time")), _one_line(_shown(
            entry.get("message")), 500), " (on %s)" % _shown(entry["hostname"])
            if entry.get("hostname") else ""))
    attachments = doc.get("_attachments") or {}
    out.append("  attachments  %d" % len(attachments))
    for name in sorted(attachments):
        info = attachments[name] if isinstance(attachments[name], dict) else {}
        out.append("    %-40s %9s bytes  %s" % (_shown(name), _shown(info.get("length", "?")),
                                                 _shown(info.get("content_type", ""))))
    live = doc.get("live_log")
    if live:
        out.append("  live output  %s (python picas.py logs %s --follow)" % (
            _when(live.get("time") if isinstance(live, dict) else None),
            _shell_word(doc["_id"])))
    print("\n".join(out))
    return EXIT_OK


def _shell_word(text):
    import shlex
    return shlex.quote(_shown(text))


def _log_name(doc, err):
    """The attachment holding a token's stdout (or stderr): ``logs_<id>.out`` as
    picas.py names it, else the only ``*.out``/``.err`` (or ``.log``) attached."""
    attachments = doc.get("_attachments") or {}
    ext = ".err" if err else ".out"
    mine = "logs_%s%s" % (doc["_id"], ext)
    if mine in attachments:
        return mine
    found = sorted(n for n in attachments if n.endswith(ext)) or \
        (sorted(n for n in attachments if n.endswith(".log")) if not err else [])
    return found[0] if len(found) == 1 else None


def _new_text(before, now):
    """What ``now`` (the latest tail of a log) adds to ``before`` (an earlier tail);
    ``(text, gap)``, gap True when output was lost between the two looks."""
    if not before:
        return now, False
    if now.startswith(before):
        return now[len(before):], False
    probe = before[-256:]
    at = now.rfind(probe)
    if at < 0:
        return now, True
    return now[at + len(probe):], False


def cmd_logs(args, db):
    """A token's stdout/stderr: the attached log once it ran, the live tail while it runs."""
    _require_db(db)
    stream = "err" if args.err else "out"
    write = _stdout_writer()
    shown, waiting = "", False
    while True:
        doc = _token_or_fail(db, args.id)
        state = token_state(doc)
        live = doc.get("live_log") if state == "locked" else None
        if state == "locked":
            tail = live.get(stream) if isinstance(live, dict) else None
            if isinstance(tail, str):
                text, gap = _new_text(shown, tail)
                if not shown:
                    log.info("token %s is running on %s; the last %d characters of its %s as "
                             "of %s:", _shown(doc["_id"]), _shown(doc.get("hostname") or "?"),
                             len(tail), "stderr" if args.err else "stdout",
                             _when(live.get("time")))
                if gap:
                    write("\n[... more output than one look holds was skipped ...]\n")
                write(text)
                shown = tail
            elif args.follow and not waiting:
                log.info("token %s is running on %s; its pilot has sent no live output yet "
                         "(it comes with the heartbeat; older pilots send none)",
                         _shown(doc["_id"]), _shown(doc.get("hostname") or "?"))
                waiting = True
            elif not args.follow:
                raise PicasError("token %s is running on %s, and its pilot sends no live "
                                 "output (an older picas.py, an upstream pilot, or heartbeats "
                                 "off); the logs are attached when it finishes"
                                 % (_shown(doc["_id"]), _shown(doc.get("hostname") or "?")))
            if not args.follow:
                return EXIT_OK
            time.sleep(args.interval)
            continue
        name = _log_name(doc, args.err)
        if state == "todo" and args.follow and not shown and name is None:
            if not waiting:
                log.info("token %s is in todo: waiting for a pilot to claim it",
                         _shown(doc["_id"]))
                waiting = True
            time.sleep(args.interval)
            continue
        if name is None:
            if shown:
                log.info("token %s is %s now; it has no attached log", _shown(doc["_id"]),
                         state)
                return EXIT_OK
            raise PicasError("token %s has no attached %s (state %s%s)" % (
                _shown(doc["_id"]), "stderr" if args.err else "stdout", state or "none",
                ": it has not run yet" if state == "todo" else ""))
        data = db.get_attachment(doc, name, b"")
        text = data.decode("utf-8", "replace")
        if shown:
            rest, gap = _new_text(shown, text)
            if gap:
                write("\n[... the finished log follows in full ...]\n")
            write(rest)
            log.info("token %s finished: %s, exit code %s", _shown(doc["_id"]), state,
                     _shown(doc.get("exit_code")))
        else:
            sys.stdout.flush()
            getattr(sys.stdout, "buffer", sys.stdout).write(data)
        return EXIT_OK


def _stdout_writer():
    """Writes the live tail: UTF-8 whatever the locale (a lone surrogate as U+FFFD), and
    on a terminal with control characters other than newline and tab escaped (the
    tail is a token field anyone who can write the database can set)."""
    terminal = sys.stdout.isatty()

    def write(text):
        if terminal:
            text = "".join(c if c in "\n\t" or c.isprintable() else _shown(c) for c in text)
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            sys.stdout.write(text)
        else:
            out.write(text.encode("utf-8", "replace"))
            out.flush()
    return write


#: The columns of ``export --format csv`` when --fields does not say.
EXPORT_CSV_FIELDS = ("_id", "state", "input", "exit_code", "hostname", "lock", "done",
                     "run_seconds", "scrub_count")


def _field(doc, path):
    """``doc``'s value at ``path`` ("output.energy"); ``state`` is the token's state."""
    if path == "state" and "state" not in doc:
        return token_state(doc)
    value = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def cmd_export(args, db):
    """Stream tokens as JSON lines or CSV, page by page (any size of pool)."""
    import csv
    import io
    _require_db(db)
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    if args.fields is not None and not fields:
        raise UsageError("--fields %r names no field: give names separated by commas, e.g. "
                         "--fields _id,exit_code,output.energy" % args.fields)
    if args.format == "csv" and fields is None:
        fields = list(EXPORT_CSV_FIELDS)
    view = None if args.view == "all" else args.view
    if view is not None:
        name = view if "/" in view else "%s/%s" % (args.design_doc, view)
        with _IndexWatch(db, name.partition("/")[0]):
            db.view(name, limit=0)            # a missing view fails here, before any output
    if args.output:
        try:
            target = io.open(args.output, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError("cannot write %s: %s" % (args.output, exc.strerror))
    else:
        # UTF-8 whatever the locale says (Python 3.6 under LANG=C would refuse "é").
        sys.stdout.flush()
        target = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    count = 0
    try:
        writer = csv.writer(target, lineterminator="\n") if args.format == "csv" else None
        if writer:
            writer.writerow(fields)
        for doc in iter_tokens(db, view, args.design_doc):
            doc.pop("_attachments", None)
            if writer:
                writer.writerow([_csv_cell(_field(doc, f)) for f in fields])
            else:
                row = doc if fields is None else dict((f, _field(doc, f)) for f in fields)
                target.write(json.dumps(row, sort_keys=fields is None, ensure_ascii=False))
                target.write("\n")
            count += 1
        target.flush()
    except BrokenPipeError:
        # `export done | head`: the reader has what it wanted; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if args.output:
            target.close()
        else:
            try:
                target.detach()
            except (ValueError, OSError):
                pass
    log.info("exported %d tokens from %s%s", count, args.view,
             " to %s" % args.output if args.output else "")
    return EXIT_OK


def cmd_has_work(args, db):
    """Exit 0 when the view holds tokens, 3 when it is empty."""
    _require_db(db)
    name = args.view if "/" in args.view else "%s/%s" % (args.design_doc, args.view)
    with _IndexWatch(db, name.partition("/")[0]):
        result = db.view(name, limit=1)
    total = result.get("total_rows")
    if not result.get("rows"):
        log.info("%s has no tokens", name)
        return EXIT_NO_WORK
    log.info("%s holds %s tokens", name, total if total is not None else "some")
    return EXIT_OK


def _check_command(command):
    import shutil
    if not command:
        raise UsageError("no command to run: python picas.py run -- ./process_task.sh")
    exe = command[0]
    if os.sep in exe:
        if not os.path.exists(exe):
            raise UsageError("command %s does not exist" % exe)
        if os.path.isdir(exe) or not os.access(exe, os.X_OK):
            raise UsageError("command %s is not executable: chmod +x %s" % (exe, exe))
    elif shutil.which(exe) is None:
        raise UsageError("command %r not found on PATH" % exe)


def _check_outputs(args):
    """--attach, --workdir and --keep-workdir: refused before anything is claimed."""
    for pattern in args.attach:
        try:
            check_attach_pattern(pattern)
        except ValueError as exc:
            raise UsageError(str(exc))
    if args.keep_workdir and args.workdir is None:
        raise UsageError("--keep-workdir needs --workdir (without it the task runs in the "
                         "pilot's folder, which is never removed)")
    if args.workdir:
        try:
            os.makedirs(args.workdir, exist_ok=True)
        except OSError as exc:
            raise UsageError("--workdir %s: cannot create it (%s)" % (args.workdir,
                                                                     exc.strerror or exc))
        if not os.access(args.workdir, os.W_OK | os.X_OK):
            raise UsageError("--workdir %s: not writable by this user" % args.workdir)


def cmd_run(args, db):
    command = args.task[1:] if args.task[:1] == ["--"] else args.task
    _check_command(command)
    _check_outputs(args)
    view = args.view if "/" in args.view else "%s/%s" % (args.design_doc, args.view)
    actor = CommandActor(db, command, log_limit=args.log_limit, view=args.view,
                         design_doc=args.design_doc, heartbeat=args.heartbeat, grace=args.grace,
                         journal=args.journal, retry_exit_codes=args.retry_codes,
                         max_retries=args.max_retries, poison_after=args.poison_after,
                         black_hole=args.black_hole, fast_failure=args.fast_failure,
                         attach=args.attach, attach_limit=args.attach_limit,
                         attach_total=args.attach_total, workdir=args.workdir,
                         keep_workdir=args.keep_workdir)
    if args.endless:
        actor.iterator = EndlessViewIterator(actor.iterator, sleep_sec=args.sleep)
    # The first window read is also the check that the database and the view
    # exist: it fails here, before anything is claimed.
    with _IndexWatch(db, view.partition("/")[0]):
        try:
            actor.iterator.prime()
        except NotFound:
            _require_db(db)
            raise
    log.info("pilot %s claiming from %s in %s", actor.pilot_id, view, db.name)
    try:
        actor.run(max_token_time=args.max_token_time, max_total_time=args.max_time,
                  max_tasks=args.max_tasks, max_scrub=args.max_scrub)
    except SystemExit as exc:
        log.warning("pilot stopped by signal %d after %d tokens", exc.code - 128,
                    actor.tasks_processed)
        return exc.code
    log.info("pilot finished: %d runs (%d done, %d error, %d back to todo for a retry)",
             actor.tasks_processed, actor.results["done"], actor.results["error"],
             actor.results["todo"])
    if actor.host_failure:
        log.error("pilot stopped: this host looks broken (%s); exit status %d",
                  actor.host_failure, EXIT_BLACK_HOLE)
        return EXIT_BLACK_HOLE
    return EXIT_OK if actor.tasks_processed else EXIT_NO_WORK


def cmd_replay(args, db):
    """Save the results left in a journal folder; exit 1 while some stay."""
    _require_db(db)
    journal = Journal(args.journal)
    if not os.path.isdir(journal.directory):
        raise UsageError("%s is not a folder: name the journal folder a pilot left "
                         "(default ./%s)" % (journal.directory, DEFAULT_JOURNAL))
    waiting = len(journal.entries())
    counts = replay_journal(db, journal)
    print("replayed %d journal entries from %s: %d saved, %d already in the database, %d kept "
          "in the error list of a token another claim had, %d of deleted tokens set aside, "
          "%d left" % (waiting, journal.directory, counts["saved"], counts["already"],
                       counts["in_error_list"], counts["deleted"], counts["left"]))
    if counts["left"]:
        print("picas.py: %d entries stay in %s (see the messages above); run replay again "
              "later" % (counts["left"], journal.directory), file=sys.stderr)
        return EXIT_ERROR
    journal.tidy()
    return EXIT_OK


def cmd_reset(args, db):
    _require_db(db)
    if args.stale:
        return _reset_stale(args, db)
    older = args.older_than * 3600 if args.older_than is not None else None
    docs = list(select_tokens(db, args.view, args.design_doc, older_than=older))
    if not docs:
        print("no tokens to reset in %s" % args.view)
        return EXIT_OK
    if not _confirm("reset %d tokens in %s to todo?" % (len(docs), args.view), args.yes):
        return EXIT_OK
    changed, conflicts = bulk_apply(db, docs, _operator_reset)
    print("reset %d tokens to todo%s" % (changed, ", %d changed meanwhile and were left alone"
                                         % conflicts if conflicts else ""))
    return EXIT_OK


def _operator_reset(doc):
    """``reset VIEW``: a scrub that also forgets the hosts the token failed on (an
    operator who resets means "try again everywhere"); ``reset --stale`` keeps them."""
    doc.pop("failed_hosts", None)
    return scrub_token(doc)


def _reset_stale(args, db):
    """reset --stale: free tokens of dead pilots, and repair conflicted tokens."""
    now = time.time()
    docs = dict((d["_id"], d) for d in select_tokens(db, args.view, args.design_doc, stale=True,
                                                     now=now, lease=args.lease))
    for doc_id in conflicted_tokens(db) or []:
        if doc_id not in docs:
            doc = db.get(doc_id, conflicts=True)
            if doc is not None:
                docs[doc_id] = doc
    plans = [plan for plan in (repair_plan(db, doc, now, args.lease, args.poison_after)
                               for doc in docs.values()) if plan]
    if not plans:
        print("no stale tokens in %s" % args.view)
        return EXIT_OK
    kept = [d for plan in plans for d in plan if not d.get("_deleted")]
    poisoned = sum(1 for d in kept if token_state(d) == "error")
    resets = len(kept) - poisoned
    removed = sum(len(plan) for plan in plans) - len(kept)
    poison = (" and put %d in error as poison (pilots died running them %d times)"
              % (poisoned, args.poison_after) if poisoned else "")
    question = "reset %d stale tokens to todo%s%s?" % (
        resets, poison, " and remove %d revisions of dead pilots' locks" % removed
        if removed else "")
    if not _confirm(question, args.yes):
        return EXIT_OK
    changed, conflicts = bulk_apply(db, plans, lambda plan: plan)
    print("reset %d stale tokens to todo%s%s%s" % (
        resets, poison, ", removed %d conflicting revisions" % removed if removed else "",
        ", %d writes met changes and were left alone" % conflicts if conflicts else ""))
    return EXIT_OK


def cmd_delete(args, db):
    _require_db(db)
    docs = list(select_tokens(db, args.view, args.design_doc))
    if not docs:
        print("no tokens to delete in %s" % args.view)
        return EXIT_OK
    if not _confirm("delete %d tokens in %s?" % (len(docs), args.view), args.yes):
        return EXIT_OK
    changed, conflicts = bulk_apply(db, docs, _tombstone)
    print("deleted %d tokens%s" % (changed, ", %d changed meanwhile and were left alone"
                                   % conflicts if conflicts else ""))
    return EXIT_OK


# The campaign report ##########################################################

#: Tokens listed in the report's tables of slowest and failed tokens (``report --top``).
REPORT_TOP = 20
#: The report's run-time quantiles come from a histogram whose bins are this
#: ratio wide (1 %): memory does not grow with the pool, the error stays under 1 %.
_RUNTIME_RATIO = 1.01
#: The widths (seconds) of the finished-over-time buckets: 1 s at first, the next
#: one whenever there are more than _MAX_BUCKETS of them (each width divides the
#: next, so buckets merge exactly; a year's campaign ends with 6 h buckets).
_BUCKET_SECONDS = (1, 2, 10, 60, 120, 600, 1800, 3600, 7200, 21600, 86400, 7 * 86400)
_MAX_BUCKETS = 2000
#: Characters of a failed token's last error message the report keeps.
_MESSAGE_CHARS = 400
#: Distinct host names and exit codes the report counts one by one; any more
#: (a pool where every token names another host) are counted together.
_MAX_DISTINCT = 10000


def _number_or_none(value):
    """A finite number (not a bool) as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _last_error(doc):
    """The last error message of a token, or what its exit code says."""
    errors = doc.get("error")
    if isinstance(errors, list) and errors:
        entry = errors[-1]
        message = entry.get("message") if isinstance(entry, dict) else entry
        if message not in (None, ""):
            return message if isinstance(message, str) else json.dumps(message)
    elif isinstance(errors, str) and errors:
        return errors
    if doc.get("poison"):
        return "poison: %s" % doc["poison"]
    return "exit code %s" % doc.get("exit_code")


class _Figures(object):
    """Collects a report's figures one token at a time; memory stays bounded.

    Kept are counters, a histogram of run times (bins _RUNTIME_RATIO wide),
    finished tokens per time bucket (widening as needed), and the ``top``
    slowest and latest failed tokens: never the documents themselves.
    """

    def __init__(self, top, now):
        self.top, self.now = top, now
        self.read = {"done": 0, "error": 0}
        self.width, self.buckets = _BUCKET_SECONDS[0], {}    # bucket -> [done, error]
        self.first_lock = self.first_done = self.last_done = None
        self.last_hour = 0
        self.runtime_bins, self.runtime_zero = {}, 0         # log bin -> count
        self.runtime_count, self.runtime_sum = 0, 0.0
        self.runtime_min = self.runtime_max = None
        self.hosts, self.codes = {}, {}
        self.slowest, self.failed = [], []                   # heaps
        self.other = {"scrubbed": 0, "poison": 0, "timed_out": 0, "retried": 0,
                      "without_run_seconds": 0}

    def add(self, doc, state):
        import heapq
        import math
        self.read[state] += 1
        done = _number_or_none(_js_number(doc.get("done")))
        lock = _number_or_none(_js_number(doc.get("lock")))
        if lock and (self.first_lock is None or lock < self.first_lock):
            self.first_lock = lock
        if done:
            self.first_done = done if self.first_done is None else min(self.first_done, done)
            self.last_done = done if self.last_done is None else max(self.last_done, done)
            if done > self.now - 3600:
                self.last_hour += 1
            slot = self.buckets.setdefault(int(done // self.width), [0, 0])
            slot[state == "error"] += 1
            if len(self.buckets) > _MAX_BUCKETS:
                self._widen()
        host = doc.get("hostname")
        host = host if isinstance(host, str) and host else "(unknown)"
        if host not in self.hosts and len(self.hosts) >= _MAX_DISTINCT:
            host = "(other hosts)"
        counts = self.hosts.setdefault(host, [0, 0, 0])
        counts[state == "error"] += 1
        for name in set(_failed_hosts(doc)):
            # A host that gave this token back as a black hole before it ran elsewhere.
            if name not in self.hosts and len(self.hosts) >= _MAX_DISTINCT:
                name = "(other hosts)"
            self.hosts.setdefault(name, [0, 0, 0])[2] += 1
        for field, key in (("scrub_count", "scrubbed"), ("timeouts", "timed_out"),
                           ("retries", "retried")):
            if (_number_or_none(doc.get(field)) or 0) > 0:
                self.other[key] += 1
        if doc.get("poison"):
            self.other["poison"] += 1
        seconds = _number_or_none(doc.get("run_seconds"))
        tid = doc.get("_id", "")
        if state == "done":
            if seconds is None or not 0 <= seconds < 1e12:
                self.other["without_run_seconds"] += 1
            else:
                self.runtime_count += 1
                self.runtime_sum += seconds
                self.runtime_min = seconds if self.runtime_min is None else \
                    min(self.runtime_min, seconds)
                self.runtime_max = seconds if self.runtime_max is None else \
                    max(self.runtime_max, seconds)
                if seconds > 0:
                    b = int(math.floor(math.log(seconds) / math.log(_RUNTIME_RATIO)))
                    self.runtime_bins[b] = self.runtime_bins.get(b, 0) + 1
                else:
                    self.runtime_zero += 1
                item = (seconds, tid, host, done)
                if len(self.slowest) < self.top:
                    heapq.heappush(self.slowest, item)
                elif item > self.slowest[0]:
                    heapq.heapreplace(self.slowest, item)
        else:
            code = _parse_int(doc.get("exit_code"))
            key = "none" if code is None else str(code)
            if key not in self.codes and len(self.codes) >= _MAX_DISTINCT:
                key = "other"
            self.codes[key] = self.codes.get(key, 0) + 1
            message = _last_error(doc)
            if len(message) > _MESSAGE_CHARS:
                message = message[:_MESSAGE_CHARS] + "..."
            errors = doc.get("error")
            item = (done or 0, tid, host, key, message,
                    len(errors) if isinstance(errors, list) else 0, seconds)
            if len(self.failed) < self.top:
                heapq.heappush(self.failed, item)
            elif item[:2] > self.failed[0][:2]:
                heapq.heapreplace(self.failed, item)

    def _widen(self):
        while len(self.buckets) > _MAX_BUCKETS:
            wider = [w for w in _BUCKET_SECONDS if w > self.width]
            wider = wider[0] if wider else self.width * 2
            merged = {}
            for key, (done, error) in self.buckets.items():
                slot = merged.setdefault(key * self.width // wider, [0, 0])
                slot[0] += done
                slot[1] += error
            self.width = wider
            self.buckets = merged

    def quantile(self, q):
        """The nearest-rank ``q`` quantile of the done run times (within 1 %), or None."""
        if not self.runtime_count:
            return None
        rank = max(1, int(-(-q * self.runtime_count // 1)))   # ceil(q * n)
        if rank <= self.runtime_zero:
            return 0.0
        seen = self.runtime_zero
        for b in sorted(self.runtime_bins):
            seen += self.runtime_bins[b]
            if seen >= rank:
                value = _RUNTIME_RATIO ** (b + 0.5)
                return min(max(value, self.runtime_min), self.runtime_max)
        return self.runtime_max

    def histogram(self, bins=20):
        """``[[low, high, count], ...]`` over the done run times: linear bins, or
        logarithmic ones when the run times span more than a factor 50."""
        if not self.runtime_count:
            return []
        import math
        lo, hi = self.runtime_min, self.runtime_max
        logarithmic = lo > 0 and hi / lo > 50
        if logarithmic:
            edges = [lo * (hi / lo) ** (i / float(bins)) for i in range(bins + 1)]
        else:
            step = _nice_step((hi - lo) / float(bins)) if hi > lo else 1.0
            start = math.floor(lo / step) * step
            count = max(1, int(math.ceil((hi - start) / step + 1e-9)))
            if start + count * step <= hi:
                count += 1
            edges = [start + i * step for i in range(count + 1)]
        counts = [0] * (len(edges) - 1)

        def place(value, n):
            i = 0
            if logarithmic:
                i = int(math.log(value / lo) / math.log(hi / lo) * bins) if value > lo else 0
            elif edges[-1] > edges[0]:
                i = int((value - edges[0]) / (edges[1] - edges[0]))
            counts[min(max(i, 0), len(counts) - 1)] += n
        if self.runtime_zero:
            place(0.0, self.runtime_zero)
        for b, n in self.runtime_bins.items():
            place(min(max(_RUNTIME_RATIO ** (b + 0.5), lo), hi), n)
        return [[edges[i], edges[i + 1], counts[i]] for i in range(len(counts))]

    def result(self):
        finished = self.read["done"] + self.read["error"]
        span = (self.last_done - (self.first_lock or self.first_done)) \
            if self.last_done is not None else 0
        n = self.runtime_count
        return {
            "finished": {
                "tokens": finished, "first_lock": self.first_lock,
                "first_done": self.first_done, "last_done": self.last_done,
                "bucket_seconds": self.width,
                "buckets": [[key * self.width] + self.buckets[key]
                            for key in sorted(self.buckets)]},
            "rate": {"overall_per_hour": 3600.0 * finished / span if span > 0 else None,
                     "last_hour": self.last_hour},
            "run_seconds": {
                "count": n, "min": self.runtime_min, "max": self.runtime_max,
                "mean": self.runtime_sum / n if n else None,
                "median": self.quantile(0.5), "p90": self.quantile(0.9),
                "histogram": self.histogram(),
                "without_run_seconds": self.other["without_run_seconds"]},
            "hosts": sorted(({"host": h, "done": c[0], "error": c[1], "black_hole": c[2]}
                             for h, c in self.hosts.items()),
                            key=lambda r: (-r["error"] - r["black_hole"], -r["done"],
                                           r["host"])),
            "exit_codes": sorted(({"exit_code": c, "tokens": n, "meaning": exit_meaning(c)}
                                  for c, n in self.codes.items()),
                                 key=lambda r: (-r["tokens"], r["exit_code"])),
            "slowest": [{"id": tid, "run_seconds": s, "hostname": host, "done": done}
                        for s, tid, host, done in sorted(
                            self.slowest, key=lambda i: (-i[0], i[1]))],
            "failed": [{"id": tid, "done": done or None, "hostname": host, "exit_code": code,
                        "message": message, "errors": count, "run_seconds": seconds}
                       for done, tid, host, code, message, count, seconds in sorted(
                           self.failed, key=lambda i: (-i[0], i[1]))],
            "tokens_with": dict((k, v) for k, v in self.other.items()
                                if k != "without_run_seconds"),
        }


def campaign_figures(db, design_doc="Monitor", top=REPORT_TOP, now=None, batch=500,
                     counts=None):
    """Gather the figures of a campaign report from ``db``: a JSON-able dict.

    Counts per state come from ``overview_total``; the done and error
    tokens are read page by page from the ``done`` and ``error`` views, and
    only what the report shows is kept (see :class:`_Figures`), so any pool
    size fits in memory (``batch`` tokens per request). ``now`` (unix time)
    is the report's time; ``counts`` the :func:`count_states` already read.
    """
    now = time.time() if now is None else now
    counts = count_states(db, design_doc) if counts is None else counts
    figures = _Figures(top, now)
    for state in ("done", "error"):
        for doc in iter_tokens(db, state, design_doc, batch):
            figures.add(doc, state)
    result = figures.result()
    result.update({
        "database": db.name, "server": redact_url(db.server.url), "design_doc": design_doc,
        "generated": now, "counts": counts, "total": sum(counts.values()), "top": top,
        # Fauxton's page of a document is this plus the quoted id.
        "fauxton": "%s/_utils/#database/%s/" % (redact_url(db.server.url).rstrip("/"),
                                                quote(db.name, safe="")),
    })
    return result


# -- rendering ------------------------------------------------------------------

def _nice_step(raw):
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is at least ``raw``."""
    import math
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10 * power


def _ticks(lo, hi, count=5, integer=False):
    """Round tick values from at most ``lo`` to at least ``hi`` (whole numbers if ``integer``)."""
    import math
    step = _nice_step((hi - lo) / float(count)) if hi > lo else 1.0
    if integer:
        step = max(1, int(math.ceil(step)))
    first = math.floor(lo / step) * step
    ticks = [round(first, 10)]
    while len(ticks) < 2 or ticks[-1] < hi - step * 1e-9:
        ticks.append(round(first + len(ticks) * step, 10))
    return ticks


def _seconds_text(seconds):
    """A run time for people: 0.25 s, 42.0 s, 12 min, 3.4 h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return "%d ms" % round(seconds * 1000)
    if seconds < 10:
        return "%.2f s" % seconds
    if seconds < 120:
        return "%.1f s" % seconds
    return _duration(seconds)


def _count_text(value):
    if value is None:
        return "-"
    if abs(value - round(value)) < 1e-9:
        return "{:,}".format(int(round(value)))
    return "%.1f" % value if abs(value) >= 10 else "%.2f" % value


def _svg_frame(width, height, label):
    return ['<svg role="img" viewBox="0 0 %d %d" aria-label="%s">' % (width, height,
                                                                        _esc(label))]


def _esc(text):
    """``text`` for HTML: escaped, and a lone surrogate (which a lenient server may have
    stored; UTF-8 cannot hold it) shown as U+FFFD."""
    import html
    text = str(text)
    if any("\ud800" <= char <= "\udfff" for char in text):
        text = "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)
    return html.escape(text, quote=True)


def _svg_axes(out, box, xticks, yticks, xlabel, ylabel):
    """Axes, grid lines and labels. ``box`` = (left, top, right, bottom) in pixels;
    ticks are (position, label) pairs, positions in pixels."""
    left, top, right, bottom = box
    for y, text in yticks:
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" class="grid"/>'
                   % (left, y, right, y))
        out.append('<text x="%d" y="%.1f" class="tick" text-anchor="end">%s</text>'
                   % (left - 6, y + 4, _esc(text)))
    for x, text in xticks:
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" class="axis"/>'
                   % (x, bottom, x, bottom + 4))
        out.append('<text x="%.1f" y="%d" class="tick" text-anchor="middle">%s</text>'
                   % (x, bottom + 18, _esc(text)))
    out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" class="axis"/>'
               % (left, bottom, right, bottom))
    out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" class="axis"/>' % (left, top, left, bottom))
    out.append('<text x="%.1f" y="%d" class="label" text-anchor="middle">%s</text>'
               % ((left + right) / 2.0, bottom + 36, _esc(xlabel)))
    out.append('<text x="14" y="%.1f" class="label" text-anchor="middle" '
               'transform="rotate(-90 14 %.1f)">%s</text>'
               % ((top + bottom) / 2.0, (top + bottom) / 2.0, _esc(ylabel)))


_TIME_STEPS = (1, 5, 10, 15, 30, 60, 300, 600, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
               2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400, 365 * 86400)


def _time_ticks(lo, hi, to_x, most=8):
    """(x, label) ticks at round UTC times between ``lo`` and ``hi``."""
    step = next((s for s in _TIME_STEPS if (hi - lo) / s <= most), _TIME_STEPS[-1])
    form = "%H:%M:%S" if step < 60 else "%H:%M" if step < 86400 and hi - lo < 86400 else \
        "%m-%d %H:%M" if step < 86400 else "%Y-%m-%d"
    first = (int(lo) // step + 1) * step
    ticks = [(to_x(t), time.strftime(form, time.gmtime(t))) for t in range(first, int(hi) + 1, step)]
    # A label at the very end would stick out of the chart.
    return [tick for tick in ticks if tick[0] < to_x(hi) - 25] or ticks[:1]


def _svg_finished(figures, width=900, height=300):
    """Cumulative done and error tokens over time (step lines)."""
    fin = figures["finished"]
    buckets = fin["buckets"]
    if not buckets:
        return '<p class="empty">No token has finished yet.</p>'
    start = min(fin["first_lock"] or buckets[0][0], buckets[0][0])
    end = max(fin["last_done"], buckets[-1][0] + fin["bucket_seconds"])
    end = end if end > start else start + 60
    ymax = max(1, sum(b[1] + b[2] for b in buckets))
    yt = _ticks(0, ymax, integer=True)
    box = (70, 16, width - 20, height - 50)
    left, top, right, bottom = box

    def x(t):
        return left + (right - left) * (t - start) / float(end - start)

    def y(v):
        return bottom - (bottom - top) * v / float(yt[-1])
    out = _svg_frame(width, height, "tokens finished over time")
    _svg_axes(out, box, _time_ticks(start, end, x), [(y(v), _count_text(v)) for v in yt],
              "time (UTC)", "tokens finished")
    labels = []
    for index, name in ((None, "all"), (1, "done"), (2, "error")):
        total, points = 0, ["%.1f,%.1f" % (x(start), y(0))]
        for bucket in buckets:
            t = min(bucket[0] + fin["bucket_seconds"], end)
            points.append("%.1f,%.1f" % (x(t), y(total)))
            total += bucket[1] + bucket[2] if index is None else bucket[index]
            points.append("%.1f,%.1f" % (x(t), y(total)))
        points.append("%.1f,%.1f" % (right, y(total)))
        out.append('<polyline class="line %s" points="%s"/>' % (name, " ".join(points)))
        labels.append([y(total) - 5, name, total])
    labels.sort()
    for above, below in zip(labels, labels[1:]):        # 13 px apart at least
        below[0] = max(below[0], above[0] + 13)
    for at, name, total in labels:
        out.append('<text x="%d" y="%.1f" class="end %s" text-anchor="end">%s %s</text>'
                   % (right - 8, at, name, name, _count_text(total)))
    out.append("</svg>")
    return "\n".join(out)


def _svg_rate(figures, width=900, height=220, bars=40):
    """Tokens finished per hour, in up to ``bars`` intervals over the campaign."""
    fin = figures["finished"]
    buckets = fin["buckets"]
    if not buckets:
        return ""
    bucket = fin["bucket_seconds"]
    start = min(fin["first_lock"] or buckets[0][0], buckets[0][0]) // bucket * bucket
    end = buckets[-1][0] + bucket
    # A round interval, and a whole number of buckets: no bar gets one more than its neighbours.
    target = max(bucket, (end - start) / float(bars))
    slot = next((s for s in _TIME_STEPS if s >= target), target)
    slot = float(-(-slot // bucket) * bucket)
    count = max(1, int(-(-(end - start) // slot)))
    done, error = [0] * count, [0] * count
    for row in buckets:
        i = min(count - 1, int((row[0] - start) // slot))
        done[i] += row[1]
        error[i] += row[2]
    per_hour = 3600.0 / slot
    ymax = max(1e-9, max(d + e for d, e in zip(done, error)) * per_hour)
    yt = _ticks(0, ymax)
    box = (70, 16, width - 20, height - 50)
    left, top, right, bottom = box
    span = count * slot

    def x(t):
        return left + (right - left) * (t - start) / span

    def y(v):
        return bottom - (bottom - top) * v / float(yt[-1])
    out = _svg_frame(width, height, "tokens finished per hour")
    _svg_axes(out, box, _time_ticks(start, start + span, x),
              [(y(v), _count_text(v)) for v in yt], "time (UTC)",
              "tokens/h (per %s)" % _duration(slot))
    bar = (right - left) / float(count)
    for i in range(count):
        base = 0.0
        for values, name in ((done, "done"), (error, "error")):
            if values[i]:
                rate = values[i] * per_hour
                out.append('<rect class="%s" x="%.1f" y="%.1f" width="%.1f" height="%.1f">'
                           '<title>%s: %d %s, %s tokens/h</title></rect>'
                           % (name, left + i * bar + 1, y(base + rate), max(bar - 2, 1),
                              y(base) - y(base + rate), _esc(_when(start + i * slot)),
                              values[i], name, _count_text(rate)))
                base += rate
    out.append("</svg>")
    return "\n".join(out)


def _svg_runtimes(figures, width=900, height=280):
    """The histogram of done tokens' run times, with median and p90 marked."""
    runs = figures["run_seconds"]
    hist = runs["histogram"]
    if not hist:
        return '<p class="empty">No done token has a run time (run_seconds) yet.</p>'
    import math
    logarithmic = len(hist) > 1 and hist[0][0] > 0 and \
        abs((hist[1][1] - hist[1][0]) - (hist[0][1] - hist[0][0])) > 1e-9 * hist[-1][1]
    lo, hi = hist[0][0], hist[-1][1]
    hi = hi if hi > lo else lo + 1
    yt = _ticks(0, max(1, max(b[2] for b in hist)), integer=True)
    box = (70, 40, width - 20, height - 50)
    left, top, right, bottom = box

    def x(v):
        if logarithmic:
            return left + (right - left) * math.log(max(v, lo) / lo) / math.log(hi / lo)
        return left + (right - left) * (v - lo) / float(hi - lo)

    def y(v):
        return bottom - (bottom - top) * v / float(yt[-1])
    every = max(1, int(math.ceil(len(hist) / 10.0)))
    xt = [(x(b[0]), _seconds_text(b[0])) for b in hist[::every]] + [(x(hi), _seconds_text(hi))]
    out = _svg_frame(width, height, "distribution of run times")
    _svg_axes(out, box, xt, [(y(v), _count_text(v)) for v in yt],
              "run time%s" % (" (logarithmic)" if logarithmic else ""), "done tokens")
    for low, high, n in hist:
        if n:
            out.append('<rect class="done" x="%.1f" y="%.1f" width="%.1f" height="%.1f">'
                       '<title>%s to %s: %d tokens</title></rect>'
                       % (x(low) + 1, y(n), max(x(high) - x(low) - 2, 1), bottom - y(n),
                          _esc(_seconds_text(low)), _esc(_seconds_text(high)), n))
    for name, value, above in (("median", runs["median"], 36), ("p90", runs["p90"], 20)):
        if value is not None:
            at = x(value)
            anchor = "end" if at > right - 80 else "start" if at < left + 80 else "middle"
            out.append('<line class="marker %s" x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>'
                       % (name, at, top, at, bottom))
            out.append('<text class="marker %s" x="%.1f" y="%d" text-anchor="%s">%s %s</text>'
                       % (name, at, top - above + 14, anchor, name,
                          _esc(_seconds_text(value))))
    out.append("</svg>")
    return "\n".join(out)


def _svg_states(counts, width=900, height=34):
    """One bar split by state."""
    total = sum(counts.values())
    if not total:
        return '<p class="empty">The database holds no tokens.</p>'
    out = _svg_frame(width, height, "tokens per state")
    at = 0.0
    for state in ("done", "error", "locked", "todo"):
        share = counts[state] / float(total)
        if share:
            out.append('<rect class="%s" x="%.1f" y="2" width="%.1f" height="%d">'
                       '<title>%s: %d</title></rect>'
                       % (state, at * width, share * width, height - 4, state, counts[state]))
        at += share
    out.append("</svg>")
    return "\n".join(out)


def _bar(value, most, state):
    if not value:
        return ""
    width = 100.0 * value / most if most else 0
    return '<div class="bar %s" style="width:%.1f%%"></div>' % (state, width)


def _token_link(figures, tid):
    """The id, linked to its Fauxton page, with an anchor of its own."""
    quoted = quote(tid, safe="", errors="surrogatepass")
    return '<a id="token-%s" href="%s">%s</a>' % (
        _esc(quoted), _esc(figures["fauxton"] + quoted), _esc(tid))


_REPORT_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0; background: #f4f5f7; }
main { max-width: 960px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 24px; margin: 8px 0 2px; } h2 { font-size: 18px; margin: 0 0 10px; }
.meta { color: #666; margin-bottom: 16px; }
section { background: #fff; border-radius: 8px; padding: 16px 18px; margin: 14px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.12); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 12px; }
.card { flex: 1 1 120px; background: #f7f8fa; border-radius: 6px; padding: 8px 12px;
        border-left: 5px solid #999; }
.card b { display: block; font-size: 22px; } .card span { color: #555; }
.card.todo { border-color: #90a4ae; } .card.locked { border-color: #f9a825; }
.card.done { border-color: #2e7d32; } .card.error { border-color: #c62828; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e4e6ea;
         vertical-align: top; }
th { color: #555; font-weight: 600; } td.n, th.n { text-align: right; white-space: nowrap; }
td.barcell { width: 35%; } .bar { height: 12px; border-radius: 2px; min-width: 1px; }
.bar.error, rect.error { background: #c62828; fill: #c62828; }
.bar.done, rect.done { background: #2e7d32; fill: #2e7d32; }
rect.locked { fill: #f9a825; } rect.todo { fill: #b0bec5; }
td.msg { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
         white-space: pre-wrap; word-break: break-word; max-width: 420px; }
td.id { word-break: break-all; } td.t { white-space: nowrap; } a { color: #1565c0; }
svg { width: 100%; height: auto; display: block; margin: 6px 0; }
svg .grid { stroke: #e8e8e8; } svg .axis { stroke: #777; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
svg .label { font-size: 12px; fill: #333; }
svg .line { fill: none; stroke-width: 2.2; } svg .line.all { stroke: #1565c0; }
svg .line.done { stroke: #2e7d32; } svg .line.error { stroke: #c62828; }
svg text.end { font-weight: 600; } svg text.all { fill: #1565c0; }
svg text.done { fill: #2e7d32; } svg text.error { fill: #c62828; }
svg line.marker { stroke: #6a1b9a; stroke-dasharray: 4 3; stroke-width: 1.8; }
svg text.marker { fill: #6a1b9a; font-weight: 600; }
svg line.p90 { stroke: #e65100; } svg text.p90 { fill: #e65100; }
.empty { color: #777; font-style: italic; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
            margin-right: 4px; vertical-align: -1px; }
footer { color: #888; font-size: 12px; text-align: center; }
"""


def render_report(figures):
    """The campaign report of :func:`campaign_figures` as one self-contained HTML page.

    Inline CSS and SVG only: no scripts, fonts or images from anywhere; links
    go to the tokens' Fauxton pages on the server (its URL without any user
    name or password). Every value from the database is escaped.
    """
    counts, total = figures["counts"], figures["total"]
    runs, rate, fin = figures["run_seconds"], figures["rate"], figures["finished"]
    finished = counts["done"] + counts["error"]
    out = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>PiCaS report: %s</title>' % _esc(figures["database"]),
           '<style>%s</style>' % _REPORT_CSS, '</head>', '<body>', '<main>',
           '<h1>PiCaS campaign report: <span id="database">%s</span></h1>'
           % _esc(figures["database"]),
           '<div class="meta">generated <span id="generated">%s</span> from %s, design '
           'document %s</div>' % (_esc(_when(figures["generated"])), _esc(figures["server"]),
                                  _esc(figures["design_doc"]))]

    # Tokens per state.
    out.append('<section id="states"><h2>Tokens</h2><div class="cards">')
    out.append('<div class="card"><b id="count-total">%s</b><span>tokens</span></div>'
               % _count_text(total))
    for state in STATES:
        out.append('<div class="card %s"><b id="count-%s">%s</b><span>%s</span></div>'
                   % (state, state, _count_text(counts[state]), state))
    out.append('</div>')
    out.append(_svg_states(counts))
    if total:
        out.append('<p>%s of %s finished (%.1f%%)%s.</p>' % (
            _count_text(finished), _count_text(total), 100.0 * finished / total,
            "; %s done, %s in error" % (_count_text(counts["done"]), _count_text(counts["error"]))
            if finished else ""))
    extras = figures["tokens_with"]
    notes = ["%s %s" % (what, _count_text(extras[key])) for key, what in (
        ("scrubbed", "retried after a failure (scrub_count > 0):"),
        ("retried", "sent back with a retry exit code:"),
        ("timed_out", "killed by max_token_time at least once:"),
        ("poison", "poison (error for good):")) if extras.get(key)]
    if notes:
        out.append('<p>Finished tokens %s.</p>' % _esc("; ".join(notes)))
    out.append('</section>')

    # Finished over time, and the rate.
    out.append('<section id="progress"><h2>Finished over time</h2>')
    if fin["buckets"]:
        out.append('<p class="legend"><span><i style="background:#1565c0"></i>all finished</span>'
                   '<span><i style="background:#2e7d32"></i>done</span>'
                   '<span><i style="background:#c62828"></i>error</span></p>')
    out.append(_svg_finished(figures))
    if fin["buckets"]:
        left = counts["todo"] + counts["locked"]
        overall = rate["overall_per_hour"]
        eta = ""
        if left and rate["last_hour"]:
            eta = "; at the last hour's rate the %s left take about %s" % (
                _count_text(left), _duration(3600.0 * left / rate["last_hour"]))
        out.append('<p>Rate: <b id="rate-overall">%s</b> tokens/h overall (%s from the first '
                   'claim, %s, to the last finish, %s); <b id="rate-recent">%s</b> finished '
                   'in the hour before this report%s.</p>' % (
                       _count_text(overall) if overall is not None else "-",
                       _duration((fin["last_done"] - (fin["first_lock"] or fin["first_done"]))),
                       _esc(_when(fin["first_lock"] or fin["first_done"])),
                       _esc(_when(fin["last_done"])), _count_text(rate["last_hour"]), eta))
        out.append(_svg_rate(figures))
    out.append('</section>')

    # Run times.
    out.append('<section id="runtimes"><h2>Run times of done tokens</h2>')
    if runs["count"]:
        out.append('<p>%s done tokens with a run time: median <b id="run-median">%s</b>, '
                   '90th percentile <b id="run-p90">%s</b>, mean %s, fastest %s, slowest '
                   '<b id="run-max">%s</b>.%s</p>' % (
                       _count_text(runs["count"]), _seconds_text(runs["median"]),
                       _seconds_text(runs["p90"]), _seconds_text(runs["mean"]),
                       _seconds_text(runs["min"]), _seconds_text(runs["max"]),
                       " %s done tokens have no run_seconds." % _count_text(
                           runs["without_run_seconds"]) if runs["without_run_seconds"] else ""))
    out.append(_svg_runtimes(figures))
    out.append('</section>')

    # Failures per host and per exit code.
    out.append('<section id="failures"><h2>Failures</h2>')
    if not figures["hosts"]:
        out.append('<p class="empty">No token has finished yet.</p>')
    else:
        out.append('<h3>Per host (the host of the last attempt; black hole: finished tokens '
                   'that host gave back first, as its tasks failed fast in a row)</h3>')
        most = max(h["error"] for h in figures["hosts"]) or 1
        out.append('<table id="hosts"><tr><th>host</th><th class="n">error</th>'
                   '<th class="n">done</th><th class="n">failed</th>'
                   '<th class="n">black hole</th><th>errors</th></tr>')
        shown, rest = figures["hosts"][:figures["top"]], figures["hosts"][figures["top"]:]
        if rest:
            shown = shown + [{"host": "%d more hosts" % len(rest),
                              "error": sum(r["error"] for r in rest),
                              "done": sum(r["done"] for r in rest),
                              "black_hole": sum(r["black_hole"] for r in rest)}]
        for row in shown:
            ran = row["error"] + row["done"]
            share = "%.0f%%" % (100.0 * row["error"] / ran) if ran else "-"
            out.append('<tr><td>%s</td><td class="n">%s</td><td class="n">%s</td>'
                       '<td class="n">%s</td><td class="n">%s</td><td class="barcell">%s</td>'
                       '</tr>' % (_esc(row["host"]), _count_text(row["error"]),
                                  _count_text(row["done"]), share,
                                  _count_text(row["black_hole"]),
                                  _bar(row["error"], most, "error")))
        out.append('</table>')
    if figures["exit_codes"]:
        out.append('<h3>Per exit code</h3>')
        most = max(c["tokens"] for c in figures["exit_codes"])
        out.append('<table id="exit-codes"><tr><th>exit code</th><th class="n">tokens</th>'
                   '<th></th></tr>')
        for row in figures["exit_codes"]:
            out.append('<tr><td>%s%s</td><td class="n">%s</td><td class="barcell">%s</td></tr>'
                       % (_esc(row["exit_code"]), " (%s)" % _esc(row["meaning"])
                          if row.get("meaning") else "", _count_text(row["tokens"]),
                          _bar(row["tokens"], most, "error")))
        out.append('</table>')
    elif figures["hosts"]:
        out.append('<p class="empty">No token is in error.</p>')
    out.append('</section>')

    # The slowest and the failed tokens.
    out.append('<section id="slowest-tokens"><h2>%s</h2>' % (
        "The %d slowest done tokens" % len(figures["slowest"]) if figures["slowest"]
        else "The slowest done tokens"))
    if figures["slowest"]:
        out.append('<table id="slowest"><tr><th>#</th><th>token</th><th class="n">run time</th>'
                   '<th>host</th><th>finished</th></tr>')
        for rank, row in enumerate(figures["slowest"], 1):
            out.append('<tr><td class="n">%d</td><td class="id">%s</td>'
                       '<td class="n" data-seconds="%r">%s</td><td>%s</td><td class="t">%s</td>'
                       '</tr>' % (
                           rank, _token_link(figures, row["id"]), row["run_seconds"],
                           _seconds_text(row["run_seconds"]), _esc(row["hostname"]),
                           _esc(_when(row["done"], "%Y-%m-%d %H:%M:%S"))))
        out.append('</table>')
    else:
        out.append('<p class="empty">No done token has a run time yet.</p>')
    out.append('</section>')
    out.append('<section id="failed-tokens"><h2>%s</h2>' % (
        "The %d latest failed tokens" % len(figures["failed"]) if figures["failed"]
        else "The latest failed tokens"))
    if figures["failed"]:
        out.append('<table id="failed"><tr><th>token</th><th>finished</th><th>host</th>'
                   '<th class="n">exit code</th><th>last error</th></tr>')
        for row in figures["failed"]:
            out.append('<tr><td class="id">%s</td><td class="t">%s</td><td>%s</td>'
                       '<td class="n">%s</td><td class="msg">%s</td></tr>' % (
                           _token_link(figures, row["id"]),
                           _esc(_when(row["done"], "%Y-%m-%d %H:%M:%S")), _esc(row["hostname"]),
                           _esc(row["exit_code"]), _esc(row["message"])))
        out.append('</table>')
    else:
        out.append('<p class="empty">No token is in error.</p>')
    out.append('</section>')
    out.append('<footer>picas.py %s report; times in UTC; token links open the server\'s '
               'Fauxton (log in there).</footer>' % _esc(__version__))
    out.extend(['</main>', '</body>', '</html>', ''])
    return "\n".join(out)


def _check_report_file(path):
    """Refuse, before any work, a report file that cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError("--html %s is a folder: name a file, e.g. --html %s"
                         % (path, os.path.join(path, "report.html")))
    if not os.path.isdir(folder):
        raise UsageError("--html %s: the folder %s does not exist; create it or name a file "
                         "in an existing folder" % (path, folder))
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError("--html %s: no permission to write there; name a file in a folder "
                         "you may write to" % path)


def cmd_report(args, db):
    """Write the campaign report (--html FILE, - for standard output) or print its figures (--json)."""
    if not args.html and not args.json:
        raise UsageError("report needs --html FILE (- for standard output) or --json, e.g. "
                         "python picas.py report --html report.html")
    if args.html == "-" and args.json:
        raise UsageError("--html - and --json both want standard output: write the page to "
                         "a file (--html report.html)")
    if args.html and args.html != "-":
        _check_report_file(args.html)
    _require_db(db)
    with _IndexWatch(db, args.design_doc):         # the first query builds the views' index
        counts = count_states(db, args.design_doc)
    if counts["done"] + counts["error"] > 5000:
        log.info("reading the %d finished tokens of %s", counts["done"] + counts["error"],
                 db.name)
    figures = campaign_figures(db, args.design_doc, top=args.top, counts=counts)
    if args.json:
        print(json.dumps(figures, sort_keys=True, indent=1), flush=True)
    if args.html:
        page = render_report(figures)
        if args.html == "-":
            sys.stdout.write(page)
            sys.stdout.flush()
        else:
            try:
                with open(args.html, "w", encoding="utf-8") as fh:
                    fh.write(page)
            except OSError as exc:
                raise UsageError("cannot write the report to %s: %s; name another file"
                                 % (args.html, exc.strerror or exc))
            log.info("report of %d tokens in %s written to %s (open it in a browser)",
                     figures["total"], db.name, args.html)
    return EXIT_OK


#: Runs picas.py as a module: ``python -c _AS_MODULE /path/to/picas.py ARGS...``.
_AS_MODULE = ("import importlib.util as u, sys; s = u.spec_from_file_location('picas', "
              "sys.argv[1]); m = u.module_from_spec(s); sys.modules['picas'] = m; "
              "s.loader.exec_module(m); del sys.argv[0]; sys.exit(m.main())")


def _pilot_as_module(argv):
    """Start ``python picas.py run ...`` over as an import of this file, in the same process.

    CPython keeps the syntax tree of the file it runs as a script until the
    script ends -- about 7 MB for this one, for as long as a pilot runs --
    while an imported module's tree is freed once it is compiled (and later
    starts load the cached bytecode). So a pilot started as a script
    re-executes itself (same process id, arguments, interpreter options) with
    this file imported instead. PICAS_NO_REEXEC=1 switches that off (for
    debuggers and profilers). Returns only when it did not happen.

    The bytecode cache is written first, here, in the process about to be
    replaced: a new copy of picas.py (a fresh job sandbox) would otherwise
    be compiled by the import, and the memory compiling takes (about 13 MB)
    would stay with the pilot for as long as it runs. Not with -B or
    PYTHONDONTWRITEBYTECODE, nor where the folder is read-only.
    """
    if os.name != "posix" or not sys.executable or os.environ.get("PICAS_NO_REEXEC") or \
            split_global_options(argv)[1][:1] != ["run"]:
        return
    flags = sys.flags
    isolated = getattr(flags, "isolated", 0)            # -I implies -E and -s
    options = [option for option, on in (
        ("-I", isolated), ("-E", flags.ignore_environment and not isolated),
        ("-S", flags.no_site), ("-s", flags.no_user_site and not isolated),
        ("-B", flags.dont_write_bytecode), ("-O", flags.optimize == 1),
        ("-OO", flags.optimize >= 2),
        # -u leaves stdout without a buffer (PYTHONUNBUFFERED travels by itself).
        ("-u", type(getattr(sys.stdout, "buffer", None)).__name__ == "FileIO" and
         not os.environ.get("PYTHONUNBUFFERED"))) if on]
    for name, value in getattr(sys, "_xoptions", {}).items():
        options += ["-X", name if value is True else "%s=%s" % (name, value)]
    for warning in sys.warnoptions:
        options += ["-W", warning]
    try:
        import importlib.machinery
        importlib.machinery.SourceFileLoader("picas", os.path.abspath(__file__)).get_code("picas")
    except Exception as exc:                 # a cache that cannot be written costs memory only
        log.debug("could not write the bytecode cache of %s (%s)", __file__, exc)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable] + options +
                 ["-c", _AS_MODULE, os.path.abspath(__file__)] + list(argv))
    except OSError as exc:
        log.debug("could not restart the pilot as a module (%s); going on as a script", exc)


if __name__ == "__main__":
    _pilot_as_module(sys.argv[1:])
    sys.exit(main())
