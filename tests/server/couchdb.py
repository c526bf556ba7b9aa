#!/usr/bin/env python3
"""Start real Apache CouchDB nodes on 127.0.0.1: one node, or a 3-node cluster.

Used by the tests (tests/conftest.py: ``PICAS_TEST_SERVER=couchdb`` and
``PICAS_TEST_CLUSTER=1``) and the benchmark (``bench/bench.py --couchdb``).
The CouchDB is the relocatable Apache CouchDB 3.4.3 build described in
``../shared/couchdb/README.md`` (path relative to the project root; or set
``PICAS_COUCHDB_RELEASE`` to the ``.tar.xz``). It is not a dependency of
picas.py: where the build is missing, :func:`find_release` returns None and
the callers fall back to pouchdb-server.

For developers::

    python3 tests/server/couchdb.py             # one node; prints its URL and waits
    python3 tests/server/couchdb.py --cluster   # three nodes (n=3, q=2)

The admin user is ``admin``; its password is taken from ``PICAS_PASSWORD`` or
made up and written to a file whose path is printed (never the password).

How processes are kept from outliving us: every process runs in a session of
its own under one temporary directory per Python process (the release is
unpacked there once, ~2 s). The nodes use a private ``epmd`` on a free port
(so runs never share node names with other runs on the machine), and a small
watchdog process (this file, ``--watchdog``) is told the pid of every node
it must kill. When the Python process ends in any way, even by SIGKILL, the
watchdog's stdin reaches end of file: it then stops every node it was told
about, their helper processes and the epmd, and removes the directory.
A normal exit does the same at once (atexit).
"""
import argparse
import atexit
import base64
import binascii
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RELEASE_NAME = "apache-couchdb-3.4.3-debian12-x86_64.tar.xz"
#: Where the shared build lives, relative to the project root.
DEFAULT_RELEASE = os.path.join(os.path.dirname(ROOT), "shared", "couchdb", RELEASE_NAME)
#: Seconds between SIGTERM and SIGKILL when a node is stopped.
STOP_GRACE = 5.0


class SetupError(Exception):
    """The CouchDB build is missing or a node did not start."""


