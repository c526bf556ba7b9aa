#!/usr/bin/env python3
"""Benchmark picas.py side by side with upstream picas on one local server.

    python3 bench/bench.py                         # the full run (about 10 minutes)
    python3 bench/bench.py --quick --no-upstream   # a smoke test (seconds)
    python3 bench/bench.py --json results.json --profile
    python3 bench/bench.py --couchdb               # on a real Apache CouchDB node
    python3 bench/bench.py --url http://127.0.0.1:5984   # on any server (see below)

One server serves both clients: by default an in-memory pouchdb-server
(tests/server/pouchdb.py); with ``--couchdb`` a single node of the shared
Apache CouchDB 3.4.3 build (tests/server/couchdb.py; ``../shared/couchdb/``
or ``PICAS_COUCHDB_RELEASE``), started for the run; with ``--url`` a plain
``http://`` server of your own, whose admin credentials come from the URL or
from ``PICAS_USERNAME`` and ``PICAS_PASSWORD`` (never printed). The benchmark
creates and deletes databases named ``bench-NN-...`` there.
Upstream picas (``pip install picas CouchDB==1.2``) goes into a virtual
environment cached in bench/.venv-upstream (ignored by git; ``--venv`` picks
another place); picas.py runs in a fresh virtual environment without packages
made from the same interpreter, so neither sees the base installation's
site-packages. Measured, for picas.py and for upstream:

1. one pilot, ``--tokens`` trivial tasks (``true``): tokens/s (the median of
   ``--repeat`` runs, without the counting proxy; then one run through it) and
   HTTP requests per token;
2. 1, 4 and 16 concurrent pilot processes over ``--conc-tokens`` tokens:
   a direct run for the aggregate tokens/s, then one through the proxy for
   conflicts per claim (409 answers, and per-document conflicts in
   ``_bulk_docs`` answers); in both, how often each token ran (the task
   appends its token id to a file);
3. start-up: ``python picas.py --version`` and the import cost of ``picas``
   beyond a bare interpreter (medians of interleaved runs), ``-X importtime``;
4. memory: peak RSS (VmHWM) of an idle endless pilot and of a busy pilot;
5. idle cost: requests per minute of an endless pilot on an empty queue, once
   its back-off has settled (4 and 5 run in the background during the rest);
6. the ceiling: the server's rate for the bare claim cycle (view read with
   include_docs and limit=1, lock PUT, result PUT) on one keep-alive
   connection, plus variants (log attachments; one view read per 16); and
   the server's write ceiling for 1, 4 and 16 writers: that many processes
   PUTting ``--conc-tokens`` tokens once each (one durable write per token,
   the least a pilot needs), which the concurrent pilots are measured
   against.

Requests and 409s are counted by a thin TCP proxy (one thread per direction
per connection, reading only the first bytes of each request and response).
picas.py runs as users run it: ``python picas.py run -- COMMAND``. Upstream
runs a pilot written the way its examples are (RunActor subclass,
TaskViewIterator, ``execute``, ``BasicTokenModifier.close``).

The script itself needs only the standard library (Python 3.6 or newer);
upstream needs Python 3.9 or newer for its virtual environment.
"""
from __future__ import print_function

import argparse
import base64
import collections
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PICAS_PY = os.path.join(ROOT, "picas.py")
SERVER_DIR = os.path.join(ROOT, "tests", "server")
DEFAULT_VENV = os.path.join(HERE, ".venv-upstream")
UPSTREAM_REQUIREMENTS = ["picas", "CouchDB==1.2"]

USER, PASSWORD = "admin", "bench-pw"
DESIGN = "Monitor"

#: The standard PiCaS views (upstream's create_views.py; picas.py writes the same).
_MAP = ('function(doc) {\n   if(doc.type == "token") {\n    if(%s) {\n'
        '      emit(doc._id, doc._id);\n    }\n  }\n}\n')
_STATES = [("todo", "doc.lock == 0 && doc.done == 0"),
           ("locked", "doc.lock > 0 && doc.done == 0"),
           ("done", "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) == 0"),
           ("error", "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) != 0")]
VIEWS = dict((name, {"map": _MAP % cond}) for name, cond in _STATES)
VIEWS["overview_total"] = {
    "map": 'function(doc) {\n   if(doc.type == "token") {\n%s  }\n}\n' % "".join(
        "    if(%s) {\n      emit('%s', 1);\n    }\n" % (cond, name) for name, cond in _STATES),
    "reduce": "function (key, values, rereduce) {\n   return sum(values);\n}\n"}

#: The upstream pilot, written the way upstream's examples/local_example.py is.
UPSTREAM_PILOT = '''\
"""Upstream picas pilot for bench.py (modelled on upstream's examples/local_example.py)."""
import os
import sys

from picas.actors import RunActor
from picas.clients import CouchDB
from picas.executers import execute
from picas.iterators import TaskViewIterator, EndlessViewIterator
from picas.modifiers import BasicTokenModifier


class BenchActor(RunActor):
    def __init__(self, db, modifier, command, view="todo", **viewargs):
        super(BenchActor, self).__init__(db, view=view, **viewargs)
        self.modifier = modifier
        self.command = command

    def process_task(self, token):
        out = execute(self.command + [str(token["input"]), token["_id"]])
        token["exit_code"] = out[1]
        token = self.modifier.close(token)


def main():
    argv = sys.argv[1:]
    endless = "--endless" in argv[:argv.index("--")]
    command = argv[argv.index("--") + 1:]
    client = CouchDB(url=os.environ["BENCH_URL"], db=os.environ["BENCH_DB"],
                     username=os.environ["BENCH_USER"], password=os.environ["BENCH_PASSWORD"])
    actor = BenchActor(client, BasicTokenModifier(), command)
    if endless:
        actor.iterator = EndlessViewIterator(TaskViewIterator(client, "todo"))
    actor.run()


if __name__ == "__main__":
    main()
'''

#: The task of the concurrency runs: note which token ran (one short line, O_APPEND).
RECORD_TASK = '#!/bin/sh\necho "$2" >> "$BENCH_EXEC_LOG"\n'


#: Variables that would make the measured interpreters differ from a user's default.
_ENV_DROP = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONSTARTUP",
             "PYTHONHOME", "PYTHONINSPECT", "PYTHONPROFILEIMPORTTIME")


def clean_env(**extra):
    env = dict((k, v) for k, v in os.environ.items() if k not in _ENV_DROP)
    env.update(extra)
    return env


def log(message):
    print("bench: %s" % message, file=sys.stderr)
    sys.stderr.flush()


###############################################################################
# A minimal CouchDB client for setting up and checking (not measured) #########
###############################################################################

class Couch(object):
    def __init__(self, url, user=None, password=None):
        host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)
        user = USER if user is None else user
        password = PASSWORD if password is None else password
        self.headers = {"Accept": "application/json", "Content-Type": "application/json",
                        "Authorization": "Basic " + base64.b64encode(
                            ("%s:%s" % (user, password)).encode()).decode()}
        self.conn = None

    def request(self, method, path, body=None, ok=(200, 201, 202)):
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        result = json.loads(payload.decode("utf-8")) if payload else None
        if ok and resp.status not in ok:
            raise RuntimeError("%s %s: HTTP %d %s" % (method, path, resp.status, result))
        return resp.status, result

    def create_db(self, name):
        self.request("DELETE", "/" + name, ok=None)
        self.request("PUT", "/" + name)
        self.request("PUT", "/%s/_design/%s" % (name, DESIGN),
                     {"language": "javascript", "views": VIEWS})

    def delete_db(self, name):
        self.request("DELETE", "/" + name, ok=None)

    def push(self, name, count, prefix="token"):
        ids = ["%s-%05d" % (prefix, i) for i in range(count)]
        for start in range(0, count, 500):
            docs = [{"_id": i, "type": "token", "lock": 0, "done": 0, "hostname": "",
                     "scrub_count": 0, "input": "input of %s" % i, "exit_code": "",
                     "error": []} for i in ids[start:start + 500]]
            _, results = self.request("POST", "/%s/_bulk_docs" % name, {"docs": docs})
            bad = [r for r in results if "error" in r]
            if bad:
                raise RuntimeError("pushing tokens failed: %s" % bad[:3])
        # Build the todo index now, so that no pilot pays for it.
        self.request("GET", "/%s/_design/%s/_view/todo?limit=1" % (name, DESIGN))
        return ids

    def prepare(self, name, count, prefix="token"):
        self.create_db(name)
        return self.push(name, count, prefix) if count else []

    def states(self, name):
        _, result = self.request("GET", "/%s/_all_docs?include_docs=true" % name)
        counts = collections.Counter()
        for row in result["rows"]:
            doc = row.get("doc") or {}
            if doc.get("type") == "token":
                counts[token_state(doc)] += 1
        return dict(counts)


