"""The guarantees of picas.py under faults, proven against the real test server.

Network faults come from tests/faultserver.py, a stdlib proxy between the
pilots and the server that drops connections mid-request and mid-response,
delays, answers 503, loses the answers of writes the server applied, and
disappears for seconds as a restarting server does. Pilots are real
``python picas.py run`` subprocesses. Tasks leave side effects (a line per
execution in a file) so that "executed exactly once" is counted, not assumed.

Sections: network faults; killed pilots; signals and walltime; the bad-input
catalog of docs/bad-inputs.md (one test per row); security.

Run alone with ``python3 -m pytest -m faults tests/test_faults.py``. A failing
randomized test prints its seed; ``PICAS_FAULT_SEED=N`` replays it.
"""
import base64
import collections
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import quote

import pytest

import picas
from conftest import SENTINEL_PASSWORD, free_port
from faultserver import FaultServer
from helpers import ROOT, alive, ensure_views, make_tokens, pilot_cmd, start_pilot, wait_for

Result = collections.namedtuple("Result", "code out err")


# -- helpers -------------------------------------------------------------------

@pytest.fixture
def tdb(db):
    """The test database, with the standard views."""
    ensure_views(db)
    return db


@pytest.fixture
def proxy(couch):
    """proxy(default=None, script=()) -> a started FaultServer in front of the server."""
    servers = []

    def make(default=None, script=()):
        fs = FaultServer(script, upstream=couch.url, default=default).start()
        servers.append(fs)
        return fs
    yield make
    for fs in servers:
        fs.stop()


def fault_seed():
    return int(os.environ.get("PICAS_FAULT_SEED") or random.randrange(10 ** 6))


def script(path, body):
    """An executable /bin/sh script at ``path`` (a pathlib path) with ``body``."""
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return str(path)


class Pilot(object):
    """A ``python picas.py ARGS`` subprocess (helpers.start_pilot) whose output is collected.

    Threads read its stdout and stderr as they come, so a chatty pilot never
    blocks on a full pipe and a test can wait for a line.
    """

    #: Every pilot started: any still running after a test are killed.
    started = []

    def __init__(self, couch, db, args, url=None, cwd=None):
        if url is not None:
            args = ["--url", url] + list(args)       # flags beat PICAS_HOST_URL
        self.proc = start_pilot(couch, db, list(args), cwd=cwd)
        self.pid = self.proc.pid
        Pilot.started.append(self)
        self._out, self._err = [], []
        self._readers = [self._reader(self.proc.stdout, self._out),
                         self._reader(self.proc.stderr, self._err)]

    @staticmethod
    def _reader(stream, sink):
        def read():
            for line in iter(stream.readline, b""):
                sink.append(line.decode("utf-8", "replace"))
        thread = threading.Thread(target=read)
        thread.daemon = True
        thread.start()
        return thread

    @property
    def out(self):
        return "".join(self._out)

    @property
    def err(self):
        return "".join(self._err)

    def wait(self, timeout=120):
        code = self.proc.wait(timeout)
        for thread in self._readers:
            thread.join(10)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def send(self, signum):
        self.proc.send_signal(signum)


@pytest.fixture(autouse=True)
def pilots():
    """A list for a test's pilots; every pilot still running at its end is killed."""
    yield []
    while Pilot.started:
        Pilot.started.pop().kill()


def run_cli(couch, db, args, cwd=None, env=None, fast_retries=False, timeout=120, stdin=None):
    """Run ``python picas.py ARGS`` against ``db``; return Result(code, out, err).

    ``env`` overrides variables (None removes one). With ``fast_retries`` the
    same main() runs with a tiny retry back-off (the CLI has no option for it:
    against an unreachable server the real back-off takes about a minute).
    """
    full = couch.env(db.name if db is not None else "unused")
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    if fast_retries:
        argv = [sys.executable, "-c",
                "import sys; sys.path.insert(0, %r); import picas; "
                "picas.RETRY_BASE_DELAY = picas.RETRY_MAX_DELAY = 0.001; "
                "sys.exit(picas.main(sys.argv[1:]))" % ROOT] + list(args)
    else:
        argv = pilot_cmd(*args)
    proc = subprocess.run(argv, cwd=None if cwd is None else str(cwd), env=full,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          input=stdin)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                  proc.stderr.decode("utf-8", "replace"))


def token_docs(db):
    """id -> document of every token (design documents left out)."""
    return dict((r["id"], r["doc"]) for r in db.all_docs(include_docs=True)["rows"]
                if not r["id"].startswith("_design/"))


def revisions(db):
    """id -> _rev of every document, design documents included."""
    return dict((r["id"], r["value"]["rev"]) for r in db.all_docs()["rows"])


def by_state(db):
    out = collections.defaultdict(set)
    for tid, doc in token_docs(db).items():
        out[picas.token_state(doc)].add(tid)
    return out


def lines(path):
    try:
        with open(str(path)) as fh:
            return [line.split() for line in fh if line.strip()]
    except OSError:
        return []


def attachment(db, tid, ext="out"):
    return db.get_attachment(tid, "logs_%s.%s" % (tid, ext))


def unsaved_files(folder):
    """Results waiting in the journal of a pilot that ran in ``folder``."""
    journal = os.path.join(str(folder), "picas-journal")
    return sorted(n for n in os.listdir(journal) if n.endswith(".json")) \
        if os.path.isdir(journal) else []


def proc_stat(pid):
    """(state, ppid, pgrp) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid):
    """Live processes in process group ``pgid`` (zombies count as dead)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat and stat[2] == pgid and stat[0] not in ("Z", "X"):
                found.append(int(name))
    return found


def descendants(pid):
    """Live descendants of ``pid``."""
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat and stat[0] not in ("Z", "X"):
                children[stat[1]].append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def vm_hwm_kib(pid):
    """The peak resident set size of ``pid`` in KiB (VmHWM), or None."""
    try:
        with open("/proc/%d/status" % pid) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def put_body(request):
    """The JSON body of a document PUT, or None."""
    if request.method != "PUT" or "/_design/" in request.path or not request.body:
        return None
    try:
        body = json.loads(request.body.decode("utf-8"))
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def written_docs(request):
    """The documents a write carries: a PUT's body, or the docs of a _bulk_docs POST."""
    if request.method == "POST" and request.path.split("?")[0].endswith("/_bulk_docs"):
        try:
            docs = json.loads(request.body.decode("utf-8")).get("docs") or []
        except (ValueError, AttributeError):
            return []
        return [d for d in docs if isinstance(d, dict)]
    body = put_body(request)
    return [body] if body is not None else []


def doc_kind(body, lock_revs):
    """Classify one token write: 'lock', 'heartbeat', 'result', 'give-back' or None."""
    claim = body.get("claim_id")
    if not claim:
        return "give-back" if body.get("type") == "token" else None
    if picas._js_number(body.get("done")):
        return "result"
    first = lock_revs.setdefault(claim, body.get("_rev"))
    return "lock" if body.get("_rev") == first else "heartbeat"


def write_kind(request, lock_revs):
    """Classify a pilot's token write: 'lock', 'heartbeat', 'result', 'give-back', None,
    or 'lock+result' for a result saved together with the next token's lock.

    ``lock_revs`` maps claim_id -> the revision its lock write carried; a
    retry of the lock carries the same one, a heartbeat a later one.
    """
    kinds = sorted(set(k for k in (doc_kind(b, lock_revs) for b in written_docs(request)) if k))
    return "+".join(kinds) or None


# Network faults ##############################################################

