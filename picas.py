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
tokens, claiming, the actor loop, admin operations and the command line.
"""

__version__ = "0.1.0"
__all__ = [
    "PicasError", "HTTPError", "NotFound", "Conflict", "Unauthorized",
    "ServerError", "ServerUnreachable", "BadResponse",
    "Server", "Database",
    "main",
]

import base64
import errno
import http.client
import json
import logging
import os
import random
import socket
import ssl
import sys
import threading
import time
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

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

    def __init__(self, status, error=None, reason=None, method=None, path=None):
        self.status = status
        self.error = error
        self.reason = reason
        self.method = method
        self.path = path
        self.ambiguous = False
        text = "%s %s: HTTP %s" % (method, path, status)
        if error:
            text += " %s" % error
        if reason:
            text += " (%s)" % reason
        PicasError.__init__(self, text)


class BadRequest(HTTPError):
    """400: CouchDB did not understand the request (bad view parameters...)."""


class Unauthorized(HTTPError):
    """401 or 403: wrong user name or password, or not allowed to do this."""


class NotFound(HTTPError):
    """404: no such database, document, design document or view."""


class Conflict(HTTPError):
    """409: the document changed since the ``_rev`` you sent was read."""


class PreconditionFailed(HTTPError):
    """412: for example, creating a database that already exists."""


class ServerError(HTTPError):
    """5xx: the server failed; usually worth retrying later."""


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


def redact_url(url):
    """Return ``url`` with any user name and password removed.

    >>> redact_url("https://alice:s3cret@couch.example.org:6984/db")
    'https://couch.example.org:6984/db'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    netloc = host + (":%d" % parts.port if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _quote_id(doc_id):
    """Quote a document id for a URL path; ``_design/x`` keeps its slash."""
    for prefix in ("_design/", "_local/"):
        if doc_id.startswith(prefix):
            return prefix + quote(doc_id[len(prefix):], safe="")
    return quote(doc_id, safe="")


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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
    return urlencode(out)


def _ssl_context(verify=True, cafile=None, capath=None):
    """Build the TLS context: verification on unless explicitly switched off.

    Besides the system's CAs, ``SSL_CERT_FILE`` and ``X509_CERT_DIR`` (where
    grid nodes keep their CAs, usually ``/etc/grid-security/certificates``)
    are honoured when set.
    """
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
    reopened transparently.
    """

    def __init__(self, url="http://localhost:5984", username=None, password=None,
                 timeout=DEFAULT_TIMEOUT, retries=DEFAULT_RETRIES, verify=True,
                 cafile=None, capath=None, view_timeout=DEFAULT_VIEW_TIMEOUT):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https"):
            raise PicasError("server URL %r: only http:// and https:// are supported"
                             % redact_url(url))
        if not parts.hostname:
            raise PicasError("server URL %r has no host name" % redact_url(url))
        if parts.username and username is None:
            username = unquote(parts.username)
            password = unquote(parts.password or "")
        self.url = redact_url(urlunsplit((parts.scheme, parts.netloc,
                                          parts.path.rstrip("/"), "", "")))
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.username = username
        self.timeout = timeout
        self.view_timeout = max(view_timeout, timeout)
        self.retries = retries
        self._auth = None
        if username is not None:
            pair = ("%s:%s" % (username, password or "")).encode("utf-8")
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
            if parts.scheme == "http" and self._host not in _LOOPBACK_HOSTS:
                log.warning("sending the password for %s over plain http:// to %s: "
                            "anyone on the network path can read it; use https://",
                            username, self._host)
        self._ssl = (_ssl_context(verify, cafile, capath)
                     if parts.scheme == "https" else None)
        self._local = threading.local()
        #: Requests sent and answers received, for benchmarks and tests.
        self.request_count = 0

    def __repr__(self):
        return "%s(%r)" % (type(self).__name__, self.url)

    # -- connections --------------------------------------------------------

    def _connection(self):
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
            self._local.pid = os.getpid()
            self._local.used = False
        return conn

    def _drop_connection(self):
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        """Close this thread's connection (a later request opens a new one)."""
        self._drop_connection()

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
                maybe_applied = maybe_applied or not isinstance(exc, _NotSent)
                last = exc.__cause__ if isinstance(exc, _NotSent) else exc
                log.debug("%s %s%s failed (attempt %d of %d): %r", method, self.url,
                          path, attempt + 1, attempts, last)
                continue
            if status in _RETRY_STATUSES and retry and attempt + 1 < attempts:
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


class _NotSent(OSError):
    """Wraps an error raised while sending: the server cannot have applied it."""

    def __init__(self, cause):
        OSError.__init__(self, str(cause))
        self.__cause__ = cause


_CERT_ERRORS = (getattr(ssl, "SSLCertVerificationError", ssl.CertificateError),
                ssl.CertificateError)


def _describe_socket_error(exc):
    if isinstance(exc, socket.gaierror):
        return "host name not found (%s)" % exc.strerror
    if isinstance(exc, _CERT_ERRORS) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
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
        create duplicates.
        """
        docs = list(docs)
        for doc in docs:
            if "_id" not in doc:
                doc["_id"] = new_id()
        body = dict(options)
        body["docs"] = docs
        try:
            results = self.request("POST", "/_bulk_docs", body=body, retry=True)[2]
        except HTTPError as exc:
            if exc.status == 413:
                raise PicasError("_bulk_docs: the request (%d documents) is larger than the "
                                 "server accepts; write fewer documents at once" % len(docs))
            raise
        out = []
        for doc, result in zip(docs, results):
            if "error" in result:
                status = {"conflict": 409, "forbidden": 403, "unauthorized": 401,
                          "not_found": 404}.get(result["error"], 400)
                out.append((False, doc["_id"],
                            _error_class(status)(status, result.get("error"), result.get("reason"),
                                                 "POST", self._path + "/_bulk_docs")))
            else:
                doc["_rev"] = result["rev"]
                out.append((True, doc["_id"], result["rev"]))
        return out

    def all_docs(self, **params):
        """Query ``_all_docs``; returns CouchDB's result dict (``rows``, ``total_rows``)."""
        return self._query("/_all_docs", params)

    # -- views --------------------------------------------------------------

    def view(self, name, **params):
        """Query view ``"Design/view"`` and return CouchDB's result dict.

        Parameters are CouchDB's: ``key``, ``startkey``, ``endkey`` and
        ``keys`` are JSON-encoded for you; ``include_docs``, ``limit``,
        ``reduce``, ``group``, ``descending``... pass through. ``keys`` is
        sent in a POST body, so it may be long.
        """
        design, _, view = name.partition("/")
        if not view:
            raise PicasError("view name %r: expected 'Design/view', e.g. 'Monitor/todo'" % name)
        path = "/_design/%s/_view/%s" % (quote(design, safe=""), quote(view, safe=""))
        try:
            return self._query(path, params)
        except NotFound as exc:
            if exc.error == "not_found" and not self.exists():
                raise NotFound(404, "not_found", "database %r does not exist" % self.name,
                               "GET", path)
            raise NotFound(404, exc.error, "view %s not found in database %r: create the "
                           "views first (python picas.py views)" % (name, self.name), "GET", path)

    def _query(self, path, params):
        if "keys" in params:
            params = dict(params)
            body = {"keys": params.pop("keys")}
            return self.request("POST", path, params=params, body=body, retry=True,
                                timeout=self.server.view_timeout)[2]
        return self.request("GET", path, params=params, timeout=self.server.view_timeout)[2]

    def iterview(self, name, batch=1000, **params):
        """Yield every row of a view, ``batch`` rows per request, paging without ``skip``.

        Each page starts at the last row's key and document id, so the cost of
        a page does not grow with its position in the view. Rows added or
        removed while paging may or may not be seen, as with any paging.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        params = dict(params)
        limit = params.pop("limit", None)
        if "keys" in params:
            raise ValueError("iterview does not page keys= queries; use view()")
        params["reduce"] = False
        seen = 0
        while True:
            page = batch if limit is None else min(batch, limit - seen)
            if page <= 0:
                return
            rows = self.view(name, limit=page + 1, **params)["rows"]
            for row in rows[:page]:
                yield row
            seen += len(rows[:page])
            if len(rows) <= page:
                return
            nxt = rows[page]
            params["startkey"] = nxt["key"]
            params["startkey_docid"] = nxt["id"]

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
        result = self.request("PUT", path, params=params, body=data,
                              headers={"Content-Type": content_type},
                              retry=bool(params))[2]
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


def _same_content(stored, written):
    """True when ``stored`` (read back) holds exactly what ``written`` wrote."""
    skip = ("_rev", "_attachments", "_revisions", "_conflicts")
    a = dict((k, v) for k, v in stored.items() if k not in skip)
    b = dict((k, v) for k, v in written.items() if k not in skip)
    return json.loads(_dumps(a).decode("utf-8")) == json.loads(_dumps(b).decode("utf-8"))


###############################################################################
# The command line ############################################################
###############################################################################

def main(argv=None):
    """Run the command line; return the exit status."""
    import argparse
    parser = argparse.ArgumentParser(prog="picas.py", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="picas.py " + __version__)
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