def token_state(doc):
    def num(value):
        try:
            return float(value or 0)
        except (TypeError, ValueError):
            return None
    lock, done = num(doc.get("lock")), num(doc.get("done"))
    if lock == 0 and done == 0:
        return "todo"
    if lock and lock > 0 and done == 0:
        return "locked"
    if lock and lock > 0 and done and done > 0:
        match = re.match(r"\s*[-+]?\d+", str(doc.get("exit_code")))
        return "done" if match and int(match.group()) == 0 else "error"
    return "other"


###############################################################################
# A counting proxy ############################################################
###############################################################################

def put_each_once(couch, db, docs, writers):
    """PUT every one of ``docs`` once (a lock update) from ``writers`` forked processes, each
    with its own keep-alive connection, all starting together; their (start, end) times.
    Raises RuntimeError when a writer fails."""
    shares = [docs[k::writers] for k in range(writers)]
    start_at = time.time() + 1.0 + 0.05 * writers   # every writer connected by then
    procs = []
    for share in shares:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                                 # the writer
            os.close(read_end)
            report = b""
            try:
                conn = http.client.HTTPConnection(couch.host, couch.port, timeout=120)
                conn.connect()
                time.sleep(max(0.0, start_at - time.time()))
                t0 = time.perf_counter()
                for doc in share:
                    doc.update(lock=int(time.time()), hostname="bench", pilot_id="writer")
                    conn.request("PUT", "/%s/%s" % (db, doc["_id"]),
                                 body=json.dumps(doc).encode(), headers=couch.headers)
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 201:
                        raise RuntimeError("HTTP %d" % resp.status)
                report = ("%r %r" % (t0, time.perf_counter())).encode()
            except Exception as exc:                 # told to the parent
                report = ("!" + repr(exc)).encode()
            finally:
                os.write(write_end, report)
                os._exit(0)
        os.close(write_end)
        procs.append((pid, read_end))
    spans, failures = [], []
    for pid, read_end in procs:
        with os.fdopen(read_end) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not text or text.startswith("!"):
            failures.append(text[1:] or "exit status %d" % status)
        else:
            spans.append([float(x) for x in text.split()])
    if failures:
        raise RuntimeError("a writer failed: %s" % failures[0])
    return spans


class CountingProxy(object):
    """A thin TCP proxy on 127.0.0.1 that notes every HTTP request and its status.

    Clients send a request only after reading the previous answer, so every
    request and every response starts a fresh read; only those first bytes
    are looked at. ``records`` holds ``[time, method, path, status]``.
    """

    _REQUEST = re.compile(br"(GET|HEAD|PUT|POST|DELETE|COPY) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream_port, upstream_host="127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.records = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self._accept_loop)
        self._thread.daemon = True
        self._thread.start()

    def stop(self):
        self._stopped = True
        self._thread.join()
        self._listener.close()

    def _accept_loop(self):
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            pending = collections.deque()
            state = {"open": 2}
            for target in (self._pump_requests, self._pump_responses):
                thread = threading.Thread(target=target, args=(client, server, pending, state))
                thread.daemon = True
                thread.start()

    def _finish(self, client, server, state):
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            state["open"] -= 1
            last = state["open"] == 0
        if last:
            client.close()
            server.close()

    def _pump_requests(self, client, server, pending, state):
        try:
            while True:
                data = client.recv(262144)
                if not data:
                    break
                match = self._REQUEST.match(data)
                if match:
                    record = [time.time(), match.group(1).decode("ascii"),
                              match.group(2).decode("latin-1"), None, 0]
                    pending.append(record)
                    with self._lock:
                        self.records.append(record)
                server.sendall(data)
        except OSError:
            pass
        finally:
            self._finish(client, server, state)

    def _pump_responses(self, client, server, pending, state):
        current = None
        try:
            while True:
                data = server.recv(262144)
                if not data:
                    break
                if data.startswith(b"HTTP/1.") and pending:
                    current = pending.popleft()
                    try:
                        current[3] = int(data[9:12])
                    except ValueError:
                        pass
                if current is not None and "_bulk_docs" in current[2]:
                    # A conflict inside a _bulk_docs answer is a lost compare-and-set
                    # too, reported per document instead of as a 409.
                    current[4] += data.count(b'"error":"conflict"')
                client.sendall(data)
        except OSError:
            pass
        finally:
            self._finish(client, server, state)

    def snapshot(self):
        with self._lock:
            return [list(r) for r in self.records]


def classify(method, path):
    """Name a request for the per-token breakdown."""
    path = path.split("?", 1)[0]
    parts = path.strip("/").split("/")
    if "_view" in parts:
        return "view read"
    if method == "PUT" and len(parts) == 2:
        return "doc PUT"
    if method == "GET" and len(parts) == 2 and not parts[1].startswith("_"):
        return "doc GET"
    if method == "HEAD" and len(parts) == 1:
        return "db HEAD"
    if method == "POST" and parts[-1] == "_bulk_docs":
        return "bulk write (result + next lock)"
    return "%s other" % method


def summarize_requests(records, tokens):
    kinds = collections.Counter(classify(r[1], r[2]) for r in records)
    statuses = collections.Counter(r[3] for r in records)
    return {"requests": len(records),
            "per_token": round(len(records) / float(tokens), 3) if tokens else None,
            "by_kind": dict(kinds),
            "conflicts_409": statuses.get(409, 0) + sum(r[4] for r in records if len(r) > 4),
            "by_status": dict((str(k), v) for k, v in statuses.items())}


###############################################################################
# Processes: timing, exit status, peak memory #################################
###############################################################################

def _proc_status(pid):
    values = {}
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    values[name] = int(rest.split()[0])      # kB
    except (OSError, ValueError, IndexError):
        pass
    return values


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as fh:
            return [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return []


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


class MemorySampler(object):
    """Polls VmHWM of processes (and the RSS of picas.py's watchdog helper) while they run."""

    def __init__(self, pids, interval=0.2):
        self.pids = list(pids)
        self.hwm = dict((pid, 0) for pid in self.pids)
        self.helper_rss = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._loop)
        self._thread.daemon = True
        self._thread.start()

    def _loop(self):
        while True:
            for pid in self.pids:
                status = _proc_status(pid)
                if status.get("VmHWM"):
                    self.hwm[pid] = max(self.hwm[pid], status["VmHWM"])
                for child in _children(pid):
                    argv = _cmdline(child)
                    if b"-I" in argv and b"-S" in argv and b"-c" in argv:
                        self.helper_rss = max(self.helper_rss,
                                              _proc_status(child).get("VmRSS", 0))
            if self._stop.wait(self._interval):
                return

    def stop(self):
        self._stop.set()
        self._thread.join()


#: Every pilot this script started and has not reaped yet: killed if the run is abandoned.
_LIVE = set()
_LIVE_LOCK = threading.Lock()
#: Why the run was abandoned (the server died, this script was orphaned), or None.
_ABORT = []