class Chaos(object):
    """The proxy's action for every request: a fault at random, or pass it through.

    Faults: ``drop`` (the request never reaches the server), ``reset`` (the
    same, with a TCP reset), ``503``, ``lost`` (applied, answer lost),
    ``half_response`` (applied, the answer cut mid-way), ``half_request``
    (cut mid-way on its way to the server, never applied), ``delay`` (up to
    0.2 s) and ``timeout`` (a delay longer than the pilots' ``--timeout``; the
    late request still reaches the server). Besides the random ones, every
    ``every``-th lock write and result write has its answer lost after the
    server applied it, and each kind is dealt out twice on a schedule, so that
    each surely happens. ``hits`` counts what was done.
    """

    KINDS = [("drop", 0.015), ("reset", 0.015), ("503", 0.02), ("lost", 0.02),
             ("half_response", 0.015), ("half_request", 0.01), ("delay", 0.03),
             ("timeout", 0.0)]

    def __init__(self, seed, every=8, timeout_delay=2.0):
        self.rng = random.Random(seed)
        self.every = every
        self.timeout_delay = timeout_delay
        self.hits = collections.Counter()
        self.writes = collections.Counter()
        self.lock_revs = {}
        self.lost = {"lock": [], "result": [], "lock+result": []}
        self.due = [name for name, _ in self.KINDS] * 2
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self, fs, request):
        with self._lock:
            self._count += 1
            kind = write_kind(request, self.lock_revs)
            self.writes[kind] += 1
            if kind in self.lost:
                if self.writes[kind] % self.every == 1:
                    self.lost[kind].append(request)
                    self.hits["lost " + kind] += 1
                    return ("proxy_then_drop",)
            fault, roll = "pass", self.rng.random()
            for name, share in self.KINDS:
                if roll < share:
                    fault = name
                    break
                roll -= share
            # Every 10th request deals a scheduled fault: the 16 of them need 160
            # requests, and a run makes about 400 (one per token and the retries).
            if self._count % 10 == 5:
                fault = next((name for name in self.due
                              if name != "half_request" or request.body), fault)
                if fault in self.due:
                    self.due.remove(fault)
            if fault == "half_request" and not request.body:
                fault = "drop"
            self.hits[fault] += 1
            delay = self.rng.uniform(0.05, 0.2)
        return {"pass": ("proxy",), "drop": ("drop",), "reset": ("reset",),
                "503": ("status", 503), "lost": ("proxy_then_drop",),
                "half_response": ("half_response",), "half_request": ("half_request",),
                "delay": ("sleep", delay, ("proxy",)),
                "timeout": ("sleep", self.timeout_delay, ("proxy",))}[fault]


def history(fs, db, tid):
    """What the proxy saw for token ``tid``, and the token now: for failure messages."""
    out = ["outages: %r" % fs.outages, "now: %r" % db.get(tid)]
    for r in fs.requests:
        if r.path.split("?")[0].endswith("/" + tid):
            out.append("%.3f %s %s -> %s %s" % (r.time, r.method, r.path, r.upstream_status,
                                                r.body[:300]))
    return "\n".join(out)


def _same_write(a, b):
    key = lambda r: [(d.get("_id"), d.get("_rev"), d.get("claim_id")) for d in written_docs(r)]
    return a.path == b.path and key(a) == key(b)


def _met_conflict(request):
    """The upstream answered this attempt with 409 (for _bulk_docs: a conflict per document)."""
    if request.method == "PUT":
        return request.upstream_status == 409
    try:
        results = json.loads((request.upstream_body or b"null").decode("utf-8"))
    except ValueError:
        return False
    return isinstance(results, list) and bool(results) and \
        all(r.get("error") == "conflict" for r in results)


def retries_met_conflict(fs, lost):
    """For each lost write, whether a later attempt of it reached the server and got 409."""
    out = []
    for request in lost:
        later = [r for r in fs.requests if r.time > request.time and _same_write(r, request)]
        out.append(any(_met_conflict(r) for r in later))
    return out


@pytest.mark.faults
def test_pilots_through_a_faulty_network_run_every_token_exactly_once(couch, tdb, proxy, pilots,
                                                                      tmp_path):
    """Three pilots, 200 tokens, faults on every kind of request and a server restart:
    every token runs exactly once and ends done with its result; no pilot crashes."""
    seed = fault_seed()
    n = 200
    ids = make_tokens(tdb, ["input %d" % i for i in range(n)])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", """
        echo "$2" >> %s
        echo "out $2"
        echo "err $2 $1" >&2
        case "$2" in *7) sleep 0.4;; esac
        """ % runs)
    chaos = Chaos(seed)
    fs = proxy(default=chaos)
    for _ in range(3):
        pilots.append(Pilot(couch, tdb, ["--timeout", "1.5", "run", "--heartbeat", "0.2",
                                         "--", task], url=fs.url, cwd=tmp_path))
    # The server restarts (nothing listens, open connections are cut) mid-run.
    assert wait_for(lambda: len(lines(runs)) >= 60, timeout=90), (seed, pilots[0].err)
    fs.outage(3.0)
    codes = [p.wait(150) for p in pilots]
    fs.stop()
    why = "seed %d, faults %s\n%s" % (seed, dict(chaos.hits),
                                     "\n".join(p.err[-3000:] for p in pilots))

    # No pilot crashed.
    assert codes == [0, 0, 0], why
    assert not any("Traceback" in p.err for p in pilots), why
    # Every token was executed exactly once...
    ran = collections.Counter(words[0] for words in lines(runs))
    missing = sorted(set(ids) - set(ran))
    assert not missing, "never ran: %s\n%s\n%s" % (missing, history(fs, tdb, missing[0]), why)
    twice = [t for t, c in ran.items() if c > 1]
    assert not twice, "ran twice: %s\n%s\n%s" % (twice, history(fs, tdb, twice[0]), why)
    # ... and ended done with its whole result in the database; none is locked.
    docs = token_docs(tdb)
    pilot_ids = set()
    for tid in ids:
        doc = docs[tid]
        assert picas.token_state(doc) == "done", (tid, doc, why)
        assert doc["exit_code"] == 0 and doc["error"] == [] and doc["scrub_count"] == 0, doc
        assert attachment(tdb, tid) == ("out %s\n" % tid).encode()
        assert attachment(tdb, tid, "err") == ("err %s %s\n" % (tid, doc["input"])).encode()
        pilot_ids.add(doc["pilot_id"])
    assert len(pilot_ids) == 3
    assert picas.count_states(tdb) == {"todo": 0, "locked": 0, "done": n, "error": 0}
    assert unsaved_files(tmp_path) == []
    # The faults really happened: every kind, lost answers of lock and result
    # writes whose retries met a 409, and the outage with work after it.
    assert chaos.due == [], why
    for kind, _ in Chaos.KINDS:
        assert chaos.hits[kind] >= 2, why
    # Most results go out with the next lock in one _bulk_docs request; lone
    # locks (each pilot's first) are few, lone results rarer still (a result
    # goes alone only when no candidate is left; see the LoseOnce tests).
    for kind, least in (("lock", 1), ("result", 0), ("lock+result", 10)):
        assert len(chaos.lost[kind]) >= least, (kind, why)
        assert all(retries_met_conflict(fs, chaos.lost[kind])), (kind, why)
    assert chaos.writes["heartbeat"] >= 10, why
    assert len(fs.outages) == 1
    assert fs.outage_cuts[0] >= 1, why            # it cut pilots' open connections
    assert [r for r in fs.requests if r.time > fs.outages[0][1]], why


class LoseOnce(object):
    """A proxy action: lose the answer of the first pilot write of ``kind``, pass the rest.

    ``how`` is ``lost`` (proxy_then_drop), ``half_response``, or ``refused``:
    the write is applied, its connection cut, and the server is gone for a
    moment, so the client's immediate resend on a fresh connection is refused.
    """

    def __init__(self, kind, how="lost"):
        self.kind, self.how = kind, how
        self.lost = []
        self.lock_revs = {}

    def __call__(self, fs, request):
        if self.lost or write_kind(request, self.lock_revs) != self.kind:
            return ("proxy",)
        self.lost.append(request)
        if self.how == "half_response":
            return ("half_response",)
        if self.how == "refused":
            fs.forward(request)
            fs.outage(0.6)
            return ("drop",)
        return ("proxy_then_drop",)


def later_attempts(fs, request):
    """The upstream answers to later attempts of the same write (409 for a conflict)."""
    return [409 if _met_conflict(r) else r.upstream_status for r in fs.requests
            if r.time > request.time and _same_write(r, request)]


@pytest.mark.faults
@pytest.mark.parametrize("how", ["lost", "half_response", "refused"])
def test_lock_whose_answer_was_lost_is_recognised_as_ours(couch, tdb, proxy, how):
    """The lock was applied, its answer lost; the retry gets 409: the claim is still ours."""
    make_tokens(tdb, ["a", "b"])
    action = LoseOnce("lock", how)
    fs = proxy(default=action)
    pdb = picas.Server(fs.url, couch.username, couch.password, timeout=5).database(tdb.name)
    it = picas.TaskViewIterator(pdb, "todo")
    token = next(it)
    assert len(action.lost) == 1 and put_body(action.lost[0])["claim_id"] == token["claim_id"]
    assert later_attempts(fs, action.lost[0]) == [409]       # the retry met our own lock
    stored = tdb.get(token["_id"])
    assert stored["claim_id"] == token["claim_id"] and stored["pilot_id"] == it.pilot_id
    assert stored["_rev"] == token["_rev"] and stored["_rev"].startswith("2-")
    assert it.stats.claims == 1 and it.stats.conflicts == 0
    # The pilot carries on with the rest; nothing is left behind.
    assert next(it)["_id"] != token["_id"]
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.faults
def test_lost_lock_write_that_never_landed_does_not_take_a_rivals_lock(couch, tdb, proxy):
    """Our lock write was lost before the server saw it and a rival locked the token:
    the retry's 409 is the rival's, and the token is not ours."""
    make_tokens(tdb, ["a"])
    rival = picas.TaskViewIterator(tdb, "todo")
    lock_revs, taken = {}, []

    def rival_first(fs, request):
        if not taken and write_kind(request, lock_revs) == "lock":
            taken.append(next(rival))
            return ("drop",)
        return ("proxy",)
    fs = proxy(default=rival_first)
    pdb = picas.Server(fs.url, couch.username, couch.password, timeout=5).database(tdb.name)
    it = picas.TaskViewIterator(pdb, "todo")
    with pytest.raises(StopIteration):
        next(it)
    assert it.stats.claims == 0 and it.stats.conflicts == 1
    stored = tdb.get("t-1")
    assert stored["claim_id"] == taken[0]["claim_id"] and stored["pilot_id"] == rival.pilot_id
    assert stored["_rev"] == taken[0]["_rev"]


PILOT_TASK = """
    echo "$2" >> %(runs)s
    echo "out $2"
    sleep %(sleep)s
    """


@pytest.mark.faults
@pytest.mark.parametrize("kind, how", [("lock", "lost"), ("lock", "refused"),
                                       ("result", "lost"), ("result", "half_response"),
                                       ("result", "refused"), ("heartbeat", "lost"),
                                       ("lock+result", "lost"), ("lock+result", "half_response"),
                                       ("lock+result", "refused")])
def test_pilot_whose_write_answer_was_lost_runs_the_token_once_and_saves_it(
        couch, tdb, proxy, tmp_path, kind, how):
    # One token: its lock and its result go alone. Two: the first result goes
    # together with the second token's lock (one _bulk_docs request).
    ids = make_tokens(tdb, ["a", "b"] if kind == "lock+result" else ["a"])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", PILOT_TASK % {
        "runs": runs, "sleep": "0.7" if kind == "heartbeat" else "0"})
    action = LoseOnce(kind, how)
    fs = proxy(default=action)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0.3", "--", task], url=fs.url,
                  cwd=tmp_path)
    code = pilot.wait(60)
    assert code == 0 and "Traceback" not in pilot.err, pilot.err
    assert sorted(w[0] for w in lines(runs)) == ids              # executed exactly once
    assert len(action.lost) == 1 and 409 in later_attempts(fs, action.lost[0])
    for tid in ids:
        doc = tdb.get(tid)
        assert picas.token_state(doc) == "done", doc
        assert doc["exit_code"] == 0 and doc["error"] == [] and doc["scrub_count"] == 0
        assert attachment(tdb, tid) == ("out %s\n" % tid).encode()
    assert unsaved_files(tmp_path) == []
    assert "reset or taken" not in pilot.err


@pytest.mark.faults
def test_result_whose_answer_was_lost_and_token_was_reset_meanwhile_is_kept(couch, tdb, proxy,
                                                                            tmp_path):
    """The result landed, its answer was lost, and an operator reset the token before
    the retry: the retry's 409 is not ours, and the result goes into the error list."""
    make_tokens(tdb, ["a"])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", PILOT_TASK % {"runs": runs, "sleep": "0"})
    lock_revs, lost = {}, []

    def lose_result_then_reset(fs, request):
        if not lost and write_kind(request, lock_revs) == "result":
            lost.append(fs.forward(request))
            tdb.save(picas.scrub_token(tdb.get("t-1")))       # the operator's reset
            return ("drop",)
        return ("proxy",)
    fs = proxy(default=lose_result_then_reset)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--max-tasks", "1", "--", task],
                  url=fs.url, cwd=tmp_path)
    assert pilot.wait(60) == 0, pilot.err
    assert lost[0][0] == 201
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and doc["scrub_count"] == 1
    entry = doc["error"][-1]
    assert "reset or taken" in entry["message"]
    assert entry["result"]["exit_code"] == 0 and entry["result"]["done"] > 0
    assert unsaved_files(tmp_path) == []


