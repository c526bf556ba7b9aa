"""Test fixtures: a real CouchDB-compatible server for every test run.

By default the suite installs pouchdb-server from the npm registry (pinned by
tests/server/package-lock.json, ``npm ci --ignore-scripts``), starts it in
memory on a free 127.0.0.1 port with an admin user, and gives each test a fresh
database. Set ``PICAS_TEST_COUCHDB_URL`` (credentials included, e.g.
``http://admin:pw@127.0.0.1:5984``) to run the same tests against a real
Apache CouchDB instead.
"""
import os
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_DIR = os.path.join(ROOT, "tests", "server")
for path in (ROOT, SERVER_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import picas  # noqa: E402
import pouchdb  # noqa: E402

#: The admin password of the test server. Tests grep output for it: it must
#: never show up anywhere picas.py writes.
SENTINEL_PASSWORD = "Sentinel-pw-7c1e9b"
ADMIN = "admin"


free_port = pouchdb.free_port


def install_pouchdb_server():
    try:
        return pouchdb.install()
    except pouchdb.SetupError as exc:
        pytest.exit("%s; or set PICAS_TEST_COUCHDB_URL to a CouchDB server" % exc, 3)


class CouchTestServer(object):
    """A CouchDB-compatible server for tests: ours (pouchdb-server) or the user's."""

    def __init__(self):
        self.proc = None
        external = os.environ.get("PICAS_TEST_COUCHDB_URL")
        if external:
            probe = picas.Server(external)
            self.url = probe.url
            self.username = probe.username
            from urllib.parse import urlsplit, unquote
            self.password = unquote(urlsplit(external).password or "")
            self.kind = "couchdb"
        else:
            self.binary = install_pouchdb_server()
            self.username, self.password = ADMIN, SENTINEL_PASSWORD
            self.kind = "pouchdb-server"
            self.start()

    def start(self):
        self._pouch = pouchdb.PouchDBServer(self.username, self.password).start()
        self.proc = self._pouch.proc
        self.url = self._pouch.url

    def stop(self):
        if self.proc is not None:
            self._pouch.stop()
            self.proc = None

    def alive(self):
        try:
            picas.Server(self.url, retries=0, timeout=2).info()
            return True
        except picas.PicasError:
            return False

    def ensure_alive(self):
        """Restart our server when a previous test's request killed it."""
        if self.proc is not None and not self.alive():
            self.stop()
            self.start()

    def server(self, **kwargs):
        """A picas.Server logged in as the test admin."""
        kwargs.setdefault("retries", 3)
        return picas.Server(self.url, self.username, self.password, **kwargs)

    def env(self, dbname):
        """Environment variables a picas.py subprocess needs to reach ``dbname``."""
        env = dict(os.environ)
        env.update(PICAS_HOST_URL=self.url, PICAS_DATABASE=dbname,
                   PICAS_USERNAME=self.username, PICAS_PASSWORD=self.password)
        return env


@pytest.fixture(scope="session")
def couch():
    server = CouchTestServer()
    print("\ntesting against %s at %s" % (server.kind, server.url))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _server_alive(request):
    """Before every test that uses the server: restart it if an earlier request killed it."""
    if "couch" in request.fixturenames:
        request.getfixturevalue("couch").ensure_alive()


@pytest.fixture
def db(couch, request):
    """A fresh, empty database for one test, deleted afterwards."""
    couch.ensure_alive()
    server = couch.server()
    name = "picas-test-%s" % uuid.uuid4().hex[:12]
    database = server.create_database(name)
    yield database
    try:
        couch.server().delete_database(name)
    except picas.PicasError:
        pass


def pytest_report_header(config):
    external = os.environ.get("PICAS_TEST_COUCHDB_URL")
    if external:
        return "CouchDB for tests: %s (PICAS_TEST_COUCHDB_URL)" % picas.redact_url(external)
    return ("CouchDB for tests: pouchdb-server %s in memory on 127.0.0.1, started by the tests"
            % _pouchdb_version())


def _pouchdb_version():
    import json
    try:
        with open(os.path.join(SERVER_DIR, "package.json")) as fh:
            return json.load(fh)["dependencies"]["pouchdb-server"]
    except (OSError, ValueError, KeyError):
        return "?"


@pytest.fixture(autouse=True)
def _no_alarm_left():
    """A pilot must never leave its task timer or stop budget armed behind it."""
    import signal
    yield
    if hasattr(signal, "getitimer"):
        left = signal.getitimer(signal.ITIMER_REAL)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert left == (0.0, 0.0), "an ITIMER_REAL alarm was left armed: %r" % (left,)