def find_release(environ=None):
    """Path of the CouchDB release archive, or None when there is none.

    ``PICAS_COUCHDB_RELEASE`` names it explicitly (an error if it does not
    exist); otherwise ``../shared/couchdb/<release>`` next to the project.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("PICAS_COUCHDB_RELEASE")
    if explicit:
        if not os.path.isfile(explicit):
            raise SetupError("PICAS_COUCHDB_RELEASE=%s: no such file" % explicit)
        return os.path.abspath(explicit)
    return DEFAULT_RELEASE if os.path.isfile(DEFAULT_RELEASE) else None


from pouchdb import free_port  # noqa: E402  (this folder is on sys.path wherever it is used)


def _random_hex(nbytes):
    return binascii.hexlify(os.urandom(nbytes)).decode("ascii")


# Processes ###################################################################

def _proc_stat(pid):
    """(state, ppid, starttime) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _gone(pid):
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid):
    """``{pid: starttime}`` of every living descendant of ``pid``."""
    children = {}
    for other in _all_pids():
        stat = _proc_stat(other)
        if stat is not None:
            children.setdefault(stat[1], []).append((other, stat[2]))
    found, todo = {}, [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            if child not in found:
                found[child] = start
                todo.append(child)
    return found


def pids_under(directory):
    """Pids of processes whose command line names ``directory`` (ours: binaries live there)."""
    mark = directory.rstrip("/") + "/"
    return [p for p in _all_pids() if p != os.getpid() and mark in _cmdline(p)]


def _signal(pid, sig, start=None):
    """Send ``sig`` to ``pid`` unless it is gone (or is another process now: ``start``)."""
    stat = _proc_stat(pid)
    if stat is None or (start is not None and stat[2] != start):
        return
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def kill_tree(pid, grace=STOP_GRACE, wait=None):
    """Stop ``pid`` (SIGTERM, SIGKILL after ``grace`` s) and then every process it had started.

    Erlang starts its port programs (erl_child_setup, inet_gethost, couchjs,
    disksup's sh) in sessions of their own, so a process group kill would
    miss them: the tree is taken from /proc before the signal. ``wait`` is a
    function that waits up to its argument in seconds for ``pid`` to exit and
    returns True if it did (``Popen.wait`` for our own children, which must
    be reaped); by default /proc is polled. Returns the pids still alive.
    """
    tree = descendants(pid)
    if wait is None:
        def wait(seconds):
            deadline = time.time() + seconds
            while not _gone(pid):
                if time.time() > deadline:
                    return False
                time.sleep(0.05)
            return True
    _signal(pid, signal.SIGTERM)
    if not wait(grace):
        _signal(pid, signal.SIGKILL)
        wait(10)
    tree.update(descendants(pid))
    # Helpers end by themselves when the node's ports close; give them a moment.
    deadline = time.time() + 2
    while time.time() < deadline and not all(_gone(p) for p in tree):
        time.sleep(0.05)
    for child, start in tree.items():
        _signal(child, signal.SIGKILL, start)
    time.sleep(0.05)
    return [p for p in [pid] + list(tree) if not _gone(p)]


# The watchdog ################################################################

def _watchdog_main(directory):
    """Run by the watchdog process: kill what we were told about when stdin closes."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    watched = {}

    def on_term(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_term)
    try:
        stdin = sys.stdin.buffer
        for line in iter(stdin.readline, b""):
            words = line.decode("ascii", "replace").split()
            if len(words) == 2 and words[1].isdigit():
                pid = int(words[1])
                if words[0] == "watch":
                    stat = _proc_stat(pid)
                    if stat is not None:
                        watched[pid] = stat[2]
                elif words[0] == "forget":
                    watched.pop(pid, None)
    finally:
        for pid, start in watched.items():
            stat = _proc_stat(pid)
            if stat is not None and stat[2] == start:
                kill_tree(pid, grace=3)
        for pid in pids_under(directory):
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


class _Runtime(object):
    """One per Python process: the unpacked release, the private epmd and the watchdog."""

    _instance = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, release=None):
        with cls._lock:
            if cls._instance is None or cls._instance.closed:
                cls._instance = cls(release or find_release())
            return cls._instance

    def __init__(self, release):
        if release is None:
            raise SetupError("no CouchDB build: expected %s (or set PICAS_COUCHDB_RELEASE)"
                             % DEFAULT_RELEASE)
        self.closed = False
        self.nodes = []
        self._pipe_lock = threading.Lock()
        self.dir = tempfile.mkdtemp(prefix="picas-couchdb-")
        self.watchdog = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--watchdog", self.dir],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        atexit.register(self.close)
        try:
            self._unpack(release)
            self.home = os.path.join(self.dir, "couchdb")
            with open(os.path.join(self.home, "releases", "start_erl.data")) as fh:
                erts = fh.read().split()[0]
            self.erts_bin = os.path.join(self.home, "erts-%s" % erts, "bin")
            self._start_epmd()
        except BaseException:
            self.close()
            raise

    def _unpack(self, release):
        if shutil.which("tar") and shutil.which("xz"):
            subprocess.check_call(["tar", "-xJf", release, "-C", self.dir])
            return
        import tarfile
        with tarfile.open(release) as tar:
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(self.dir, filter="tar")
            else:
                tar.extractall(self.dir)

    def _start_epmd(self):
        self.epmd_port = free_port()
        self.epmd = subprocess.Popen(
            [os.path.join(self.erts_bin, "epmd"), "-address", "127.0.0.1",
             "-port", str(self.epmd_port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        self.watch(self.epmd.pid)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.epmd_port), 0.5).close()
                return
            except OSError:
                if self.epmd.poll() is not None:
                    break
                time.sleep(0.05)
        raise SetupError("epmd did not start on 127.0.0.1:%d" % self.epmd_port)

    def _tell(self, line):
        with self._pipe_lock:
            if self.watchdog.stdin is not None and not self.watchdog.stdin.closed:
                try:
                    self.watchdog.stdin.write(line.encode("ascii") + b"\n")
                    self.watchdog.stdin.flush()
                except OSError:
                    pass

    def watch(self, pid):
        self._tell("watch %d" % pid)

    def forget(self, pid):
        self._tell("forget %d" % pid)

    def close(self):
        """Stop every node and the epmd, remove the directory (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for node in list(self.nodes):
            try:
                node.stop()
            except Exception:
                pass
        epmd = getattr(self, "epmd", None)
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()
        with self._pipe_lock:
            try:
                self.watchdog.stdin.close()
            except OSError:
                pass
        try:
            self.watchdog.wait(30)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# HTTP ########################################################################

def http(method, url, body=None, auth=None, timeout=10):
    """``(status, decoded JSON or None)`` of one request; never raises for HTTP statuses."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(("%s:%s" % auth).encode("utf-8")).decode("ascii")
        req.add_header("Authorization", "Basic " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload.decode("utf-8")) if payload else None
    except ValueError:
        return status, None


# Nodes #######################################################################

class CouchDBNode(object):
    """One CouchDB node: its own data directory, HTTP port and Erlang node name.

    ``stop()`` and ``start()`` may be called again and again: a node started
    again keeps its data, port and name (a cluster node rejoins its cluster).
    """

    def __init__(self, runtime, label, username, password, cluster=None):
        self.runtime = runtime
        self.label = label
        self.username, self.password = username, password
        self.port = free_port()
        self.dist_port = free_port()
        self.name = "%s-%s@127.0.0.1" % (label, _random_hex(5))
        self.url = "http://127.0.0.1:%d" % self.port
        self.dir = os.path.join(runtime.dir, label)
        self.proc = None
        self.clustered = cluster is not None
        os.makedirs(os.path.join(self.dir, "data"))
        shared = cluster or {"uuid": _random_hex(16), "secret": _random_hex(16),
                             "cookie": _random_hex(16)}
        self._write_config(shared)
        runtime.nodes.append(self)

    def _write_config(self, shared):
        data = os.path.join(self.dir, "data")
        ini = [
            "[couchdb]",
            "single_node = %s" % ("false" if self.clustered else "true"),
            "database_dir = %s" % data,
            "view_index_dir = %s" % data,
            "uuid = %s" % shared["uuid"],
            "[cluster]",
            "n = %d" % (3 if self.clustered else 1),
            "q = 2",
            "[chttpd]",
            "bind_address = 127.0.0.1",
            "port = %d" % self.port,
            "[chttpd_auth]",
            "secret = %s" % shared["secret"],
            "[chttpd_auth_lockout]",
            "mode = off",
            "[admins]",
            "%s = %s" % (self.username, self.password),
            "[prometheus]",
            "additional_port = false",
            "[nouveau]",
            "enable = false",
            "[log]",
            "writer = file",
            "file = %s" % os.path.join(self.dir, "couch.log"),
            "level = warning",
        ]
        # The ini file CouchDB rewrites (it hashes the admin password in it): owner only.
        path = os.path.join(self.dir, "node.ini")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(ini) + "\n")
        args = [
            "-name %s" % self.name,
            "-setcookie %s" % shared["cookie"],
            "-kernel inet_dist_use_interface {127,0,0,1}",
            "-kernel inet_dist_listen_min %d" % self.dist_port,
            "-kernel inet_dist_listen_max %d" % self.dist_port,
            # The rest as in the release's etc/vm.args.
            "-kernel error_logger silent",
            "-sasl sasl_error_logger false",
            "-kernel prevent_overlapping_partitions false",
            "+SDio 16",
            "+Bd -noinput",
            "-os_mon start_cpu_sup false",
            "-os_mon start_memsup false",
            "-os_mon disk_space_check_interval 5",
            "-os_mon disk_almost_full_threshold 1.0",
        ]
        # Extra emulator flags for measurements, e.g. "+sbwt none +sbwtdcpu none +sbwtdio
        # none" (schedulers that do not spin: the CPU time /proc shows is then work).
        extra = os.environ.get("PICAS_COUCHDB_VM_ARGS", "").strip()
        if extra:
            args.append(extra)
        path = os.path.join(self.dir, "node.args")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(args) + "\n")

    @property
    def auth(self):
        return (self.username, self.password)

    def __repr__(self):
        return "<CouchDBNode %s %s%s>" % (self.label, self.url, "" if self.running else " stopped")

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=90):
        """Start the node and wait until it answers ``GET /`` (a single node: and has _users)."""
        if self.running:
            return self
        env = dict(os.environ)
        for name in list(env):
            if name.startswith(("ERL_", "COUCHDB_")):
                del env[name]
        env.update(ERL_EPMD_ADDRESS="127.0.0.1", ERL_EPMD_PORT=str(self.runtime.epmd_port),
                   COUCHDB_ARGS_FILE=os.path.join(self.dir, "node.args"),
                   COUCHDB_INI_FILES="%s %s" % (os.path.join(self.runtime.home, "etc", "default.ini"),
                                                os.path.join(self.dir, "node.ini")))
        with open(os.path.join(self.dir, "out.log"), "ab") as out:
            self.proc = subprocess.Popen(
                [os.path.join(self.runtime.home, "bin", "couchdb")], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        # bin/couchdb execs erlexec, which execs beam.smp: the pid stays the node's.
        self.runtime.watch(self.proc.pid)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready():
                return self
            time.sleep(0.1)
        problem = ("exited with status %s" % self.proc.returncode if self.proc.poll() is not None
                   else "did not answer within %d s" % timeout)
        self.stop()
        raise SetupError("CouchDB node %s on %s %s; its log: %s"
                         % (self.label, self.url, problem, self.log_tail()))

    def _ready(self):
        try:
            status, _ = http("GET", self.url + "/", timeout=2)
            if status != 200:
                return False
            if self.clustered:
                return True
            return http("GET", self.url + "/_users", auth=self.auth, timeout=2)[0] == 200
        except (OSError, ValueError):
            return False

    def alive(self):
        try:
            return http("GET", self.url + "/", timeout=2)[0] == 200
        except (OSError, ValueError):
            return False

    def stop(self, grace=STOP_GRACE):
        """SIGTERM the node's beam.smp, SIGKILL after ``grace`` s; then its helper processes.

        Raises SetupError if any of its processes is still alive afterwards.
        """
        proc = self.proc
        if proc is None:
            return
        def wait(seconds):
            try:
                proc.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        left = kill_tree(proc.pid, grace, wait) if proc.poll() is None else []
        proc.wait()
        self.runtime.forget(proc.pid)
        self.proc = None
        if left:
            raise SetupError("processes of CouchDB node %s still alive: %s" % (self.label, left))

    def log_tail(self, size=2000):
        text = ""
        for name in ("out.log", "couch.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as fh:
                    fh.seek(0, 2)
                    fh.seek(max(0, fh.tell() - size))
                    text += "[%s] %s\n" % (name, fh.read().decode("utf-8", "replace"))
            except OSError:
                pass
        return text.replace(self.password, "***") if self.password else text


def start_node(username="admin", password="admin", release=None):
    """Start a single node (``single_node = true``) and return it, ready."""
    runtime = _Runtime.get(release)
    return CouchDBNode(runtime, "node%d" % (len(runtime.nodes) + 1), username, password).start()


class CouchDBCluster(object):
    """``size`` nodes of one cluster (n=3 copies, q=2 shards), joined and ready."""

    def __init__(self, username="admin", password="admin", size=3, release=None):
        runtime = _Runtime.get(release)
        shared = {"uuid": _random_hex(16), "secret": _random_hex(16), "cookie": _random_hex(16)}
        base = len(runtime.nodes)
        self.nodes = [CouchDBNode(runtime, "node%d" % (base + i + 1), username, password,
                                  cluster=shared) for i in range(size)]
        self.username, self.password = username, password

    @property
    def urls(self):
        return [node.url for node in self.nodes]

    def start(self, timeout=120):
        """Start the nodes (in parallel), join them, create _users and _replicator."""
        errors = []

        def start(node):
            try:
                node.start(timeout)
            except Exception as exc:    # reported below, after every thread ended
                errors.append(exc)
        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            status, body = http("PUT", "%s/_node/_local/_nodes/%s" % (first.url, node.name), {},
                                auth=first.auth)
            if status not in (201, 202, 409):
                self.stop()
                raise SetupError("joining %s to the cluster: HTTP %d %s" % (node.name, status, body))
        try:
            self.wait_healthy(timeout)
            for db in ("_users", "_replicator"):
                status, body = http("PUT", "%s/%s" % (first.url, db), auth=first.auth)
                if status not in (201, 202, 412):
                    raise SetupError("creating %s: HTTP %d %s" % (db, status, body))
        except BaseException:
            self.stop()
            raise
        return self

    def membership_ok(self, nodes=None):
        """True when every running node (or each of ``nodes``) sees every node connected."""
        names = sorted(n.name for n in self.nodes)
        for node in nodes or [n for n in self.nodes if n.running]:
            try:
                status, body = http("GET", node.url + "/_membership", auth=node.auth, timeout=3)
            except (OSError, ValueError):
                return False
            if status != 200 or sorted(body.get("all_nodes", [])) != names \
                    or sorted(body.get("cluster_nodes", [])) != names:
                return False
        return True

    def wait_healthy(self, timeout=120):
        """Wait until every node runs and lists all nodes in ``_membership``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(n.running for n in self.nodes) and self.membership_ok():
                return self
            time.sleep(0.2)
        raise SetupError("the CouchDB cluster %s did not come together within %d s"
                         % (", ".join(self.urls), timeout))

    def stop(self):
        problems = []
        threads = []
        for node in self.nodes:
            def stop(node=node):
                try:
                    node.stop()
                except SetupError as exc:
                    problems.append(exc)
            threads.append(threading.Thread(target=stop))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if problems:
            raise problems[0]


def start_cluster(username="admin", password="admin", size=3, release=None):
    return CouchDBCluster(username, password, size, release).start()


def close():
    """Stop every node this process started and remove the temporary directory."""
    if _Runtime._instance is not None:
        _Runtime._instance.close()


# Command line ################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", action="store_true", help="three nodes (n=3, q=2)")
    parser.add_argument("--watchdog", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watchdog:
        _watchdog_main(args.watchdog)
        return 0
    password = os.environ.get("PICAS_PASSWORD")
    started = time.time()
    try:
        runtime = _Runtime.get()
        where = "PICAS_PASSWORD"
        if not password:
            # Made up here and never printed: it goes into a file only we can read.
            password = _random_hex(12)
            where = os.path.join(runtime.dir, "admin-password")
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
        if args.cluster:
            nodes = start_cluster("admin", password).nodes
        else:
            nodes = [start_node("admin", password)]
    except SetupError as exc:
        print("error: %s" % exc, file=sys.stderr)
        close()
        return 1
    print("CouchDB 3.4.3 %s up in %.1f s; admin user 'admin', password: %s"
          % ("3-node cluster (n=3, q=2)" if args.cluster else "single node",
             time.time() - started, where))
    for node in nodes:
        print("  %s   (node %s, data in %s)" % (node.url, node.name, node.dir))
    print("Ctrl-C stops it and removes everything.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *a: stop.set())
    while not stop.wait(1):
        pass
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