# Killed pilots ###############################################################

def task_log(path):
    """Parse the start/end lines of the killed-pilot task: (starts, ends).

    Each is a list of (token id, task pid, pilot pid).
    """
    starts, ends = [], []
    for words in lines(path):
        if len(words) == 4 and words[0] in ("start", "end"):
            entry = (words[1], int(words[2]), int(words[3]))
            (starts if words[0] == "start" else ends).append(entry)
    return starts, ends


@pytest.mark.faults
def test_killed_pilots_lose_no_token_and_leave_no_task_behind(couch, tdb, pilots, tmp_path):
    n = 100
    ids = make_tokens(tdb, ["in%d" % i for i in range(n)])
    log = tmp_path / "tasks.log"
    task = script(tmp_path / "task.sh", """
        echo "start $2 $$ $PPID" >> %(log)s
        sleep 0.4
        echo "end $2 $$ $PPID" >> %(log)s
        """ % {"log": log})
    args = ["run", "--heartbeat", "0.5", "--grace", "1", "--", task]
    rng = random.Random(fault_seed())

    def launch():
        pilots.append(Pilot(couch, tdb, args, cwd=tmp_path))
    for _ in range(3):
        launch()
    killed = {}            # pilot pid -> when it was SIGKILLed
    snapshot, reset_out = {}, None

    def kill_one():
        """SIGKILL a pilot in the middle of a task; check the task dies with it.

        The task's process group is stopped (SIGSTOP) first, so that it
        cannot finish between our look at it and the kill.
        """
        while True:
            assert time.time() - started < 60, "no task to interrupt"
            starts, ends = task_log(log)
            ended = set(e[1] for e in ends)
            live = dict((p.pid, p) for p in pilots if p.proc.poll() is None)
            running = [s for s in starts if s[1] not in ended and s[2] in live]
            if not running:
                time.sleep(0.02)
                continue
            tid, task_pid, pilot_pid = rng.choice(running)
            try:
                os.killpg(task_pid, signal.SIGSTOP)
            except OSError:
                continue                                # it just ended
            if task_pid not in set(e[1] for e in task_log(log)[1]) and group_members(task_pid):
                break                                   # stopped mid-task
            os.killpg(task_pid, signal.SIGCONT)
        live[pilot_pid].proc.kill()                     # the pilot dies mid-task
        killed[pilot_pid] = time.time()
        gone = wait_for(lambda: not group_members(task_pid), timeout=1.0, interval=0.01)
        assert gone, "task %d of killed pilot %d outlived it by 1 s" % (task_pid, pilot_pid)
        live[pilot_pid].wait(10)
        launch()                                        # a new pilot takes its place

    started = time.time()
    for _ in range(3):
        kill_one()
        time.sleep(rng.uniform(0.2, 0.6))
    # While pilots are alive, free the tokens of the dead ones. A lease of 3 s
    # is 6 heartbeats: live pilots' tokens must never look stale.
    time.sleep(max(0.0, max(killed.values()) + 4.2 - time.time()))
    for doc in token_docs(tdb).values():
        if picas.token_state(doc) == "locked":
            snapshot[doc["_id"]] = (int(doc["pilot_id"].split(":")[1]), doc["claim_id"])
    reset_out = run_cli(couch, tdb, ["reset", "locked", "--stale", "--lease", "3", "--yes"])
    after = token_docs(tdb)
    live_held = [(tid, claim) for tid, (pid, claim) in snapshot.items() if pid not in killed]
    assert live_held, "no live pilot held a token during the reset"
    for tid, claim in live_held:                        # still theirs, never reset
        assert after[tid]["claim_id"] == claim and after[tid]["scrub_count"] == 0, after[tid]
    dead_held = sorted(tid for tid, (pid, _) in snapshot.items() if pid in killed)
    assert len(dead_held) == 3
    assert reset_out.code == 0 and "reset 3 stale tokens to todo" in reset_out.out, reset_out
    for tid in dead_held:
        assert after[tid]["scrub_count"] == 1 and "claim_id" not in after[tid]
    kill_one()                                          # one more, after the reset
    for pilot in pilots:
        if pilot.pid not in killed:
            assert pilot.wait(120) == 0, pilot.err
    # The last killed pilot's token is still locked: free it and finish.
    locked = sorted(t for t, d in token_docs(tdb).items() if picas.token_state(d) == "locked")
    assert len(locked) == 1
    time.sleep(max(0.0, killed[max(killed, key=killed.get)] + 2.2 - time.time()))
    result = run_cli(couch, tdb, ["reset", "locked", "--stale", "--lease", "1", "--yes"])
    assert result.code == 0 and "reset 1 stale tokens to todo" in result.out, result
    last = Pilot(couch, tdb, args, cwd=tmp_path)
    pilots.append(last)
    assert last.wait(60) == 0, last.err

    # Every token is done and ended exactly once.
    assert set(by_state(tdb)) == {"done"}
    starts, ends = task_log(log)
    assert sorted(e[0] for e in ends) == sorted(ids)
    # Tokens started twice are exactly those the killed pilots were running.
    ended_runs = set(e[1] for e in ends)
    interrupted = sorted(s[0] for s in starts if s[2] in killed and s[1] not in ended_runs)
    assert len(interrupted) == len(killed) == 4
    twice = sorted(t for t, c in collections.Counter(s[0] for s in starts).items() if c > 1)
    assert twice == interrupted
    assert all(c <= 2 for c in collections.Counter(s[0] for s in starts).values())
    docs = token_docs(tdb)
    for tid in ids:
        assert docs[tid]["scrub_count"] == (1 if tid in interrupted else 0), docs[tid]
    # No task process of any pilot is left.
    assert not [s for s in starts if group_members(s[1])]


