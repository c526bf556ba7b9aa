"""Install and start pouchdb-server, a CouchDB-compatible server, on 127.0.0.1.

Used by the test suite (tests/conftest.py) and the demo (examples/demo.py).
pouchdb-server comes from the npm registry, pinned by package-lock.json next
to this file and installed with ``npm ci --ignore-scripts`` on first use. It
keeps everything in memory and writes its config and log into a throw-away
working directory.
"""
import fcntl
import os
import shutil
import socket
import signal
import subprocess
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = os.path.join(HERE, "node_modules", "pouchdb-server", "bin", "pouchdb-server")


def _die_with_parent():
    """In the child, before node starts: on Linux, be sent SIGTERM when the process
    that started us dies, even by SIGKILL (a killed pytest leaves no server behind)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SetupError(Exception):
    """Node.js or npm is missing, or the install failed."""


def install():
    """Install pouchdb-server with ``npm ci`` once (a file lock guards parallel runs)."""
    with open(os.path.join(HERE, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(BINARY):
            npm = shutil.which("npm")
            if npm is None or shutil.which("node") is None:
                raise SetupError("Node.js and npm are needed to run pouchdb-server "
                                 "(apt-get install nodejs npm)")
            subprocess.check_call([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
                                   "--loglevel=error"], cwd=HERE)
    return BINARY


def free_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class PouchDBServer(object):
    """One in-memory pouchdb-server process with an admin user."""

    def __init__(self, username="admin", password="admin", port=None):
        self.username, self.password = username, password
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.proc = None
        self.workdir = None

    def start(self, timeout=30):
        binary = install()
        self.workdir = tempfile.mkdtemp(prefix="picas-pouchdb-")
        with open(os.path.join(self.workdir, "config.json"), "w") as fh:
            fh.write('{"admins": {"%s": "%s"}, "log": {"level": "error"}}'
                     % (self.username, self.password))
        self.proc = subprocess.Popen(
            ["node", binary, "--in-memory", "-o", "127.0.0.1", "-p", str(self.port), "-n"],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SetupError("pouchdb-server did not start on %s" % self.url)

    def alive(self):
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
