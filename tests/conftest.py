"""Test fixtures: a real CouchDB-compatible server for every test run.

By default the suite installs pouchdb-server from the npm registry (pinned by
tests/server/package-lock.json, ``npm ci --ignore-scripts``), starts it in
memory on a free 127.0.0.1 port with an admin user, and gives each test a fresh
database. Set ``PICAS_TEST_COUCHDB_URL`` (credentials included, e.g.
``http://admin:pw@127.0.0.1:5984``) to run the same tests against a real
Apache CouchDB instead.
"""
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_DIR = os.path.join(ROOT, "tests", "server")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import picas  # noqa: E402

#: The admin password of the test server. Tests grep output for it: it must
#: never show up anywhere picas.py writes.
SENTINEL_PASSWORD = "Sentinel-pw-7c1e9b"
ADMIN = "admin"


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def install_pouchdb_server():
    """Install pouchdb-server with ``npm ci`` once (guarded by a lock for parallel runs)."""
    binary = os.path.join(SERVER_DIR, "node_modules", "pouchdb-server", "bin", "pouchdb-server")
    with open(os.path.join(SERVER_DIR, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(binary):
            npm = shutil.which("npm")
            if npm is None:
                pytest.exit("npm is not installed: the tests need Node.js and npm to run "
                            "pouchdb-server (or set PICAS_TEST_COUCHDB_URL)", 3)
            subprocess.check_call([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
                                   "--loglevel=error"], cwd=SERVER_DIR)
    return binary


class CouchTestServer(object):
    """A CouchDB-compatible server for tests: ours (pouchdb-server) or the user's."""

    def __init__(self):
        self.proc = None
        self.workdir = None
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
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.workdir = tempfile.mkdtemp(prefix="picas-pouchdb-")
        with open(os.path.join(self.workdir, "config.json"), "w") as fh:
            fh.write('{"admins": {"%s": "%s"}, "log": {"level": "error"}}'
                     % (self.username, self.password))
        self.proc = subprocess.Popen(
            ["node", self.binary, "--in-memory", "-o", "127.0.0.1", "-p", str(self.port), "-n"],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.alive():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("pouchdb-server did not start on %s" % self.url)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

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