# Signals and walltime ########################################################

def readme():
    with open(os.path.join(ROOT, "README.md")) as fh:
        return fh.read()


class HoldWrite(object):
    """A proxy action: hold the pilot's first write of one of ``kinds`` for ``seconds``, then pass it."""

    def __init__(self, kinds, seconds=0.8):
        self.kinds, self.seconds = kinds or (), seconds
        self.arrived = threading.Event()
        self.lock_revs = {}

    def __call__(self, fs, request):
        if not self.arrived.is_set() and write_kind(request, self.lock_revs) in self.kinds:
            self.arrived.set()
            return ("sleep", self.seconds, ("proxy",))
        return ("proxy",)


@pytest.mark.faults
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
@pytest.mark.parametrize("phase", ["claiming", "running", "saving"])
def test_stop_signal_while_claiming_running_or_saving(couch, tdb, proxy, tmp_path, phase,
                                                      signame):
    """Claiming: the token goes back unrun. Running: the task is stopped and the token
    goes back. Saving: the result is saved. Never locked; exit status 128 + N."""
    ids = make_tokens(tdb, ["a", "b", "c"])
    runs, started = tmp_path / "runs.log", tmp_path / "started"
    task = script(tmp_path / "task.sh", """
        echo "start $2 $$" >> %s
        touch %s
        sleep %s
        echo "end $2 $$" >> %s
        """ % (runs, started, "30" if phase == "running" else "0", runs))
    # Saving: the first result, which goes out together with the next token's lock.
    hold = HoldWrite({"claiming": ("lock",), "saving": ("result", "lock+result")}.get(phase))
    fs = proxy(default=hold)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0.5", "--grace", "1", "--", task],
                  url=fs.url, cwd=tmp_path)
    if phase == "running":
        assert wait_for(started.exists, timeout=30), pilot.err
    else:
        assert hold.arrived.wait(30), pilot.err       # the write is on its way
    time.sleep(0.1)
    signum = getattr(signal, signame)
    pilot.send(signum)
    code = pilot.wait(30)
    # The exit status is 128 + N, as the README's table says.
    assert code == 128 + signum, pilot.err
    assert "%d %s" % (128 + signum, signame) in readme()
    assert "Traceback" not in pilot.err
    runs_seen = lines(runs)
    docs = token_docs(tdb)
    assert picas.token_state(docs["t-1"]) is not None
    done = [t for t in ids if picas.token_state(docs[t]) == "done"]
    todo = [t for t in ids if picas.token_state(docs[t]) == "todo"]
    assert sorted(done + todo) == ids                    # nothing locked, nothing lost
    for tid in todo:                                     # given back: not a scrub
        assert docs[tid]["scrub_count"] == 0 and "claim_id" not in docs[tid], docs[tid]
    if phase == "claiming":
        assert runs_seen == [] and done == []
    elif phase == "running":
        assert [w[0] for w in runs_seen] == ["start"] and done == []
        assert wait_for(lambda: not group_members(int(runs_seen[0][2])), timeout=3)
    else:
        assert [w[0] for w in runs_seen] == ["start", "end"]
        assert done == [runs_seen[0][1]]
        assert docs[done[0]]["exit_code"] == 0 and attachment(tdb, done[0]) == b""


@pytest.mark.faults
def test_stop_signals_at_random_moments_never_leave_tokens_locked_or_undo_results(
        couch, tdb, proxy, tmp_path):
    """SIGTERM/SIGUSR1 whenever: each token ends done or todo, and done stays done."""
    seed = fault_seed()
    rng = random.Random(seed)
    n = 16
    ids = make_tokens(tdb, ["%.2f" % rng.uniform(0, 0.15) for _ in range(n)])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", """
        echo "start $2" >> %s
        sleep "$1"
        echo "end $2" >> %s
        """ % (runs, runs))
    # Small random delays on every request widen the claiming and saving windows.
    fs = proxy(default=lambda fs, request: ("sleep", rng.uniform(0, 0.03), ("proxy",)))
    args = ["run", "--heartbeat", "0.3", "--grace", "1", "--", task]
    done_claims = {}             # token -> the claim that finished it, when first seen done
    done_at = {}
    codes = []
    for _ in range(30):
        pilot = Pilot(couch, tdb, args, url=fs.url, cwd=tmp_path)
        assert wait_for(lambda: "claiming from" in pilot.err, timeout=30), pilot.err
        time.sleep(rng.uniform(0.01, 0.4))
        signum = rng.choice([signal.SIGTERM, signal.SIGUSR1])
        pilot.send(signum)
        code = pilot.wait(30)
        codes.append(code)
        # 0 or 3: the work ran out before the signal. Killed by the signal
        # (-N, which the shell shows as 128 + N too): it came before the
        # pilot's handlers were installed or after they were removed at its end.
        benign = code == -signum and ("pilot finished" in pilot.err or
                                      pilot.err.strip().count("\n") == 0)
        assert code in (128 + signum, 0, 3) or benign, (seed, code, pilot.err)
        assert "Traceback" not in pilot.err, pilot.err
        docs = token_docs(tdb)
        states = dict((t, picas.token_state(docs[t])) for t in ids)
        assert set(states.values()) <= {"todo", "done"}, (seed, states)
        for tid, doc in docs.items():
            if states[tid] == "done":
                if tid not in done_claims:
                    done_at[tid] = len(lines(runs))      # task-log lines when first seen done
                assert done_claims.setdefault(tid, doc["claim_id"]) == doc["claim_id"]
        assert all(states[t] == "done" for t in done_claims), seed      # done only grows
        if len(done_claims) == n:
            break
    assert len([c for c in codes if c > 128]) >= 4, codes
    last = Pilot(couch, tdb, args, cwd=tmp_path)
    assert last.wait(60) in (0, 3), last.err
    docs = token_docs(tdb)
    assert all(picas.token_state(docs[t]) == "done" for t in ids)
    assert all(docs[t]["claim_id"] == c for t, c in done_claims.items())
    # A finished, saved token never ran again: no start after it was seen done.
    log_lines = lines(runs)
    assert set(w[1] for w in log_lines if w[0] == "end") == set(ids)
    for tid, position in done_at.items():
        assert ["start", tid] not in log_lines[position:], (seed, tid)


@pytest.mark.faults
def test_stop_signal_the_moment_a_task_finishes_keeps_its_result(couch, tdb, tmp_path):
    """A task that finished is finished: a stop signal that arrives right after its exit
    (a helper outside its process group signals the pilot once it was reaped) must not
    send the token back to todo to run again."""
    ids = make_tokens(tdb, ["a", "b", "c", "d", "e"])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", """
        pilot=$PPID me=$$ ready=%s/ready-$2
        setsid sh -c "touch $ready; while kill -0 $me 2>/dev/null; do :; done; kill -$1 $pilot" \\
            </dev/null >/dev/null 2>&1 &
        while [ ! -e $ready ]; do :; done
        echo "end $2" >> %s
        """ % (tmp_path, runs))
    for number, signame in enumerate(["TERM", "USR1", "TERM", "USR1", "TERM"], 1):
        for tid in ids:                                  # this round's signal, as the input
            doc = tdb.get(tid)
            if picas.token_state(doc) == "todo" and doc["input"] != signame:
                doc["input"] = signame
                tdb.save(doc)
        pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", task], cwd=tmp_path)
        code = pilot.wait(30)
        # In the last round the pilot may run out of work and exit before the
        # helper's signal lands: then it exits 0; the result checks below still hold.
        if not (number == len(ids) and code == 0):
            assert code == 128 + getattr(signal, "SIG" + signame), pilot.err
        ended = [w[1] for w in lines(runs)]
        states = by_state(tdb)
        assert len(ended) == number and len(set(ended)) == number   # each ran once...
        assert states["done"] == set(ended), (number, pilot.err)   # ... and is done
        assert not states["locked"] and len(states["todo"]) == len(ids) - number


@pytest.mark.faults
def test_task_that_ignores_sigterm_is_killed_after_the_grace_period(couch, tdb, pilots,
                                                                    tmp_path):
    make_tokens(tdb, ["a"])
    pidfile = tmp_path / "task.pid"
    task = script(tmp_path / "task.sh", """
        trap '' TERM
        echo $$ > %s
        while :; do sleep 0.05; done
        """ % pidfile)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0.5", "--grace", "1.5", "--", task],
                  cwd=tmp_path)
    pilots.append(pilot)
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30)
    task_pid = int(pidfile.read_text())
    sent = time.time()
    pilot.send(signal.SIGTERM)
    time.sleep(0.8)
    assert alive(task_pid)                      # it ignores SIGTERM...
    code = pilot.wait(20)
    elapsed = time.time() - sent
    assert not group_members(task_pid)          # ... and was killed after the grace period
    assert code == 128 + signal.SIGTERM
    assert 1.5 <= elapsed < 6, elapsed
    assert "SIGKILL" in pilot.err and "Traceback" not in pilot.err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and doc["scrub_count"] == 0


# The bad-input catalog (docs/bad-inputs.md): one test per row ################

CATALOG = os.path.join(ROOT, "docs", "bad-inputs.md")


def assert_clear(result, code, *phrases):
    """Exit status ``code``, every phrase in stderr, and no Python traceback anywhere."""
    assert result.code == code, result
    for phrase in phrases:
        assert phrase in result.err, (phrase, result)
    assert "Traceback" not in result.err + result.out, result


def catalog_rows():
    """The first column of every row of the catalog's table."""
    with open(CATALOG) as fh:
        rows = [line for line in fh if line.startswith("|")]
    return [row.split("|")[1].strip() for row in rows[2:]]