def _spawn(argv, **kwargs):
    proc = subprocess.Popen(argv, **kwargs)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def _reaped(proc):
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def kill_all():
    """SIGKILL every pilot still running (each pilot's watchdog then kills its task)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        try:
            proc.kill()
        except OSError:
            pass


class Guard(object):
    """Abandons the run when the server dies or whoever started this script is gone.

    Without it, pilots whose server died keep retrying (a picas.py pilot tries to
    save a result for an hour), and an orphaned benchmark runs on unseen.
    """

    def __init__(self, server, interval=0.5):
        self.server = server
        self.parent = os.getppid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,))
        self._thread.daemon = True
        self._thread.start()

    def _loop(self, interval):
        while not self._stop.wait(interval):
            reason = None
            if self.server.proc is not None and self.server.proc.poll() is not None:
                reason = "%s exited (status %s) in the middle of the run" \
                    % (self.server.name, self.server.proc.returncode)
            elif os.getppid() != self.parent:
                reason = "the process that started bench.py is gone"
            if reason:
                _ABORT.append(reason)
                log("ABORTING: %s" % reason)
                kill_all()
                return

    def stop(self):
        self._stop.set()


def _exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_pilots(argvs, env, workdir, sample_memory=False, timeout=900):
    """Start all pilots at once, wait for all; return wall time, exit codes, peak RSS.

    Pilots still running after ``timeout`` seconds are killed and the run fails.
    """
    procs = []
    outs = []
    start = time.perf_counter()
    for number, argv in enumerate(argvs):
        out = open(os.path.join(workdir, "pilot-%d.log" % number), "wb")
        outs.append(out)
        procs.append(_spawn(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT))
    sampler = MemorySampler([p.pid for p in procs]) if sample_memory else None
    timed_out = []

    def on_timeout():
        timed_out.append(True)
        kill_all()
    killer = threading.Timer(timeout, on_timeout)
    killer.daemon = True
    killer.start()
    codes, cpu = [], []
    try:
        for proc in procs:
            # ru_utime/ru_stime: the pilot and the tasks it waited for. (Not ru_maxrss: on
            # Linux it also holds the RSS of the parent the pilot was forked from.)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = _exit_code(status)
            _reaped(proc)
            codes.append(proc.returncode)
            cpu.append(usage.ru_utime + usage.ru_stime)
    finally:
        wall = time.perf_counter() - start
        killer.cancel()
        if sampler is not None:
            sampler.stop()
        for out in outs:
            out.close()
        if len(codes) < len(procs):         # interrupted: leave nothing running
            kill_all()
    if _ABORT:
        raise RuntimeError(_ABORT[0])
    if timed_out:
        raise RuntimeError("pilots still running after %d s (see %s)" % (timeout, workdir))
    result = {"wall": wall, "exit_codes": codes, "cpu_s": cpu}
    if sampler is not None:
        result["vmhwm_kb"] = [sampler.hwm[p.pid] for p in procs]
        result["helper_rss_kb"] = sampler.helper_rss
    return result


def tail(path, lines=15):
    try:
        with open(path, "rb") as fh:
            return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return ""


###############################################################################
# The two clients #############################################################
###############################################################################

class Client(object):
    """How to start one client's pilot and time its import."""

    name = None

    def pilot_argv(self, url, db, command, endless=False):
        raise NotImplementedError

    def env(self, url, db):
        raise NotImplementedError


class PicasPy(Client):
    name = "picas.py"

    def __init__(self, python):
        self.python = python

    def pilot_argv(self, url, db, command, endless=False):
        argv = [self.python, PICAS_PY, "--url", url, "--db", db, "run"]
        if endless:
            argv.append("--endless")
        return argv + ["--"] + command

    def env(self, url, db):
        return clean_env(PICAS_USERNAME=USER, PICAS_PASSWORD=PASSWORD)

    def version(self):
        out = subprocess.check_output([self.python, PICAS_PY, "--version"],
                                      universal_newlines=True)
        return out.strip()


class Upstream(Client):
    name = "upstream"

    def __init__(self, venv):
        self.venv = venv
        self.python = os.path.join(venv, "bin", "python")
        self.script = os.path.join(venv, "bench_pilot.py")
        with open(self.script, "w") as fh:
            fh.write(UPSTREAM_PILOT)

    def pilot_argv(self, url, db, command, endless=False):
        return [self.python, self.script] + (["--endless"] if endless else []) + ["--"] + command

    def env(self, url, db):
        return clean_env(BENCH_URL=url, BENCH_DB=db, BENCH_USER=USER, BENCH_PASSWORD=PASSWORD)

    def version(self):
        code = ("from importlib.metadata import version as v; print('picas %s, CouchDB %s, "
                "stopit %s' % (v('picas'), v('CouchDB'), v('stopit')))")
        return subprocess.check_output([self.python, "-c", code], universal_newlines=True,
                                       stderr=subprocess.DEVNULL).strip()


