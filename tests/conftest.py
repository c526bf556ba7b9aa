"""Test fixtures: a real CouchDB-compatible server for every test run.

The ``couch`` fixture (one server per session) is, in this order:

- the user's server, when ``PICAS_TEST_COUCHDB_URL`` is set (credentials
  included, e.g. ``http://admin:pw@127.0.0.1:5984``);
- a real Apache CouchDB 3.4.3 single node from the shared build
  (tests/server/couchdb.py) when ``PICAS_TEST_SERVER=couchdb``;
- otherwise pouchdb-server, installed from the npm registry (pinned by
  tests/server/package-lock.json, ``npm ci --ignore-scripts``) and started in
  memory on a free 127.0.0.1 port with an admin user.

Each test gets a fresh database (``db``). The ``cluster`` fixture is a real
3-node CouchDB cluster for tests/test_real_cluster.py: started from the shared
build when ``PICAS_TEST_CLUSTER=1``, or the user's nodes from
``PICAS_TEST_CLUSTER_URLS`` (comma-separated node URLs with credentials);
without either, the tests that use it are skipped.
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


def _load_couchdb_server():
    """tests/server/couchdb.py, as module ``couchdb_server``: ``import couchdb`` stays
    python-couchdb's name (upstream scripts import it)."""
    import importlib.util
    if "couchdb_server" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "couchdb_server", os.path.join(SERVER_DIR, "couchdb.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["couchdb_server"] = module
        spec.loader.exec_module(module)
    return sys.modules["couchdb_server"]


couchdb = _load_couchdb_server()

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


def _password_of(url):
    from urllib.parse import unquote, urlsplit
    return unquote(urlsplit(url).password or "")


def _test_server_choice():
    """("external" | "couchdb" | "pouchdb-server"), from the environment."""
    if os.environ.get("PICAS_TEST_COUCHDB_URL"):
        return "external"
    choice = os.environ.get("PICAS_TEST_SERVER", "pouchdb").strip().lower()
    if choice in ("couchdb", "apache-couchdb"):
        return "couchdb"
    if choice not in ("", "pouchdb", "pouchdb-server"):
        pytest.exit("PICAS_TEST_SERVER=%s: use couchdb or pouchdb" % choice, 3)
    return "pouchdb-server"


class CouchTestServer(object):
    """A CouchDB-compatible server for tests: pouchdb-server, our CouchDB node, or the user's.

    ``kind`` is "pouchdb-server", "couchdb" (a single node of the shared Apache
    CouchDB build, started here) or "external" (``PICAS_TEST_COUCHDB_URL``).
    ``couchdb`` is true for anything but pouchdb-server (an external server is
    taken to be a real CouchDB); ``ours`` when the tests started it.
    """

    def __init__(self):
        self.proc = None
        self._pouch = self._node = None
        self.kind = _test_server_choice()
        if self.kind == "external":
            external = os.environ["PICAS_TEST_COUCHDB_URL"]
            probe = picas.Server(external)
            self.url = probe.url
            self.username = probe.username
            self.password = _password_of(external)
        else:
            self.username, self.password = ADMIN, SENTINEL_PASSWORD
            if self.kind == "pouchdb-server":
                self.binary = install_pouchdb_server()
            self.start()

    @property
    def couchdb(self):
        return self.kind != "pouchdb-server"

    @property
    def ours(self):
        return self.kind != "external"

    def start(self):
        if self.kind == "couchdb":
            try:
                if self._node is None:
                    self._node = couchdb.start_node(self.username, self.password)
                else:
                    self._node.start()
            except couchdb.SetupError as exc:
                pytest.exit("PICAS_TEST_SERVER=couchdb: %s" % exc, 3)
            self.proc = self._node.proc
            self.url = self._node.url
            return
        self._pouch = pouchdb.PouchDBServer(self.username, self.password).start()
        self.proc = self._pouch.proc
        self.url = self._pouch.url

    def stop(self):
        if self.proc is not None:
            if self._node is not None:
                self._node.stop()
            else:
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
    lines = []
    choice = _test_server_choice()
    if choice == "external":
        lines.append("CouchDB for tests: %s (PICAS_TEST_COUCHDB_URL)"
                     % picas.redact_url(os.environ["PICAS_TEST_COUCHDB_URL"]))
    elif choice == "couchdb":
        lines.append("CouchDB for tests: Apache CouchDB 3.4.3 single node on 127.0.0.1 "
                     "(PICAS_TEST_SERVER=couchdb), started by the tests from %s"
                     % (_release_or_none() or "(build missing)"))
    else:
        lines.append("CouchDB for tests: pouchdb-server %s in memory on 127.0.0.1, "
                     "started by the tests" % _pouchdb_version())
    cluster = _cluster_choice()
    if cluster == "ours":
        lines.append("CouchDB cluster for tests: Apache CouchDB 3.4.3, 3 nodes (n=3, q=2) on "
                     "127.0.0.1 (PICAS_TEST_CLUSTER=1), started by the tests")
    elif cluster == "external":
        urls = [u for u in os.environ["PICAS_TEST_CLUSTER_URLS"].split(",") if u.strip()]
        lines.append("CouchDB cluster for tests: %s (PICAS_TEST_CLUSTER_URLS)"
                     % ", ".join(picas.redact_url(u.strip()) for u in urls))
    else:
        lines.append("CouchDB cluster for tests: none (set PICAS_TEST_CLUSTER=1 or "
                     "PICAS_TEST_CLUSTER_URLS; the cluster tests are skipped)")
    return lines


def _release_or_none():
    try:
        return couchdb.find_release()
    except couchdb.SetupError:
        return None


def _pouchdb_version():
    import json
    try:
        with open(os.path.join(SERVER_DIR, "package.json")) as fh:
            return json.load(fh)["dependencies"]["pouchdb-server"]
    except (OSError, ValueError, KeyError):
        return "?"


# The cluster #################################################################

def _cluster_choice():
    if os.environ.get("PICAS_TEST_CLUSTER_URLS", "").strip():
        return "external"
    if os.environ.get("PICAS_TEST_CLUSTER", "").strip() not in ("", "0"):
        return "ours"
    return None


class ClusterUnderTest(object):
    """A real CouchDB cluster: ours (3 nodes of the shared build) or the user's nodes.

    ``urls[i]`` is node i's URL (no credentials), ``servers[i]`` a
    picas.Server logged in as the admin through node i. ``stop(i)`` and
    ``start(i)`` stop and restart a node we started (``can_stop``).
    """

    def __init__(self):
        self._cluster = None
        if _cluster_choice() == "external":
            urls = [u.strip() for u in os.environ["PICAS_TEST_CLUSTER_URLS"].split(",") if u.strip()]
            probes = [picas.Server(u) for u in urls]
            self.urls = [p.url for p in probes]
            self.username = probes[0].username
            self.password = _password_of(urls[0])
            self.kind = "external"
        else:
            self.username, self.password = ADMIN, SENTINEL_PASSWORD
            self._cluster = couchdb.start_cluster(self.username, self.password)
            self.urls = self._cluster.urls
            self.kind = "couchdb"
        self.servers = [self.server(i) for i in range(len(self.urls))]

    @property
    def can_stop(self):
        return self._cluster is not None

    @property
    def nodes(self):
        return self._cluster.nodes if self._cluster else []

    def __len__(self):
        return len(self.urls)

    def server(self, i, **kwargs):
        kwargs.setdefault("retries", 3)
        return picas.Server(self.urls[i], self.username, self.password, **kwargs)

    def env(self, i, dbname):
        """Environment of a picas.py subprocess that talks to ``dbname`` through node i."""
        env = dict(os.environ)
        env.update(PICAS_HOST_URL=self.urls[i], PICAS_DATABASE=dbname,
                   PICAS_USERNAME=self.username, PICAS_PASSWORD=self.password)
        return env

    def stop(self, i):
        if not self.can_stop:
            pytest.skip("an external cluster's nodes are not ours to stop")
        self._cluster.nodes[i].stop()

    def start(self, i):
        if not self.can_stop:
            pytest.skip("an external cluster's nodes are not ours to start")
        self._cluster.nodes[i].start()

    def heal(self, timeout=120):
        """Start every stopped node of ours and wait until all see each other."""
        if self._cluster is None:
            return
        for node in self._cluster.nodes:
            if not node.running:
                node.start()
        self._cluster.wait_healthy(timeout)

    def close(self):
        if self._cluster is not None:
            self._cluster.stop()


@pytest.fixture(scope="session")
def cluster():
    if _cluster_choice() is None:
        pytest.skip("no CouchDB cluster: set PICAS_TEST_CLUSTER=1 (starts 3 nodes of the shared "
                    "CouchDB build) or PICAS_TEST_CLUSTER_URLS=URL,URL,URL")
    try:
        target = ClusterUnderTest()
    except couchdb.SetupError as exc:
        pytest.fail("PICAS_TEST_CLUSTER: %s" % exc, pytrace=False)
    yield target
    target.close()


@pytest.fixture(autouse=True)
def _no_alarm_left():
    """A pilot must never leave its task timer or stop budget armed behind it."""
    import signal
    yield
    if hasattr(signal, "getitimer"):
        left = signal.getitimer(signal.ITIMER_REAL)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert left == (0.0, 0.0), "an ITIMER_REAL alarm was left armed: %r" % (left,)