#: The catalog's rows (first column, in order) and the tests that prove them.
ROWS = [
    ("Unreachable host", "test_bad_input_unreachable_host"),
    ("DNS failure", "test_bad_input_dns_failure"),
    ("TLS certificate fails verification", "test_bad_input_tls_verification_failure"),
    ("Wrong password", "test_bad_input_wrong_password"),
    ("Missing database", "test_bad_input_missing_database"),
    ("Missing design document or view", "test_bad_input_missing_design_document_or_view"),
    ("View returns documents that are not tokens", "test_bad_input_view_with_non_tokens"),
    ("Tokens with missing, extra or wrongly typed fields",
     "test_bad_input_tokens_with_odd_fields"),
    ("Input larger than 128 KiB", "test_bad_input_huge_input"),
    ("Input with a null character", "test_bad_input_null_character_in_input"),
    ("Non-UTF-8 or binary task output", "test_bad_input_binary_output"),
    ("Hundreds of MB of task output", "test_bad_input_hundreds_of_mb_of_output"),
    ("Command that does not exist or is not executable", "test_bad_input_command_cannot_run"),
    ("Malformed or world-readable config file", "test_bad_input_config_file"),
    ("Interrupted push of a large token file", "test_bad_input_interrupted_push"),
    ("Values JSON cannot hold in `push --json` (lone surrogates as truncating JavaScript or "
     "Java leaves them, `NaN`)", "test_push_refuses_a_lone_surrogate_nan_naming_the_token"),
    ("A stored token holding a lone surrogate (a lenient server such as pouchdb-server "
     "stored it)",
     "test_a_stored_token_with_a_lone_surrogate_goes_to_error_and_the_pilot_goes_on"),
    ("Bytes, NaN or other non-JSON values put into a token by Python code (e.g. the bytes "
     "`execute()` returns)", "test_bytes_in_a_result_put_the_token_in_error_and_the_pilot_goes_on"),
    ("Very long or non-ASCII token ids (45 Greek letters)",
     "test_a_45_character_greek_token_id_runs"),
    ("The journal folder cannot be written (a file in its place, a full or read-only disk)",
     "test_an_unwritable_journal_never_stops_a_result"),
    ("A bad `--retry-codes`, `--max-time` or `--black-hole` value",
     "test_bad_input_retry_codes_or_max_time"),
    ("A batch-system query tool that hangs, fails, is missing or prints garbage",
     "test_bad_input_walltime_query_tool"),
    ("A worker node where every task fails at once (a black hole)",
     "test_bad_input_black_hole_host"),
    ("A token that kills its pilot or always runs out of time (poison)",
     "test_bad_input_poison_token"),
    ("A token id that does not exist (`show`, `logs`), or a token with no logs yet",
     "test_bad_input_unknown_token_id"),
    ("A bad `export` or `status --errors` request (a missing view, `--fields` naming nothing, "
     "an unwritable `-o` file, an unknown `--format`, `--errors` with `--watch`)",
     "test_bad_input_export_and_status_options"),
    ("Token ids, host names, fields or error messages holding terminal control characters "
     "(escape sequences)", "test_bad_input_escape_sequences_in_tokens"),
    ("A `$PICAS_OUTPUT_FILE` that is not JSON, not an object, over 1 MiB or not UTF-8",
     "test_bad_input_output_file"),
    ("A `$PICAS_OUTPUT_FILE` holding values CouchDB cannot store (lone surrogates, `NaN`)",
     "test_bad_input_output_file_with_values_couchdb_cannot_store"),
    ("Files over `--attach-limit` or `--attach-total`",
     "test_bad_input_attachment_over_the_limits"),
    ("Files `--attach` cannot attach (directories, FIFOs, symlinks pointing outside the working "
     "directory, names starting with `_` or already taken)",
     "test_bad_input_files_attach_cannot_attach"),
    ("An `--attach` pattern that leaves the working directory (`../x`, an absolute path)",
     "test_bad_input_attach_pattern_outside_the_working_directory"),
    ("A `report` without `--html` or `--json`, or a report file that cannot be written (a "
     "folder that does not exist, a folder in its place, no permission, a write that fails)",
     "test_bad_input_report_usage"),
]


@pytest.mark.faults
def test_bad_input_catalog_has_a_test_for_every_row():
    assert catalog_rows() == [row for row, _ in ROWS]
    # The inputs the catalog must cover, whatever else it grows to hold.
    required = ["Unreachable host", "DNS failure", "TLS certificate fails verification",
                "Wrong password", "Missing database", "Missing design document or view",
                "View returns documents that are not tokens",
                "Tokens with missing, extra or wrongly typed fields", "Input larger than 128 KiB",
                "Non-UTF-8 or binary task output", "Hundreds of MB of task output",
                "Command that does not exist or is not executable",
                "Malformed or world-readable config file",
                "Interrupted push of a large token file"]
    assert [row for row in required if row not in catalog_rows()] == []
    # Rows of the result path are proven in test_results, of walltime, black holes and
    # poison in test_pilot_health, of task outputs in test_outputs, of the inspection
    # commands in test_inspect, of the campaign report in test_report.
    import importlib
    modules = [importlib.import_module(name) for name in
               ("test_results", "test_pilot_health", "test_outputs", "test_inspect",
                "test_report")]
    for _, name in ROWS:
        assert callable(globals().get(name) or next(
            (getattr(m, name) for m in modules if hasattr(m, name)), None)), name