def ensure_upstream_venv(venv, base_python):
    """Create (or reuse) the virtual environment with upstream picas; return it or raise."""
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".bench-ok")
    if os.path.exists(marker) and os.path.exists(python):
        if subprocess.call([python, "-c", "import picas, couchdb, stopit"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
            return venv, 0.0
    started = time.time()
    shutil.rmtree(venv, ignore_errors=True)
    log("creating %s and installing %s (once; cached afterwards)"
        % (venv, " ".join(UPSTREAM_REQUIREMENTS)))
    subprocess.check_call([base_python, "-m", "venv", venv])
    logfile = os.path.join(venv, "pip-install.log")
    with open(logfile, "wb") as out:
        code = subprocess.call([python, "-m", "pip", "install"] + UPSTREAM_REQUIREMENTS,
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError("pip install %s failed (exit %d); last lines of %s:\n%s"
                           % (" ".join(UPSTREAM_REQUIREMENTS), code, logfile, tail(logfile)))
    with open(marker, "w") as fh:
        fh.write("ok\n")
    return venv, time.time() - started


###############################################################################
# The measurements ############################################################
###############################################################################

class Bench(object):
    def __init__(self, args, server, clients, workroot):
        self.args = args
        self.server = server
        self.clients = clients
        self.couch = Couch(server.url)
        self.workroot = workroot
        self.results = {}
        self._dbs = 0
        # A copy of picas.py in a folder of its own, imported with PYTHONPATH: Python caches
        # its bytecode in __pycache__ there, as it would next to a user's job script.
        self.module_dir = os.path.join(workroot, "module")
        os.makedirs(self.module_dir)
        shutil.copy2(PICAS_PY, self.module_dir)

    def _db(self, label):
        self._dbs += 1
        return "bench-%02d-%s" % (self._dbs, re.sub(r"[^a-z0-9]+", "-", label.lower()))

    def _workdir(self, label):
        path = os.path.join(self.workroot, label)
        os.makedirs(path)
        return path

    # -- (6) the ceiling ------------------------------------------------------

    def ceiling(self, count, repeat):
        """The bare claim cycle on one keep-alive connection: view read, lock PUT, result PUT.

        Also two variants: the result PUT carrying two empty log attachments (as
        picas.py's ``run`` writes them), and one view read of 16 rows per 16 tokens.
        Each is run ``repeat`` times, interleaved; the median counts.
        """
        variants = (("bare", False, 1, False), ("with_logs", True, 1, False),
                    ("window16", False, 16, False), ("bulk16", True, 16, True))
        walls = dict((variant[0], []) for variant in variants)
        # Warm the server up first (node compiles its hot paths on first use).
        self._claim_cycle(min(count, 200), True, 1)
        self._claim_cycle(min(count, 200), False, 16)
        self._claim_cycle(min(count, 200), True, 16, bulk=True)
        for round_ in range(repeat):
            shift = round_ % len(variants)          # a different order every round
            for variant, attach, window, bulk in variants[shift:] + variants[:shift]:
                walls[variant].append(self._claim_cycle(count, attach, window, bulk))
        out = {}
        for variant in (v[0] for v in variants):
            wall = statistics.median(walls[variant])
            out[variant] = {"tokens": count, "wall": round(wall, 3),
                            "tokens_per_s": round(count / wall, 1),
                            "ms_per_token": round(wall / count * 1000, 2),
                            "all_tokens_per_s": [round(count / w, 1) for w in walls[variant]]}
            log("ceiling (%s): %.1f tokens/s (runs: %s)" % (
                variant, count / wall, ", ".join("%.1f" % (count / w) for w in walls[variant])))
        # What starting one trivial process costs a Python pilot here.
        times = []
        for _ in range(self.args.spawn_runs):
            t0 = time.perf_counter()
            subprocess.call(["true"], stdin=subprocess.DEVNULL, start_new_session=True)
            times.append(time.perf_counter() - t0)
        out["spawn_true_ms"] = round(statistics.median(times) * 1000, 2)
        out["writers"] = {}
        for writers in self.args.pilot_counts:
            rates = [self._write_ceiling(writers, self.args.conc_tokens) for _ in range(repeat)]
            out["writers"][str(writers)] = {"writers": writers, "tokens": self.args.conc_tokens,
                                            "writes_per_s": statistics.median(rates),
                                            "all_writes_per_s": rates}
            log("ceiling: %d writers, one PUT per token: %.1f writes/s (runs: %s)" % (
                writers, statistics.median(rates), ", ".join("%.1f" % r for r in rates)))
        self.results["ceiling"] = out

    def _write_ceiling(self, writers, count):
        """The server's write ceiling for ``writers`` writers: that many processes, each with
        its own keep-alive connection, each PUTting its share of ``count`` tokens once (one
        durable write per token, as a pilot needs at least); writes/s of all together."""
        db = self._db("writers")
        ids = self.couch.prepare(db, count)
        _, rows = self.couch.request("GET", "/%s/_all_docs?include_docs=true" % db)
        docs = [row["doc"] for row in rows["rows"] if row["id"] in set(ids)]
        spans = put_each_once(self.couch, db, docs, writers)
        self.couch.delete_db(db)
        wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        return round(count / wall, 1)

    def _claim_cycle(self, count, attach, window, bulk=False):
        """One run of the bare claim cycle; ``bulk``: picas.py's protocol, each result
        written together with the next lock in one ``_bulk_docs`` POST."""
        db = self._db("ceiling")
        self.couch.prepare(db, count)
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=60)
        headers = dict(self.couch.headers)
        view = "/%s/_design/%s/_view/todo?include_docs=true&limit=%d" % (db, DESIGN, window)

        def call(method, path, body=None):
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status not in (200, 201):
                raise RuntimeError("ceiling: %s %s: %d %s" % (method, path, resp.status, data))
            return json.loads(data.decode("utf-8"))

        def finish(doc):
            doc.update(done=int(time.time()), exit_code=0)
            if attach:
                doc["_attachments"] = dict(
                    ("logs_%s.%s" % (doc["_id"], ext),
                     {"content_type": "text/plain", "data": ""}) for ext in ("out", "err"))
            return doc

        done = 0
        start = time.perf_counter()
        while bulk:
            rows = call("GET", view)["rows"]
            if not rows:
                break
            docs = [row["doc"] for row in rows]
            for doc in docs:
                doc.update(lock=int(time.time()), hostname="bench", pilot_id="bench")
            first = docs[0]
            first["_rev"] = call("PUT", "/%s/%s" % (db, first["_id"]),
                                 json.dumps(first).encode())["rev"]
            for previous, doc in zip(docs, docs[1:]):
                answer = call("POST", "/%s/_bulk_docs" % db, json.dumps(
                    {"docs": [finish(previous), doc]}).encode())
                doc["_rev"] = answer[1]["rev"]
                done += 1
            call("PUT", "/%s/%s" % (db, docs[-1]["_id"]), json.dumps(finish(docs[-1])).encode())
            done += 1
        while not bulk:
            rows = call("GET", view)["rows"]
            if not rows:
                break
            for row in rows:
                doc = row["doc"]
                doc.update(lock=int(time.time()), hostname="bench", pilot_id="bench")
                path = "/%s/%s" % (db, doc["_id"])
                doc["_rev"] = call("PUT", path, json.dumps(doc).encode())["rev"]
                call("PUT", path, json.dumps(finish(doc)).encode())
                done += 1
        wall = time.perf_counter() - start
        conn.close()
        self.couch.delete_db(db)
        if done != count:
            raise RuntimeError("ceiling: claimed %d of %d tokens" % (done, count))
        return wall

    # -- (1) one pilot ----------------------------------------------------------

    def single_pilot(self, count, repeat):
        """One pilot, ``count`` tokens of ``true``: ``repeat`` direct runs per client
        (interleaved; the median counts), then one run through the counting proxy."""
        out = dict((client.name, {"direct_runs": []}) for client in self.clients)
        for round_ in range(repeat):
            order = self.clients if round_ % 2 == 0 else self.clients[::-1]
            for client in order:
                out[client.name]["direct_runs"].append(self._single_run(client, count, False))
        for client in self.clients:
            entry = out[client.name]
            runs = sorted(entry["direct_runs"], key=lambda item: item["tokens_per_s"])
            entry["direct"] = dict(runs[len(runs) // 2])
            entry["direct"]["all_tokens_per_s"] = [r["tokens_per_s"] for r in entry["direct_runs"]]
            entry["direct"]["peak_rss_kb"] = max(r["peak_rss_kb"] for r in runs)
            entry["direct"]["cpu_ms_per_token"] = statistics.median(
                r["cpu_ms_per_token"] for r in runs)
            entry["direct"]["helper_rss_kb"] = max(r["helper_rss_kb"] for r in runs)
            entry["proxied"] = self._single_run(client, count, True)
        self.results["single"] = out

    def _single_run(self, client, count, proxied):
        mode = "proxied" if proxied else "direct"
        db = self._db("single-%s-%s" % (client.name, mode))
        self.couch.prepare(db, count)
        proxy = CountingProxy(self.server.port, self.server.host) if proxied else None
        url = proxy.url if proxy else self.server.url
        workdir = self._workdir(db)
        run = run_pilots([client.pilot_argv(url, db, ["true"])], client.env(url, db),
                         workdir, sample_memory=not proxied)
        if proxy:
            proxy.stop()
        states = self.couch.states(db)
        if run["exit_codes"] != [0] or states.get("done", 0) != count:
            log("%s single pilot (%s): exit %s, states %s; pilot log:\n%s"
                % (client.name, mode, run["exit_codes"], states,
                   tail(os.path.join(workdir, "pilot-0.log"))))
        item = {"tokens": count, "wall": round(run["wall"], 3),
                "tokens_per_s": round(count / run["wall"], 1), "states": states,
                "exit_code": run["exit_codes"][0],
                "cpu_ms_per_token": round(run["cpu_s"][0] / count * 1000, 2)}
        if proxy:
            item.update(summarize_requests(proxy.snapshot(), count))
            item["connections"] = proxy.connections
        else:
            # VmHWM, sampled while it runs; not wait4's ru_maxrss, which on Linux also
            # holds the RSS of the (forked) parent the pilot was exec'ed from.
            item["peak_rss_kb"] = run["vmhwm_kb"][0]
            item["helper_rss_kb"] = run.get("helper_rss_kb", 0)
        self.couch.delete_db(db)
        log("%s, one pilot (%s): %.1f tokens/s%s" % (
            client.name, mode, count / run["wall"],
            ", %.2f requests/token" % item["per_token"] if proxy else ""))
        return item

    # -- (2) concurrent pilots ------------------------------------------------

    def concurrent(self, count, pilot_counts):
        out = {}
        task = os.path.join(self.workroot, "record-task.sh")
        with open(task, "w") as fh:
            fh.write(RECORD_TASK)
        os.chmod(task, 0o755)
        for pilots in pilot_counts:
            for client in self.clients:
                direct = self._concurrent_run(client, pilots, count, task, proxied=False)
                item = self._concurrent_run(client, pilots, count, task, proxied=True)
                # The rate is the direct run's (the proxy costs CPU on a small machine);
                # requests and conflicts are the proxied run's; exactly-once must hold in both.
                item["tokens_per_s_proxied"] = item["tokens_per_s"]
                item["tokens_per_s"], item["wall"] = direct["tokens_per_s"], direct["wall"]
                item["direct"] = direct
                for key in ("max_executions", "tokens_run_more_than_once", "tokens_never_run",
                            "failed_pilots"):
                    item[key] = max(item[key], direct[key])
                out.setdefault(str(pilots), {})[client.name] = item
                log("%s, %d pilots: %.1f tokens/s direct, %.1f through the proxy, %.3f "
                    "409/claim, max executions %d, %d tokens run twice or more, %d failed "
                    "pilots" % (client.name, pilots, item["tokens_per_s"],
                                item["tokens_per_s_proxied"], item["conflicts_per_claim"] or 0,
                                item["max_executions"], item["tokens_run_more_than_once"],
                                item["failed_pilots"]))
        self.results["concurrent"] = out

    def _concurrent_run(self, client, pilots, count, task, proxied):
        label = "conc-%d-%s-%s" % (pilots, client.name, "proxied" if proxied else "direct")
        db = self._db(label)
        ids = self.couch.prepare(db, count)
        workdir = self._workdir(label)
        exec_log = os.path.join(workdir, "executions.txt")
        open(exec_log, "w").close()
        proxy = CountingProxy(self.server.port, self.server.host) if proxied else None
        url = proxy.url if proxy else self.server.url
        env = client.env(url, db)
        env["BENCH_EXEC_LOG"] = exec_log
        argv = client.pilot_argv(url, db, [task])
        run = run_pilots([argv] * pilots, env, workdir)
        if proxy:
            proxy.stop()
        with open(exec_log) as fh:
            runs = collections.Counter(line.strip() for line in fh if line.strip())
        states = self.couch.states(db)
        executions = sum(runs.values())
        # picas.py exits 3 when it found no work; anything else is a failure.
        failed = [c for c in run["exit_codes"] if c not in (0, 3)]
        item = {
            "pilots": pilots, "tokens": count, "wall": round(run["wall"], 3),
            "tokens_per_s": round(count / run["wall"], 1),
            "executions": executions,
            "max_executions": max(runs.values()) if runs else 0,
            "tokens_run_more_than_once": sum(1 for v in runs.values() if v > 1),
            "tokens_never_run": sum(1 for i in ids if i not in runs),
            "states": states, "exit_codes": run["exit_codes"],
            "failed_pilots": len(failed),
        }
        if proxy:
            records = proxy.snapshot()
            requests = summarize_requests(records, count)
            first = min(r[0] for r in records) if records else 0
            item.update({
                "conflicts_409": requests["conflicts_409"],
                "conflicts_409_first_tenth": sum((r[3] == 409) + r[4] for r in records
                                                 if r[0] - first < 0.1 * run["wall"]),
                "conflicts_per_claim": round(requests["conflicts_409"] / float(executions), 4)
                if executions else None,
                "requests_per_token": requests["per_token"],
                "requests_by_kind": requests["by_kind"]})
        if failed:
            bad = [i for i, c in enumerate(run["exit_codes"]) if c not in (0, 3)]
            item["failure_sample"] = tail(os.path.join(workdir, "pilot-%d.log" % bad[0]), 4)
        self.couch.delete_db(db)
        return item

    # -- (3) start-up -----------------------------------------------------------

    def startup(self, runs):
        """Wall times of tiny commands (medians, runs interleaved), and -X importtime.

        Both clients get their bytecode cached first (pip compiled upstream's at
        install; picas.py is imported from a copy in a temporary folder).
        ``python picas.py`` itself never uses a cache: Python compiles a script
        every time it runs it.
        """
        py = self.clients[0].python
        env = clean_env()
        env_import = clean_env(PYTHONPATH=self.module_dir)
        cmds = collections.OrderedDict()
        cmds["picas_bare"] = ([py, "-c", "pass"], env)
        cmds["picas_version"] = ([py, PICAS_PY, "--version"], env)
        cmds["picas_m_version"] = ([py, "-m", "picas", "--version"], env_import)
        cmds["picas_import"] = ([py, "-c", "import picas"], env_import)
        upstream = [c for c in self.clients if c.name == "upstream"]
        if upstream:
            cmds["upstream_bare"] = ([upstream[0].python, "-c", "pass"], env)
            cmds["upstream_import"] = ([upstream[0].python, "-c", "import picas"], env)
        for argv, cmd_env in cmds.values():         # warm caches and write .pyc files
            subprocess.call(argv, env=cmd_env, cwd=self.workroot,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = dict((name, []) for name in cmds)
        for _ in range(runs):
            for name, (argv, cmd_env) in cmds.items():
                t0 = time.perf_counter()
                subprocess.call(argv, env=cmd_env, cwd=self.workroot,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
        med = dict((name, statistics.median(v) * 1000) for name, v in times.items())
        out = {"runs": runs, "median_ms": dict((k, round(v, 1)) for k, v in med.items()),
               "picas_import_cost_ms": round(med["picas_import"] - med["picas_bare"], 1),
               "picas_version_cost_ms": round(med["picas_version"] - med["picas_bare"], 1)}
        with open(PICAS_PY, "rb") as fh:
            source = fh.read()
        compile_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            compile(source, PICAS_PY, "exec")
            compile_times.append(time.perf_counter() - t0)
        out["picas_compile_ms"] = round(statistics.median(compile_times) * 1000, 1)
        out["picas_importtime"] = importtime([py, "-X", "importtime", "-c", "import picas"],
                                             env_import, self.workroot)
        if upstream:
            out["upstream_import_cost_ms"] = round(med["upstream_import"] - med["upstream_bare"], 1)
            out["upstream_importtime"] = importtime(
                [upstream[0].python, "-X", "importtime", "-c", "import picas"], env, self.workroot)
        self.results["startup"] = out
        log("start-up: picas.py --version %.0f ms, import cost %.1f ms%s" % (
            med["picas_version"], out["picas_import_cost_ms"],
            "; upstream import cost %.1f ms" % out["upstream_import_cost_ms"] if upstream else ""))

    # -- (4) + (5) idle pilots: memory and requests per minute ------------------------

    def idle(self, seconds, mem_wait):
        """Endless pilots on empty queues: memory after ``mem_wait`` s, requests over ``seconds``.

        Runs in a background thread next to the other measurements: an idle
        pilot sleeps and makes about one request a minute, so neither side
        disturbs the other, and the run is minutes shorter.
        """
        pilots = []
        couch = Couch(self.server.url)          # this thread's own connection
        variants = [(client.name, client) for client in self.clients]
        # picas.py once more as `python -m picas run`: the same code from cached bytecode,
        # to show what compiling the script at every start costs in memory.
        module_env = clean_env(PYTHONPATH=self.module_dir)
        subprocess.call([self.clients[0].python, "-c", "import picas"], env=module_env,
                        cwd=self.workroot)
        variants.append(("picas.py -m", self.clients[0]))
        for name, client in variants:
            db = "bench-idle-%s" % re.sub(r"[^a-z0-9]+", "-", name)
            couch.prepare(db, 0)
            proxy = CountingProxy(self.server.port, self.server.host)
            workdir = self._workdir(db)
            argv = client.pilot_argv(proxy.url, db, ["true"], endless=True)
            env = client.env(proxy.url, db)
            if name == "picas.py -m":
                argv[1:2] = ["-m", "picas"]
                env.update(module_env)
            out = open(os.path.join(workdir, "pilot.log"), "wb")
            proc = _spawn(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                          stdout=out, stderr=subprocess.STDOUT)
            pilots.append((name, db, proxy, proc, out, workdir))
        started = time.time()
        time.sleep(mem_wait)
        memory = dict((name, _proc_status(p.pid)) for name, _, _, p, _, _ in pilots)
        while time.time() < started + seconds and not _ABORT:
            time.sleep(min(1.0, max(0.0, started + seconds - time.time())))
        ended = time.time()
        results = {}
        for name, db, proxy, proc, out, workdir in pilots:
            proc.send_signal(signal.SIGTERM)
            _, status = os.waitpid(proc.pid, 0)
            proc.returncode = _exit_code(status)
            _reaped(proc)
            out.close()
            proxy.stop()
            records = proxy.snapshot()
            item = {"seconds": round(ended - started, 1), "requests": len(records),
                    "per_minute_overall": round(len(records) / ((ended - started) / 60.0), 2),
                    "vmhwm_kb": memory[name].get("VmHWM"),
                    "vmrss_kb": memory[name].get("VmRSS"),
                    "exit_code": proc.returncode,
                    "request_times": [round(r[0] - started, 2) for r in records]}
            item.update(backed_off_rate([r[0] for r in records]))
            results[name] = item
            couch.delete_db(db)
            log("%s idle: VmHWM %s kB after %.0f s, %d requests in %.0f s, backed off: %s/min"
                % (name, item["vmhwm_kb"], mem_wait, len(records), ended - started,
                   item["per_minute_backed_off"]))
        self.results["idle"] = results


def profile_picas(bench, count):
    """Run picas.py's pilot in-process under cProfile over ``count`` tokens; summarize.

    Not part of the default run (``--only profile`` or ``--profile``): it tells
    where a pilot's time per token goes.
    """
    import pstats
    db = bench._db("profile")
    bench.couch.prepare(db, count)
    client = bench.clients[0]
    workdir = bench._workdir(db)
    out = os.path.join(workdir, "profile.out")
    code = ("import cProfile, sys; sys.path.insert(0, %r); import picas; "
            "cProfile.run('picas.main(sys.argv[1:])', %r)" % (ROOT, out))
    argv = [client.python, "-c", code, "--url", bench.server.url, "--db", db, "run", "--", "true"]
    run = run_pilots([argv], client.env(bench.server.url, db), workdir)
    bench.couch.delete_db(db)
    stats = pstats.Stats(out)
    total = stats.total_tt
    groups = collections.OrderedDict([
        ("waiting for the server (socket recv)", ["recv_into' of '_socket.socket"]),
        ("sending requests (socket sendall)", ["sendall' of '_socket.socket"]),
        ("fork/exec of the task", ["_posixsubprocess.fork_exec"]),
        ("waiting for the task (waitpid)", ["posix.waitpid"]),
        ("thread joins and lock waits", ["acquire' of '_thread.lock"]),
        ("starting threads", ["_thread.start_new_thread"]),
        ("file open/remove/flush", ["io.open", "posix.remove", "flush' of '_io"]),
    ])
    summary = collections.OrderedDict()
    for name, keys in groups.items():
        summary[name] = 0.0
    for func, (cc, nc, tt, ct, callers) in stats.stats.items():
        label = "%s:%s(%s)" % func if func[0] != "~" else func[2]
        for name, keys in groups.items():
            if any(key in label for key in keys):
                summary[name] += tt
                break
    summary["everything else (Python code in the pilot)"] = total - sum(summary.values())
    per_token = collections.OrderedDict((k, round(v / count * 1000, 3)) for k, v in summary.items())
    stats.sort_stats("tottime")
    top = []
    for func in stats.fcn_list[:15]:
        cc, nc, tt, ct, callers = stats.stats[func]
        top.append(["%s:%d(%s)" % (os.path.basename(func[0]), func[1], func[2]), nc,
                    round(tt / count * 1000, 3), round(ct / count * 1000, 3)])
    result = {"tokens": count, "wall": round(run["wall"], 3), "profiled_s": round(total, 3),
              "ms_per_token": per_token, "top_tottime": top}
    bench.results["profile"] = result
    return result


def profile_report(result):
    lines = ["", "profile of picas.py's pilot (cProfile, in-process, %d tokens of `true`, %.1f s): "
             "ms per token" % (result["tokens"], result["wall"])]
    for name, ms in result["ms_per_token"].items():
        lines.append("  %-50s %8.3f" % (name, ms))
    lines.append("  top functions by own time (calls, own ms/token, cumulative ms/token):")
    for name, calls, tt, ct in result["top_tottime"]:
        lines.append("    %-62s %6d %7.3f %7.3f" % (name[:62], calls, tt, ct))
    return "\n".join(lines)


def backed_off_rate(times, gap=2.0):
    """Requests per minute once the back-off has settled.

    Requests closer than ``gap`` seconds form one check. The checks after the
    first (which holds the start-up requests) start intervals; those at least
    0.75 times the longest interval count as backed off.
    """
    bursts = []
    for t in sorted(times):
        if bursts and t - bursts[-1][-1] < gap:
            bursts[-1].append(t)
        else:
            bursts.append([t])
    intervals = [(bursts[i + 1][0] - bursts[i][0], len(bursts[i + 1]))
                 for i in range(1, len(bursts) - 1)]
    out = {"checks": len(bursts),
           "requests_per_check": [len(b) for b in bursts],
           "intervals_s": [round(bursts[i + 1][0] - bursts[i][0], 1)
                           for i in range(len(bursts) - 1)]}
    if not intervals:
        out["per_minute_backed_off"] = None
        return out
    longest = max(d for d, _ in intervals)
    settled = [(d, n) for d, n in intervals if d >= 0.75 * longest]
    out["per_minute_backed_off"] = round(60.0 * sum(n for _, n in settled) /
                                         sum(d for d, _ in settled), 2)
    out["settled_intervals"] = len(settled)
    return out


def importtime(argv, env, cwd, runs=5):
    """Run ``-X importtime`` (best of ``runs``); return what importing ``picas`` took.

    ``picas_ms`` is the cumulative time of the ``picas`` import itself (modules
    the interpreter had loaded already are not in it); ``children`` are its
    biggest direct imports, in ms.
    """
    best = None
    for _ in range(runs):
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, universal_newlines=True)
        _, err = proc.communicate()
        entries = []
        for line in err.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if match:
                depth = (len(match.group(3)) - 1) // 2
                entries.append((depth, match.group(4), int(match.group(1)), int(match.group(2))))
        # -X importtime prints a module after everything it imported (post-order).
        children, found = [], None
        for depth, name, self_us, cumulative in entries:
            if depth == 0:
                if name == "picas":
                    found = {"picas_ms": round(cumulative / 1000.0, 1),
                             "self_ms": round(self_us / 1000.0, 1),
                             "children": [[n, round(c / 1000.0, 1)] for c, n in
                                          sorted(children, reverse=True)[:8]]}
                children = []
            elif depth == 1:
                children.append((cumulative, name))
        if found and (best is None or found["picas_ms"] < best["picas_ms"]):
            best = found
    return best or {"picas_ms": None, "self_ms": None, "children": []}


###############################################################################
# The report ##################################################################
###############################################################################

def _fmt(value, spec="%.1f"):
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return spec % value


def _ratio(a, b, spec="%.2fx"):
    if a is None or b is None or not b:
        return "n/a"
    return spec % (a / float(b))


def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def evaluate(results, have_upstream):
    """The targets: a list of (description, value text, True/False/None)."""
    targets = []

    def add(text, value, met):
        targets.append((text, value, met))

    p1 = _get(results, "single", "picas.py", "direct", "tokens_per_s")
    u1 = _get(results, "single", "upstream", "direct", "tokens_per_s")
    ceiling = _get(results, "ceiling", "bare", "tokens_per_s")
    if p1 is not None:
        if u1:
            add("one pilot: throughput >= 2x upstream", "%.2fx" % (p1 / u1), p1 / u1 >= 2)
        else:
            add("one pilot: throughput >= 2x upstream", "no upstream", None)
        if ceiling:
            add("one pilot: >= 70% of the ceiling", "%.0f%%" % (100.0 * p1 / ceiling),
                p1 / ceiling >= 0.7)
        rpt = _get(results, "single", "picas.py", "proxied", "per_token")
        add("one pilot: <= 2.5 requests/token", _fmt(rpt, "%.2f"),
            None if rpt is None else rpt <= 2.5)
    conc = results.get("concurrent", {})
    for pilots in sorted(conc, key=int):
        if int(pilots) < 4:
            continue
        p, u = conc[pilots]["picas.py"], conc[pilots].get("upstream")
        add("%s pilots: every token run exactly once" % pilots,
            "max %d, %d run >1, %d never" % (p["max_executions"], p["tokens_run_more_than_once"],
                                             p["tokens_never_run"]),
            p["max_executions"] == 1 and p["tokens_run_more_than_once"] == 0
            and p["tokens_never_run"] == 0)
        cpc = p["conflicts_per_claim"]
        add("%s pilots: <= 0.3 conflicts per claim" % pilots, _fmt(cpc, "%.3f"),
            cpc is not None and cpc <= 0.3)
        if u:
            r = p["tokens_per_s"] / u["tokens_per_s"]
            add("%s pilots: aggregate >= 3x upstream" % pilots, "%.2fx" % r, r >= 3)
        else:
            add("%s pilots: aggregate >= 3x upstream" % pilots, "no upstream", None)
    writers = _get(results, "ceiling", "writers") or {}
    for pilots in sorted(conc, key=int):
        ceiling_n = _get(writers, pilots, "writes_per_s")
        if ceiling_n:
            r = conc[pilots]["picas.py"]["tokens_per_s"] / ceiling_n
            add("%s pilot%s: >= 80%% of %s writers' ceiling" % (
                pilots, "s" if pilots != "1" else "", pilots), "%.0f%%" % (100 * r), r >= 0.8)
    st = results.get("startup")
    if st:
        if st.get("upstream_import_cost_ms") is not None:
            r = st["upstream_import_cost_ms"] / max(st["picas_import_cost_ms"], 0.1)
            add("import cost >= 4x smaller than upstream's", "%.1fx smaller" % r, r >= 4)
        else:
            add("import cost >= 4x smaller than upstream's", "no upstream", None)
    idle = _get(results, "idle", "picas.py")
    if idle:
        mb = (idle["vmhwm_kb"] or 0) / 1024.0
        add("idle pilot peak RSS <= 25 MB", "%.1f MB" % mb, mb <= 25)
        rate = idle.get("per_minute_backed_off")
        add("idle endless pilot <= 2 requests/minute backed off",
            _fmt(rate, "%.2f/min") if rate is not None else "window too short",
            None if rate is None else rate <= 2)
    return targets


def report(results, have_upstream, upstream_note):
    lines = []
    meta = results["meta"]
    lines.append("picas.py benchmark: %s (%s) vs %s" % (meta["picas_version"], meta["picas_source"],
                                                      meta["upstream_version"]))
    lines.append("server: %s; Python %s; %s CPUs"
                 % (meta["server_description"], meta["python"], meta["cpus"]))
    lines.append("load average at start %.2f, at end %.2f; %s; the median of %d runs counts "
                 "in (1) and (6)" % (meta["loadavg_start"][0], meta.get("loadavg_end", [0])[0],
                                     meta["started"], meta["repeat"]))
    phases = meta.get("loadavg_by_phase") or {}
    if phases:
        lines.append("load average per phase (start -> end, seconds): " + "; ".join(
            "%s %.2f -> %.2f, %.0f s" % (name, v[0], v[1], v[2]) for name, v in phases.items()))
    if upstream_note:
        lines.append("NOTE: %s" % upstream_note)
    lines.append("")
    w = 55
    header = "%-*s %10s %10s %7s" % (w, "measure", "picas.py", "upstream", "ratio")
    lines.append(header)
    lines.append("-" * len(header))

    def row(label, p, u=None, spec="%.1f", ratio=True):
        lines.append("%-*s %10s %10s %7s" % (w, label, _fmt(p, spec),
                                             _fmt(u, spec) if have_upstream else "-",
                                             _ratio(p, u) if ratio and have_upstream else ""))

    def mb(kb):
        return kb / 1024.0 if kb else None

    single = results.get("single")
    if single:
        p, u = single["picas.py"], single.get("upstream", {})
        n = p["direct"]["tokens"]
        lines.append("(1) one pilot, %d tokens, task `true`" % n)
        row("  tokens/s", p["direct"]["tokens_per_s"], _get(u, "direct", "tokens_per_s"))
        row("  tokens/s through the counting proxy", p["proxied"]["tokens_per_s"],
            _get(u, "proxied", "tokens_per_s"))
        row("  HTTP requests per token", p["proxied"]["per_token"],
            _get(u, "proxied", "per_token"), "%.2f")
        ukinds = _get(u, "proxied", "by_kind") or {}
        for kind in sorted(set(p["proxied"]["by_kind"]) | set(ukinds)):
            row("    %s" % kind, p["proxied"]["by_kind"].get(kind, 0) / float(n),
                ukinds.get(kind, 0) / float(n) if u else None, "%.3f", ratio=False)
        row("  pilot CPU ms per token (user+sys, with its tasks)", p["direct"]["cpu_ms_per_token"],
            _get(u, "direct", "cpu_ms_per_token"), "%.2f")
        row("  conflicts (409s, and conflicts inside _bulk_docs)", p["proxied"]["conflicts_409"],
            _get(u, "proxied", "conflicts_409"), "%d", ratio=False)
        row("  peak RSS of the busy pilot (MB)", mb(p["direct"]["peak_rss_kb"]),
            mb(_get(u, "direct", "peak_rss_kb")))
        row("  picas.py's watchdog helper process RSS (MB)", mb(p["direct"].get("helper_rss_kb")),
            None, ratio=False)
    ceiling = results.get("ceiling")
    if ceiling:
        c = ceiling["bare"]["tokens_per_s"]
        lines.append("(6) ceiling: the claim cycle on one keep-alive connection, %d tokens"
                     % ceiling["bare"]["tokens"])
        row("  tokens/s: view(include_docs,limit=1), lock, result", c, None, ratio=False)
        row("    the same, result with 2 empty log attachments",
            ceiling["with_logs"]["tokens_per_s"], None, ratio=False)
        row("    one view read (limit=16) per 16 tokens, 2 PUTs each",
            ceiling["window16"]["tokens_per_s"], None, ratio=False)
        if "bulk16" in ceiling:
            row("    view per 16, result + next lock in one POST (picas.py)",
                ceiling["bulk16"]["tokens_per_s"], None, ratio=False)
        if single:
            row("  one pilot as a fraction of the ceiling",
                100.0 * single["picas.py"]["direct"]["tokens_per_s"] / c,
                100.0 * single["upstream"]["direct"]["tokens_per_s"] / c
                if single.get("upstream") else None, "%.0f%%", ratio=False)
        row("  starting `true` from Python (ms, median)", ceiling["spawn_true_ms"], None, "%.2f",
            ratio=False)
    conc = results.get("concurrent", {})
    for pilots in sorted(conc, key=int):
        p, u = conc[pilots]["picas.py"], conc[pilots].get("upstream") or {}
        lines.append("(2) %s concurrent pilot%s, %d tokens (a direct run, then one through "
                     "the proxy)" % (pilots, "s" if pilots != "1" else "", p["tokens"]))
        row("  aggregate tokens/s", p["tokens_per_s"], u.get("tokens_per_s"))
        row("  aggregate tokens/s through the proxy", p.get("tokens_per_s_proxied"),
            u.get("tokens_per_s_proxied"))
        ceiling_n = _get(results, "ceiling", "writers", pilots, "writes_per_s")
        if ceiling_n:
            row("  server's ceiling: %s writers, one PUT per token (writes/s)" % pilots,
                ceiling_n, None, ratio=False)
            row("  picas.py as a fraction of that ceiling", "%.0f%%" % (
                100.0 * p["tokens_per_s"] / ceiling_n), None, "%s", ratio=False)
        row("  conflicts per claim (409 or in _bulk_docs)", p["conflicts_per_claim"],
            u.get("conflicts_per_claim"), "%.3f", ratio=False)
        row("  HTTP requests per token", p["requests_per_token"], u.get("requests_per_token"),
            "%.2f")
        row("  max executions of one token", p["max_executions"], u.get("max_executions"),
            "%d", ratio=False)
        row("  tokens run more than once", p["tokens_run_more_than_once"],
            u.get("tokens_run_more_than_once"), "%d", ratio=False)
        row("  tokens never run", p["tokens_never_run"], u.get("tokens_never_run"), "%d",
            ratio=False)
        row("  pilots that failed (exit status not 0 or 3)", p["failed_pilots"],
            u.get("failed_pilots"), "%d", ratio=False)
    st = results.get("startup")
    if st:
        m = st["median_ms"]
        lines.append("(3) start-up, median of %d runs (ms)" % st["runs"])
        row("  bare interpreter (python -c pass)", m["picas_bare"], m.get("upstream_bare"),
            ratio=False)
        row("  python picas.py --version", m["picas_version"], None, ratio=False)
        row("  python -m picas --version (cached bytecode)", m["picas_m_version"], None,
            ratio=False)
        row("  compiling picas.py (every `python picas.py` does)", st["picas_compile_ms"],
            None, ratio=False)
        row("  import picas, minus the bare interpreter", st["picas_import_cost_ms"],
            st.get("upstream_import_cost_ms"))
        row("  import picas, -X importtime cumulative", st["picas_importtime"]["picas_ms"],
            _get(st, "upstream_importtime", "picas_ms"))
    idle = results.get("idle")
    if idle:
        p, u = idle["picas.py"], idle.get("upstream") or {}
        lines.append("(4)+(5) idle endless pilot, empty queue, watched %.0f s" % p["seconds"])
        row("  peak RSS (VmHWM) after %.0f s (MB)" % meta["idle_mem_wait"], mb(p["vmhwm_kb"]),
            mb(u.get("vmhwm_kb")))
        if idle.get("picas.py -m"):
            row("    picas.py as `python -m picas run` (cached bytecode)",
                mb(idle["picas.py -m"]["vmhwm_kb"]), None, ratio=False)
        row("  requests per minute, whole window", p["per_minute_overall"],
            u.get("per_minute_overall"), "%.2f")
        row("  requests per minute, backed off", p["per_minute_backed_off"],
            u.get("per_minute_backed_off"), "%.2f")

        def per_check(item):
            checks = (item or {}).get("requests_per_check", [])[1:]
            return statistics.mean(checks) if checks else None
        row("  requests per check (after the first)", per_check(p), per_check(u), "%.1f",
            ratio=False)
    lines.append("")
    lines.append("targets")
    lines.append("-" * len(header))
    for text, value, met in evaluate(results, have_upstream):
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[met]
        lines.append("%-52s %-26s %s" % (text, value, verdict))
    lines.append("(ratios are picas.py / upstream; the proxy counts requests and 409s, see docs/"
                 "performance.md)")
    return "\n".join(lines)


###############################################################################
# Main ########################################################################
###############################################################################

def _node_version():
    try:
        return subprocess.check_output(["node", "--version"], universal_newlines=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "node ?"


def _server_version():
    try:
        with open(os.path.join(SERVER_DIR, "node_modules", "pouchdb-server",
                               "package.json")) as fh:
            return json.load(fh)["version"]
    except (OSError, ValueError, KeyError):
        return "?"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--tokens", type=int, help="tokens for the one-pilot run and the "
                        "ceiling (default 500; --quick: 20)")
    parser.add_argument("--conc-tokens", type=int, help="tokens for the concurrent runs "
                        "(default 2000; --quick: 40)")
    parser.add_argument("--pilots", help="concurrent pilot counts (default 1,4,16; --quick: 1,4)")
    parser.add_argument("--idle-seconds", type=float, help="how long the idle pilots are "
                        "watched (default 240; --quick: 4)")
    parser.add_argument("--startup-runs", type=int, help="runs per start-up median "
                        "(default 21; --quick: 3)")
    parser.add_argument("--repeat", type=int, help="runs of the ceiling and of the one-pilot "
                        "measurement; the median counts (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers: a smoke test")
    parser.add_argument("--no-upstream", action="store_true",
                        help="measure picas.py only (e.g. when PyPI is unreachable)")
    parser.add_argument("--venv", default=DEFAULT_VENV,
                        help="where upstream's virtual environment is kept (default: %(default)s)")
    parser.add_argument("--upstream-python", default=sys.executable,
                        help="interpreter for upstream's venv (3.9+; default: this one)")
    parser.add_argument("--python", help="interpreter that runs picas.py (default: a fresh "
                        "venv without packages made from this interpreter)")
    parser.add_argument("--only", help="comma-separated parts to run: ceiling,single,"
                        "concurrent,startup,idle,profile (default: all but profile)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile picas.py's pilot (cProfile) and print where its "
                        "time per token goes")
    parser.add_argument("--json", metavar="FILE", help="write all results to FILE")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--couchdb", action="store_true",
                       help="benchmark on a real Apache CouchDB 3.4.3 node (the shared build), "
                       "started for the run")
    where.add_argument("--url", help="benchmark on this http:// server; admin credentials in "
                       "the URL or in PICAS_USERNAME and PICAS_PASSWORD")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"tokens": (500, 20), "conc_tokens": (2000, 40), "pilots": ("1,4,16", "1,4"),
                "idle_seconds": (240.0, 4.0), "startup_runs": (21, 3), "repeat": (3, 1)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.pilot_counts = [int(x) for x in args.pilots.split(",") if x.strip()]
    args.idle_mem_wait = 1.5 if quick else 5.0
    args.spawn_runs = 20 if quick else 200
    args.parts = set((args.only or "ceiling,single,concurrent,startup,idle").split(","))
    if args.profile:
        args.parts.add("profile")
    return args


def _picas_source():
    """Which picas.py was measured: its git commit, and whether it had local changes."""
    import hashlib
    with open(PICAS_PY, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       universal_newlines=True, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "picas.py"], cwd=ROOT,
                                stderr=subprocess.DEVNULL) != 0
        return "git %s%s, sha256 %s" % (head, " + local changes" if dirty else "", digest)
    except (OSError, subprocess.CalledProcessError):
        return "sha256 %s" % digest


def bare_venv(base_python, path):
    """A virtual environment without packages: the interpreter as a user's clean venv runs it.

    The base installation's site-packages (and any .pth files there, which may
    import things at every start) stay out, as they do in upstream's venv.
    """
    subprocess.check_call([base_python, "-m", "venv", "--without-pip", path])
    return os.path.join(path, "bin", "python")


class BenchServer(object):
    """The server of a run: ``url`` (no credentials), ``host``, ``port``, ``proc`` (None
    when it is not ours), ``name``, ``description``; ``stop()``."""

    def __init__(self, name, url, description, proc=None, stop=None):
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        self.name, self.url, self.description, self.proc = name, url, description, proc
        self.host, self.port = parts.hostname, parts.port or 80
        self._stop = stop

    def stop(self):
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_server(args):
    """The server to measure on (and set USER, PASSWORD for it)."""
    global USER, PASSWORD
    sys.path.insert(0, SERVER_DIR)
    if args.url:
        from urllib.parse import unquote, urlsplit
        parts = urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname:
            raise RuntimeError("--url: an http:// URL is needed (the request-counting proxy "
                               "speaks plain HTTP)")
        USER = unquote(parts.username) if parts.username else os.environ.get("PICAS_USERNAME")
        PASSWORD = unquote(parts.password) if parts.password is not None \
            else os.environ.get("PICAS_PASSWORD")
        if not USER or PASSWORD is None:
            raise RuntimeError("--url: give the admin's name and password in the URL or in "
                               "PICAS_USERNAME and PICAS_PASSWORD")
        host = parts.hostname if ":" not in parts.hostname else "[%s]" % parts.hostname
        url = "http://%s:%d" % (host, parts.port or 80)
        status, info = Couch(url).request("GET", "/", ok=None)
        if status != 200:
            raise RuntimeError("--url: GET / answered HTTP %d" % status)
        version = "%s %s" % ("CouchDB" if "couchdb" in (info or {}) else "server",
                             (info or {}).get("version", "?"))
        return BenchServer("the server", url, "%s at %s (--url)" % (version, url))
    if args.couchdb:
        import couchdb
        try:
            node = couchdb.start_node(USER, PASSWORD)
        except couchdb.SetupError as exc:
            raise RuntimeError("--couchdb: %s" % exc)
        return BenchServer("CouchDB", node.url, "Apache CouchDB 3.4.3 single node on 127.0.0.1 "
                           "(the shared build; every write fsynced)", node.proc, couchdb.close)
    import pouchdb
    server = pouchdb.PouchDBServer(USER, PASSWORD)
    server.start()
    return BenchServer("pouchdb-server", server.url, "pouchdb-server %s in memory on 127.0.0.1, "
                       "node %s" % (_server_version(), _node_version()), server.proc, server.stop)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM/SIGHUP end the run like an error does: pilots killed, server stopped.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    workroot = tempfile.mkdtemp(prefix="picas-bench-")
    upstream_note = None
    venv_seconds = None
    try:
        python = args.python or bare_venv(sys.executable, os.path.join(workroot, "venv-picas"))
        clients = [PicasPy(python)]
        if args.no_upstream:
            upstream_note = "upstream picas was NOT measured (--no-upstream): no comparison"
        else:
            try:
                venv, venv_seconds = ensure_upstream_venv(args.venv, args.upstream_python)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                print("bench.py: could not set up upstream picas: %s\n"
                      "(no network to PyPI? run with --no-upstream to measure picas.py alone)"
                      % exc, file=sys.stderr)
                return 2
            clients.append(Upstream(venv))
        have_upstream = len(clients) > 1

        server = start_server(args)
        guard = Guard(server)
        bench = Bench(args, server, clients, workroot)
        results = bench.results
        results["meta"] = {
            "picas_version": clients[0].version(), "picas_source": _picas_source(),
            "upstream_version": ("upstream " + clients[1].version()) if have_upstream
            else "no upstream",
            "python": platform.python_version(), "node": _node_version(),
            "server": server.name, "server_description": server.description,
            "pouchdb_server": _server_version() if server.name == "pouchdb-server" else None,
            "cpus": os.cpu_count(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "tokens": args.tokens, "conc_tokens": args.conc_tokens, "pilots": args.pilot_counts,
            "idle_seconds": args.idle_seconds, "idle_mem_wait": args.idle_mem_wait,
            "upstream_venv_setup_s": venv_seconds,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_start": os.getloadavg(), "repeat": args.repeat,
        }
        if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
            log("WARNING: the machine is busy (load average %.2f): results will be noisy"
                % os.getloadavg()[0])
        started = time.time()
        try:
            idle = None
            if "idle" in args.parts:
                idle = threading.Thread(target=bench.idle,
                                        args=(args.idle_seconds, args.idle_mem_wait))
                idle.daemon = True
                idle.start()
            phases = [("ceiling", bench.ceiling, (args.tokens, args.repeat)),
                      ("single", bench.single_pilot, (args.tokens, args.repeat)),
                      ("concurrent", bench.concurrent, (args.conc_tokens, args.pilot_counts)),
                      ("startup", bench.startup, (args.startup_runs,)),
                      ("profile", profile_picas, (bench, args.tokens))]
            loads = results["meta"]["loadavg_by_phase"] = {}
            for name, function, function_args in phases:
                if name in args.parts:
                    t0, load0 = time.time(), os.getloadavg()[0]
                    function(*function_args)
                    loads[name] = [round(load0, 2), round(os.getloadavg()[0], 2),
                                   round(time.time() - t0, 1)]
            if idle is not None:
                if idle.is_alive():
                    log("waiting for the idle pilots (%.0f s in all)" % args.idle_seconds)
                idle.join()
                if "idle" not in results:
                    raise RuntimeError(_ABORT[0] if _ABORT else
                                       "the idle measurement failed (see above)")
        finally:
            guard.stop()
            kill_all()
            server.stop()
            results["meta"]["loadavg_end"] = os.getloadavg()
    except RuntimeError as exc:
        print("bench.py: the benchmark failed: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    print(report(results, have_upstream, upstream_note))
    if "profile" in results:
        print(profile_report(results["profile"]))
    print("\n(the benchmark took %.0f s)" % results["meta"]["seconds"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