@pytest.mark.faults
def test_bad_input_unreachable_host(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    url = "http://127.0.0.1:%d" % free_port()
    result = run_cli(couch, tdb, ["--url", url, "run", "--", "true"], cwd=tmp_path,
                     fast_retries=True)
    assert_clear(result, 1, "cannot reach the server", "connection refused", url,
                 "(%d attempts)" % (picas.DEFAULT_RETRIES + 1))
    assert revisions(tdb) == before


@pytest.mark.faults
def test_bad_input_dns_failure(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    url = "http://nonexistent.invalid:5984"
    result = run_cli(couch, tdb, ["--url", url, "run", "--", "true"], cwd=tmp_path,
                     fast_retries=True)
    assert_clear(result, 1, "host name not found", "nonexistent.invalid",
                 "(%d attempts)" % (picas.DEFAULT_RETRIES + 1), "over plain http://")
    assert revisions(tdb) == before


class _JSONHandler(BaseHTTPRequestHandler):
    """Answers every GET/HEAD with an empty view result, as a CouchDB with no tokens would."""

    def do_GET(self):
        body = json.dumps({"total_rows": 0, "offset": 0, "rows": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(tmp_path):
    """A tiny HTTPS server with a self-signed certificate made by the openssl CLI.

    Yields (url, path of the certificate).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command-line tool is needed to make a test certificate "
                    "(apt-get install openssl)")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    made = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                           "-keyout", key, "-out", cert],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert made.returncode == 0, made.stdout
    server = HTTPServer(("127.0.0.1", 0), _JSONHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield "https://127.0.0.1:%d" % server.server_address[1], cert
    server.shutdown()
    server.server_close()


@pytest.mark.faults
def test_bad_input_tls_verification_failure(couch, tdb, tmp_path, https_server):
    url, cert = https_server
    started = time.time()
    result = run_cli(couch, tdb, ["--url", url, "status"], cwd=tmp_path)
    assert_clear(result, 1, "TLS certificate verification failed", "cafile")
    assert time.time() - started < 10          # a bad certificate is not retried for a minute
    # The same server with its CA given: verification was the only problem.
    result = run_cli(couch, tdb, ["--url", url, "--cafile", cert, "status"], cwd=tmp_path)
    assert result.code == 0 and "todo 0" in result.out, result


@pytest.mark.faults
def test_bad_input_wrong_password(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    wrong = "wrong-%s" % uuid.uuid4().hex[:8]
    result = run_cli(couch, tdb, ["run", "--", "true"], cwd=tmp_path,
                     env={"PICAS_PASSWORD": wrong})
    assert_clear(result, 1, "HTTP 401", "check the user name and password")
    assert wrong not in result.out + result.err
    assert revisions(tdb) == before


@pytest.mark.faults
def test_bad_input_missing_database(couch, tdb, tmp_path):
    missing = "no-such-db-%s" % uuid.uuid4().hex[:8]
    result = run_cli(couch, tdb, ["--db", missing, "run", "--", "true"], cwd=tmp_path)
    assert_clear(result, 2, "database '%s' does not exist" % missing, "--create-db")
    assert missing not in couch.server().all_databases()


@pytest.mark.faults
@pytest.mark.parametrize("what", ["design-document", "view"])
def test_bad_input_missing_design_document_or_view(couch, db, tmp_path, what):
    make_tokens(db, ["a"])
    args = ["run", "--", "true"]
    if what == "view":
        ensure_views(db)
        args = ["run", "--view", "nosuch", "--", "true"]
    before = revisions(db)
    result = run_cli(couch, db, args, cwd=tmp_path)
    view = "Monitor/nosuch" if what == "view" else "Monitor/todo"
    assert_clear(result, 1, "view %s not found" % view, "python picas.py views")
    assert revisions(db) == before


@pytest.mark.faults
def test_bad_input_view_with_non_tokens(couch, tdb, tmp_path):
    tdb.ensure_design("Mixed", {"todo": {"map": "function(doc) { if (doc.lock == 0) "
                                                "emit(doc._id, null); }"}})
    others = [{"_id": "config", "lock": 0, "done": 0, "setting": 1},
              {"_id": "task-like", "type": "task", "lock": 0, "done": 0, "input": "x"}]
    tdb.update([dict(d) for d in others])
    make_tokens(tdb, ["a", "b"])
    before = revisions(tdb)
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", 'echo "$2" >> %s\n' % runs)
    result = run_cli(couch, tdb, ["run", "--view", "Mixed/todo", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "'config', which is not a token", "'task-like', which is not a token")
    assert sorted(w[0] for w in lines(runs)) == ["t-1", "t-2"]
    after = revisions(tdb)
    assert after["config"] == before["config"] and after["task-like"] == before["task-like"]
    # A view holding nothing but non-tokens is "no work", not an error.
    result = run_cli(couch, tdb, ["run", "--view", "Mixed/todo", "--", task], cwd=tmp_path)
    assert_clear(result, picas.EXIT_NO_WORK)
    assert revisions(tdb) == after


@pytest.mark.faults
def test_bad_input_tokens_with_odd_fields(couch, tdb, tmp_path):
    base = dict(picas.TOKEN_DEFAULTS, error=[])
    odd = {
        "lock-string": dict(base, lock="0", input="ok"),
        "done-missing": dict((k, v) for k, v in base.items() if k != "done"),
        "type-missing": dict((k, v) for k, v in base.items() if k != "type"),
        "exit-code-string": dict(base, exit_code="7", input="ok"),
        "input-missing": dict((k, v) for k, v in base.items() if k != "input"),
        "input-number": dict(base, input=42),
        "error-not-a-list": dict(base, error="an old failure", input="fail"),
        "scrub-count-garbage": dict(base, scrub_count="many", input="fail"),
        "scrub-count-list": dict(base, scrub_count=[1], input="fail"),
        "extra-fields": dict(base, input="ok", custom={"nested": [1, 2]}, priority=5),
    }
    tdb.update([dict(doc, _id=tid) for tid, doc in odd.items()])
    before = revisions(tdb)
    task = script(tmp_path / "task.sh", 'echo "[$1]"\n[ "$1" = fail ] && exit 4\nexit 0\n')
    # Three tokens fail fast for their own reasons: the black-hole check is off here
    # (tests/test_pilot_health.py tests it).
    result = run_cli(couch, tdb, ["run", "--max-scrub", "1", "--black-hole", "0", "--", task],
                     cwd=tmp_path)
    assert_clear(result, 0)
    docs = token_docs(tdb)
    state = dict((tid, picas.token_state(doc)) for tid, doc in docs.items())
    # Not in any view: never claimed, never changed.
    for tid in ("done-missing", "type-missing"):
        assert state[tid] is None and docs[tid]["_rev"] == before[tid]
    for tid in ("lock-string", "exit-code-string", "input-missing", "input-number",
                "extra-fields"):
        assert state[tid] == "done" and docs[tid]["exit_code"] == 0, docs[tid]
    assert attachment(tdb, "input-missing") == b"[null]\n"
    assert attachment(tdb, "input-number") == b"[42]\n"
    assert docs["extra-fields"]["custom"] == {"nested": [1, 2]}
    assert docs["extra-fields"]["priority"] == 5
    # Failing tokens with odd error and scrub_count fields: retried once, then error.
    for tid in ("error-not-a-list", "scrub-count-garbage", "scrub-count-list"):
        assert state[tid] == "error" and docs[tid]["exit_code"] == 4, docs[tid]
        assert docs[tid]["scrub_count"] == 1
    assert docs["error-not-a-list"]["error"] == "an old failure"
    assert not unsaved_files(tmp_path)


@pytest.mark.faults
def test_bad_input_huge_input(couch, tdb, tmp_path):
    limit = picas._MAX_INPUT
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id="huge", error=[], input="x" * (129 * 1024)),
                dict(picas.TOKEN_DEFAULTS, _id="edge-big", error="an old failure",
                     input="z" * (limit + 1)),
                dict(picas.TOKEN_DEFAULTS, _id="edge-ok", error=[], input="w" * limit),
                dict(picas.TOKEN_DEFAULTS, _id="small", error=[], input="y")])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", 'echo "$2" "${#1}" "${#PICAS_TOKEN_INPUT}" >> %s\n' % runs)
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "more than one command-line argument and environment variable")
    assert sorted(lines(runs)) == [["edge-ok", str(limit), str(limit)], ["small", "1", "1"]]
    doc = tdb.get("huge")
    assert picas.token_state(doc) == "error" and doc["exit_code"] != 0
    assert "input is 132096 bytes, more than one" in doc["error"][-1]["message"]
    assert doc["input"] == "x" * (129 * 1024)                    # the input is kept
    edge = tdb.get("edge-big")
    assert picas.token_state(edge) == "error"
    assert edge["error"][0] == "an old failure"                  # a non-list error is wrapped
    assert "input is %d bytes" % (limit + 1) in edge["error"][-1]["message"]
    assert picas.token_state(tdb.get("edge-ok")) == "done"
    assert picas.token_state(tdb.get("small")) == "done"


@pytest.mark.faults
def test_bad_input_null_character_in_input(couch, tdb, tmp_path):
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id="nul", error=[], input="a\u0000b"),
                dict(picas.TOKEN_DEFAULTS, _id="fine", error=[], input="y")])
    runs = tmp_path / "runs.log"
    task = script(tmp_path / "task.sh", 'echo "$2" >> %s\n' % runs)
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "null character")
    assert [w[0] for w in lines(runs)] == ["fine"]
    doc = tdb.get("nul")
    assert picas.token_state(doc) == "error" and "null character" in doc["error"][-1]["message"]
    assert doc["input"] == "a\u0000b"


@pytest.mark.faults
def test_bad_input_binary_output(couch, tdb, tmp_path):
    out = bytes(bytearray(range(256))) + b"\xff\xfe not UTF-8 \xc3\x28 \x00 end"
    err = b"\xe9t\xe9 latin-1 \r\n\x00"
    (tmp_path / "out.bin").write_bytes(out)
    (tmp_path / "err.bin").write_bytes(err)
    task = script(tmp_path / "task.sh", "cat %s\ncat %s >&2\n" % (tmp_path / "out.bin",
                                                                 tmp_path / "err.bin"))
    make_tokens(tdb, ["a"])
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    assert attachment(tdb, "t-1") == out and attachment(tdb, "t-1", "err") == err
    assert picas.token_state(tdb.get("t-1")) == "done"


@pytest.mark.faults
def test_bad_input_hundreds_of_mb_of_output(couch, tdb, proxy, tmp_path):
    """300 MB of output: the pilot's memory stays small and the attachment is capped."""
    size = 300 * 1000 * 1000
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "head -c %d /dev/zero | tr '\\0' x\necho tail-end\n"
                  % size)
    peaks, pilot_pid = {}, []

    def measure(fs, request):
        kind = write_kind(request, {})
        if kind in ("lock", "result") and pilot_pid:
            peaks.setdefault(kind, vm_hwm_kib(pilot_pid[0]))
        return ("proxy",)
    fs = proxy(default=measure)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", task], url=fs.url, cwd=tmp_path)
    pilot_pid.append(pilot.pid)
    assert pilot.wait(120) == 0, pilot.err
    assert "Traceback" not in pilot.err
    # VmHWM is the peak RSS so far: at the lock (a fresh pilot) and when the
    # result with the logs arrives (after reading the 300 MB log file).
    assert peaks.get("lock") and peaks.get("result"), peaks
    assert peaks["result"] < peaks["lock"] + 40 * 1024, peaks          # KiB
    assert peaks["result"] < 100 * 1024, peaks
    stored = attachment(tdb, "t-1")
    limit = picas.DEFAULT_LOG_LIMIT
    assert limit < len(stored) <= limit + 100
    assert stored.startswith(b"x" * (limit // 4)) and stored.endswith(b"x" * 1000 + b"tail-end\n")
    assert ("cut %d bytes" % (size + len("tail-end\n") - limit)).encode() in stored
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["exit_code"] == 0


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["missing", "not-executable", "not-on-path"])
def test_bad_input_command_cannot_run(couch, tdb, tmp_path, kind):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    (tmp_path / "plain.sh").write_text("#!/bin/sh\nexit 0\n")
    command, complaint = {
        "missing": ("./missing.sh", "command ./missing.sh does not exist"),
        "not-executable": ("./plain.sh", "not executable: chmod +x ./plain.sh"),
        "not-on-path": ("no-such-command-%s" % uuid.uuid4().hex[:6], "not found on PATH"),
    }[kind]
    result = run_cli(couch, tdb, ["run", "--", command], cwd=tmp_path)
    assert_clear(result, 2, complaint)
    assert revisions(tdb) == before                 # refused before claiming anything


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["malformed", "world-readable"])
def test_bad_input_config_file(couch, tdb, tmp_path, kind):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    config = tmp_path / "picasconfig.py"
    if kind == "malformed":
        config.write_text("PICAS_HOST_URL = 'http://127.0.0.1:1\nPICAS_DATABASE = \n")
        config.chmod(0o600)
    else:
        config.write_text("PICAS_HOST_URL = %r\nPICAS_DATABASE = %r\nPICAS_USERNAME = %r\n"
                          "PICAS_PASSWORD = %r\n" % (couch.url, tdb.name, couch.username,
                                                     couch.password))
        config.chmod(0o644)
    env = dict.fromkeys(["PICAS_HOST_URL", "PICAS_DATABASE", "PICAS_USERNAME",
                         "PICAS_PASSWORD"])
    result = run_cli(couch, tdb, ["status"], cwd=tmp_path, env=env)
    if kind == "malformed":
        assert_clear(result, 2, "cannot read config file", "picasconfig.py")
    else:
        assert_clear(result, 0, "other users can read it: chmod 600")
        assert "todo 1" in result.out
    assert couch.password not in result.out + result.err
    assert revisions(tdb) == before


@pytest.mark.faults
def test_bad_input_interrupted_push(couch, db, tmp_path):
    n = 20000
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join("line %d\n" % i for i in range(n)))
    pusher = subprocess.Popen(pilot_cmd("push", str(tokens)), env=couch.env(db.name),
                              cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: db.info()["doc_count"] >= 2000, timeout=60, interval=0.01)
    finally:
        pusher.kill()                                   # SIGKILL, midway
        pusher.communicate()
    partial = db.info()["doc_count"]
    assert 0 < partial < n
    result = run_cli(couch, db, ["push", str(tokens)], cwd=tmp_path)
    assert_clear(result, 0)
    created, existing = map(int, re.match(r"created (\d+) tokens, (\d+) already existed",
                                          result.out).groups())
    assert created + existing == n and existing >= partial, result
    rows = db.all_docs(include_docs=True)["rows"]
    assert len(rows) == n
    inputs = collections.Counter(r["doc"]["input"] for r in rows)
    assert sorted(inputs) == sorted("line %d" % i for i in range(n))
    assert set(inputs.values()) == {1}                  # no duplicates


# Security ####################################################################

def secret_forms(password, username="admin"):
    """The ways a password could leak: plain, URL-quoted, and inside Basic auth."""
    forms = set([password, SENTINEL_PASSWORD, quote(password, safe="")])
    for user in ("admin", os.environ.get("PICAS_USERNAME") or "admin", username):
        forms.add(base64.b64encode(("%s:%s" % (user, password)).encode()).decode())
    return [f.encode("utf-8") for f in forms if f]


DUMP_TASK = """#!%(python)s
import os, sys, time
def read(path):
    with open(path, "rb") as fh:
        return fh.read()
record = b"\\n".join([read("/proc/self/cmdline"), read("/proc/self/environ"),
                      read("/proc/%%d/cmdline" %% os.getppid())])
with open(os.path.join(%(dump)r, sys.argv[2]), "wb") as fh:
    fh.write(record)
sys.stdout.buffer.write(record)
sys.stderr.write("\\n".join("%%s=%%s" %% kv for kv in sorted(os.environ.items())))
deadline = time.time() + 30
while sys.argv[1] == "wait" and not os.path.exists(%(gate)r) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3 if sys.argv[1] == "slow" else 0)
sys.exit(3 if sys.argv[1] == "fail" else 0)
"""


@pytest.mark.faults
def test_password_never_reaches_tasks_logs_errors_documents_or_status(couch, tdb, proxy,
                                                                      tmp_path):
    secrets = secret_forms(couch.password, couch.username)
    dump, gate = tmp_path / "dump", tmp_path / "gate"
    dump.mkdir()
    task = tmp_path / "task.py"
    task.write_text(DUMP_TASK % {"python": sys.executable, "dump": str(dump), "gate": str(gate)})
    task.chmod(0o755)
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id=tid, error=[], input=value)
                for tid, value in (("t-wait", "wait"), ("t-slow", "slow"), ("t-fail", "fail"),
                                   ("t-huge", "x" * 140000))])
    # A few faults on the way, so that retries, warnings and debug lines are logged too.
    fs = proxy(script=[("proxy",), ("status", 503), ("drop",), ("proxy",), ("reset",)])
    pilot = Pilot(couch, tdb, ["-v", "run", "--heartbeat", "0.1", "--", str(task)],
                  url=fs.url, cwd=tmp_path)
    # While the first task waits: every process under the pilot (the task, the
    # watchdog) -- its command line and environment.
    outputs = []
    assert wait_for(lambda: os.path.exists(str(dump / "t-wait")) or pilot.proc.poll() is not None,
                    timeout=30) and pilot.proc.poll() is None, pilot.err
    children = descendants(pilot.pid)
    assert len(children) >= 2, children                 # the task and the watchdog
    for pid in children:
        for name in ("cmdline", "environ"):
            try:
                with open("/proc/%d/%s" % (pid, name), "rb") as fh:
                    outputs.append(("process %d %s" % (pid, name), fh.read()))
            except OSError:
                pass
    gate.write_text("go")
    assert pilot.wait(60) == 0, pilot.err
    outputs += [("pilot stdout", pilot.out.encode()), ("pilot stderr", pilot.err.encode())]
    for name in os.listdir(str(dump)):
        outputs.append(("dump " + name, (dump / name).read_bytes()))
    assert len(os.listdir(str(dump))) == 3              # t-huge never ran: input too large
    # status, and commands that fail, with debug output.
    for args in (["-v", "status"], ["-v", "status", "--json"], ["-v", "reset", "error", "--yes"],
                 ["-v", "--db", "no-such-db", "status"], ["-v", "run", "--view", "x", "--", "true"]):
        result = run_cli(couch, tdb, args, cwd=tmp_path)
        outputs.append((" ".join(args), (result.out + result.err).encode()))
    # Exceptions and reprs, with the password given every way picas.py takes it.
    authority = "%s:%s@127.0.0.1" % (quote(couch.username, safe=""),
                                     quote(couch.password, safe=""))
    for server in (picas.Server(couch.url, couch.username, couch.password, retries=0),
                   picas.Server(couch.url.replace("127.0.0.1", authority, 1), retries=0),
                   picas.Server("http://%s:%d" % (authority, free_port()), retries=0),
                   picas.Server(couch.url, "nobody", couch.password, retries=0)):
        outputs.append(("repr", repr(server).encode() + repr(server.database("d")).encode()))
        for call in (lambda: server.database(tdb.name)["no-such-doc"],
                     lambda: server.database(tdb.name).save({"_id": "t-slow", "_rev": "1-x"}),
                     lambda: server.database("no-such-db").view("Monitor/todo")):
            try:
                call()
            except picas.PicasError as exc:
                outputs.append(("exception", (str(exc) + repr(exc) + repr(exc.args) +
                                              repr(vars(exc))).encode()))
    assert len([o for o in outputs if o[0] == "exception"]) >= 10
    # Every document and every attachment.
    rows = tdb.all_docs(include_docs=True, attachments=True)["rows"]
    outputs.append(("documents", json.dumps(rows).encode()))
    for row in rows:
        for name, info in (row["doc"].get("_attachments") or {}).items():
            outputs.append(("attachment " + name, base64.b64decode(info["data"])))
    assert len([o for o in outputs if o[0].startswith("attachment")]) == 6
    # Whatever the pilot left in its working directory.
    for folder, _, files in os.walk(str(tmp_path)):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                outputs.append((name, fh.read()))
    leaks = [(where, secret) for where, data in outputs for secret in secrets if secret in data]
    assert leaks == []
    # The dumps are real: they hold the task's input and its parent, the pilot.
    assert b"PICAS_TOKEN_INPUT=wait" in (dump / "t-wait").read_bytes()
    assert b"picas.py" in (dump / "t-wait").read_bytes()


class _Records(object):
    """Collects the picas logger's records (caplog misses them when propagation is off)."""

    def __init__(self):
        import logging
        self.messages = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())

    def __enter__(self):
        import logging
        picas.log.addHandler(self.handler)
        self.level = picas.log.level
        picas.log.setLevel(logging.DEBUG)
        return self.messages

    def __exit__(self, *exc):
        picas.log.removeHandler(self.handler)
        picas.log.setLevel(self.level)


@pytest.mark.faults
def test_tls_verification_is_on_by_default(https_server):
    url, cert = https_server
    with _Records() as messages:
        with pytest.raises(picas.ServerUnreachable) as info:
            picas.Server(url, retries=3).info()
        assert "TLS certificate verification failed" in str(info.value)
        assert "(1 attempts)" in str(info.value)              # not retried
        assert messages == [m for m in messages if "switched OFF" not in m]
        assert picas.Server(url, cafile=cert).info()["total_rows"] == 0
        assert not [m for m in messages if "switched OFF" in m]
        assert picas.Server(url, verify=False).info()["total_rows"] == 0
        assert [m for m in messages if "verification is switched OFF" in m]


@pytest.mark.faults
def test_tls_cas_from_a_directory_and_the_environment(https_server, tmp_path, monkeypatch):
    url, cert = https_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("X509_CERT_DIR", raising=False)
    hashed = subprocess.run([shutil.which("openssl"), "x509", "-hash", "-noout", "-in", cert],
                            stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    cadir = tmp_path / "certificates"          # laid out like /etc/grid-security/certificates
    cadir.mkdir()
    shutil.copy(cert, str(cadir / (hashed + ".0")))
    with pytest.raises(picas.ServerUnreachable):
        picas.Server(url, retries=0).info()
    assert picas.Server(url, capath=str(cadir)).info()["total_rows"] == 0
    monkeypatch.setenv("X509_CERT_DIR", str(cadir))
    assert picas.Server(url).info()["total_rows"] == 0
    monkeypatch.delenv("X509_CERT_DIR")
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    assert picas.Server(url).info()["total_rows"] == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(picas.PicasError) as info:
        picas.Server(url)
    assert "does not exist" in str(info.value)


@pytest.mark.faults
def test_password_over_plain_http_to_another_host_warns():
    with _Records() as messages:
        picas.Server("http://example.invalid:5984", "u", "p")
        warned = [m for m in messages if "over plain http://" in m]
        assert len(warned) == 1 and "example.invalid" in warned[0] and "https://" in warned[0]
        del messages[:]
        picas.Server("http://127.0.0.1:5984", "u", "p")
        picas.Server("http://localhost:5984", "u", "p")
        picas.Server("https://example.invalid:6984", "u", "p")
        picas.Server("http://example.invalid:5984")             # no password, nothing to warn
        assert not [m for m in messages if "plain http" in m]


@pytest.mark.faults
def test_token_input_reaches_the_task_byte_for_byte_and_never_a_shell(couch, tdb, tmp_path):
    inputs = ["$(touch PWNED); ; rm -rf x", "`touch PWNED2`", "; touch PWNED3 #",
              "\n touch PWNED4 \n", "a'b\"c\\d $HOME * ? ~ \u00e9\u2713 > PWNED5", "-rf x"]
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id="t-%d" % i, error=[], input=value)
                for i, value in enumerate(inputs)])
    work = tmp_path / "work"
    (work / "x").mkdir(parents=True)
    (work / "x" / "keep").write_text("still here")
    result = run_cli(couch, tdb, ["run", "--", "sh", "-c",
                                  'printf %s "$1" > "out-$2"; '
                                  'printf %s "$PICAS_TOKEN_INPUT" > "env-$2"', "sh"], cwd=work)
    assert_clear(result, 0)
    for i, value in enumerate(inputs):
        assert (work / ("out-t-%d" % i)).read_bytes() == value.encode("utf-8")
        assert (work / ("env-t-%d" % i)).read_bytes() == value.encode("utf-8")
    created = [p for p in os.listdir(str(tmp_path)) + os.listdir(str(work)) if "PWNED" in p]
    assert created == []
    assert (work / "x" / "keep").read_text() == "still here"
    assert set(by_state(tdb)) == {"done"}
