"""Faults combined: pilots under a random schedule of network faults, 202s, stops and kills.

Several ``python picas.py run`` pilots share one working directory (as a SLURM
array does) and reach the server through a proxy that, request by request,
passes, drops the request before forwarding it, forwards it and drops the
answer, delays it, answers 503, or answers 202 instead of 201; during
"degraded" windows every write is answered 202, as a CouchDB cluster missing
two nodes does. Meanwhile pilots get SIGTERM or SIGUSR1 together with their
task (a batch system at its time limit), SIGTERM alone, or SIGKILL, at
random instants; a batch system starts a new pilot for each one that ends.
The tokens are not all well-behaved: some fail for real (``--max-scrub 1``),
some answer "try again later" (exit code 75) on their first two runs, some
always outlast ``--max-token-time`` and are killed.

Afterwards, as an operator would: ``picas.py replay`` of the shared journal,
``reset locked --stale``, and more pilots while todo has tokens (a pilot does
not take again a token it got 75 for). Then every good or retried token must be
done and every failing or slow one in error (exit code 1 after a scrub, or
124), with the result of one of its own runs (its stored ``claim_id`` is one a
task completed under); a retry code was never charged (``scrub_count`` is
what ``reset --stale`` charged for dead pilots, nothing more); a good token may have run to
completion more than once only when a pilot that ran it was SIGKILLed (the
instant between a task's end and its result reaching the journal, which no
handler can cover), or was signalled in the instant (0.25 s allowed) between
the task's last write and its exit (then the pilot stops a task it cannot
know had finished its work); nothing is locked, no process is left, no pilot printed
a traceback, the journal is empty.

Seeds: ``PICAS_FAULT_SCHEDULE_SEEDS=3,17`` runs those (a failure prints its
seed). The seed fixes the schedule (signals, kills, degraded windows, task
lengths) and the sequence of per-request decisions (the n-th request the
proxy sees gets decision n); how concurrent pilots interleave is the
operating system's, so a replay meets the same faults, not always the same
interleaving. ``PICAS_FAULT_SOAK=N`` adds N random seeds with a schedule
three times as long (a soak).
"""
import collections
import json
import os
import random
import signal
import sys
import threading
import time

import pytest

import picas
from faultserver import FaultServer
from helpers import ensure_views, make_tokens, states
from test_faults import Pilot, run_cli, token_docs

CI_SEEDS = [101, 202, 303, 404]


def _seeds():
    chosen = os.environ.get("PICAS_FAULT_SCHEDULE_SEEDS")
    seeds = [int(s) for s in chosen.split(",") if s.strip()] if chosen else list(CI_SEEDS)
    soak = int(os.environ.get("PICAS_FAULT_SOAK") or 0)
    return [(s, 1) for s in seeds] + [(random.randrange(10 ** 6), 3) for _ in range(soak)]


TASK = r'''
import json, os, sys, time
token = json.load(open(os.environ["PICAS_TOKEN_FILE"]))
folder = sys.argv[1]
kind, _, seconds = sys.argv[2].rpartition(":")
with open(os.path.join(folder, "starts"), "a") as fh:
    fh.write("%s %d %d\n" % (token["_id"], os.getpid(), os.getppid()))
    fh.flush()
    os.fsync(fh.fileno())
runs = sum(1 for line in open(os.path.join(folder, "starts")) if line.split()[0] == token["_id"])
time.sleep(float(seconds))
# fail: a real failure; retry2: "try again later" (75) on its first two starts; slow: runs
# past --max-token-time and is killed; anything else succeeds.
code = {"fail": 1, "retry2": 75 if runs <= 2 else 0}.get(kind, 0)
with open(os.path.join(folder, "completions"), "a") as fh:
    fh.write("%s %s %d %.3f %d\n" % (token["_id"], token["claim_id"], os.getppid(),
                                     time.time(), code))
os._exit(code)     # the work is done: no interpreter shutdown between it and the exit
'''

#: Seconds a task may run (--max-token-time); "slow" tokens sleep longer.
MAX_TOKEN_TIME = 5.0


class Schedule(object):
    """The proxy's action: a decision per request from the seed, and degraded windows."""

    def __init__(self, seed, duration):
        self.rng = random.Random(seed * 7919 + 1)
        self.lock = threading.Lock()
        self.start = None
        self.calm = False
        plan = random.Random(seed * 31 + 7)
        self.degraded = []
        for _ in range(max(1, int(duration // 8))):
            at = plan.uniform(1.0, duration - 2.0)
            self.degraded.append((at, at + plan.uniform(1.0, 3.0)))
        self.counts = collections.Counter()

    def _in_degraded(self):
        now = time.monotonic() - (self.start or time.monotonic())
        return any(a <= now < b for a, b in self.degraded)

    def __call__(self, fs, request):
        with self.lock:
            roll = self.rng.random()
            delay = self.rng.uniform(0.1, 1.0)
        if self.calm:
            return ("proxy",)
        write = request.method in ("PUT", "POST", "DELETE")
        if write and self._in_degraded():
            self.counts["degraded-202"] += 1
            return self._accepted(fs, request)
        for limit, name in ((0.04, "drop"), (0.08, "proxy_then_drop"), (0.14, "sleep"),
                            (0.18, "503"), (0.22, "202")):
            if roll < limit:
                break
        else:
            return ("proxy",)
        self.counts[name] += 1
        if name == "sleep":
            return ("sleep", delay, ("proxy",))
        if name == "503":
            return ("json", 503, {"error": "service_unavailable", "reason": "injected"})
        if name == "202":
            return self._accepted(fs, request) if write else ("proxy",)
        return (name,)

    @staticmethod
    def _accepted(fs, request):
        status, headers, body = fs.forward(request)
        if status == 201:
            return ("raw", 202, body, dict(headers, **{"Content-Type": "application/json"}))
        return ("raw", status, body, headers)


def _children(pid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def _processes_mentioning(text):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as fh:
                    if text.encode() in fh.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


@pytest.mark.faults
@pytest.mark.parametrize("seed,scale", _seeds())
def test_a_random_fault_schedule_loses_nothing_and_runs_nothing_twice(couch, db, tmp_path,
                                                                       seed, scale):
    ensure_views(db)
    db.ensure_design(picas.CONFLICTS_DESIGN, picas.CONFLICTS_VIEWS)
    rng = random.Random(seed)
    duration = 12.0 * scale
    n = 30 * scale
    # Most tokens succeed; some fail for real (--max-scrub 1: two failed runs, then
    # error), some answer "try again later" twice (75: back to todo, never charged),
    # some always outlast --max-token-time (killed: 124, then error).
    kinds = ["ok"] * (n - 7 * scale) + ["fail", "retry2"] * (3 * scale) + ["slow"] * scale
    rng.shuffle(kinds)
    inputs = ["%s:%.2f" % (k, 12.0 if k == "slow" else rng.uniform(0.1, 1.2)) for k in kinds]
    ids = make_tokens(db, inputs)
    kind_of = dict(zip(ids, kinds))
    task = tmp_path / "task.py"
    task.write_text(TASK)
    schedule = Schedule(seed, duration)
    events = sorted((rng.uniform(0.5, duration), rng.choice(
        ["term-both", "usr1-both", "term-pilot", "kill", "kill"])) for _ in range(int(6 * scale)))
    fs = FaultServer(upstream=couch.url, default=schedule).start()
    pilots, killed, stopped = [], set(), []
    signalled = collections.defaultdict(list)      # pilot pid -> when it (or its task) got one
    argv = ["--timeout", "5", "run", "--heartbeat", "1", "--grace", "1", "--max-scrub", "1",
            "--max-token-time", str(MAX_TOKEN_TIME), "--black-hole", "0", "--",
            sys.executable, str(task), str(tmp_path)]
    done_message = "seed %d (replay: PICAS_FAULT_SCHEDULE_SEEDS=%d)" % (seed, seed)
    try:
        schedule.start = start = time.monotonic()
        slots = 3
        while time.monotonic() - start < duration:
            live = [p for p in pilots if p.proc.poll() is None]
            for _ in range(slots - len(live)):
                pilots.append(Pilot(couch, db, argv, url=fs.url, cwd=tmp_path))
            now = time.monotonic() - start
            while events and events[0][0] <= now:
                _, kind = events.pop(0)
                live = [p for p in pilots if p.proc.poll() is None]
                if not live:
                    continue
                victim = rng.choice(live)
                signalled[victim.pid].append(time.time())
                if kind == "kill":
                    killed.add(victim.pid)
                    victim.proc.kill()
                    continue
                signum = signal.SIGUSR1 if kind.startswith("usr1") else signal.SIGTERM
                stopped.append((victim.pid, kind))
                if kind.endswith("both"):
                    for child in _children(victim.pid):
                        try:
                            with open("/proc/%d/cmdline" % child, "rb") as fh:
                                if b"task.py" in fh.read():
                                    os.kill(child, signum)
                        except OSError:
                            pass                      # it ended meanwhile
                    time.sleep(rng.choice([0.0, 0.01, 0.2]))
                victim.send(signum)
            time.sleep(0.05)
        # The faults end; the batch system starts no more pilots; the live ones drain the view.
        schedule.calm = True
        for pilot in pilots:
            try:
                pilot.wait(120)
            except Exception:
                pilot.kill()
                raise AssertionError("%s: a pilot did not finish: %s" % (done_message, pilot.err))
    finally:
        fs.stop()
    # A pilot signalled while Python is still starting dies of the signal itself (-N):
    # it had not installed its handlers, so it had claimed nothing either.
    errors = [(p.pid, p.proc.returncode, p.err[-3000:]) for p in pilots
              if "Traceback" in p.err or p.proc.returncode not in
              (0, 3, 128 + signal.SIGTERM, 128 + signal.SIGUSR1, -signal.SIGKILL,
               -signal.SIGTERM, -signal.SIGUSR1)]
    assert not errors, (done_message, errors)

    # The operator's clean-up: replay the journal, free dead pilots' tokens, run what is left.
    code, out, err = run_cli(couch, db, ["replay"], cwd=tmp_path)
    assert code == 0 or "is not a folder" in err, (done_message, out, err)
    time.sleep(2.5)
    code, out, err = run_cli(couch, db, ["reset", "locked", "--stale", "--lease", "2", "--yes"])
    assert code == 0, (done_message, err)
    # A pilot does not take again a token it got 75 for: the batch system starts more.
    for _ in range(4):
        code, out, err = run_cli(couch, db, argv[2:], cwd=tmp_path)
        assert code in (0, 3) and "Traceback" not in err, (done_message, err)
        if code == 3:
            break

    docs = token_docs(db)
    expected = {"ok": "done", "retry2": "done", "fail": "error", "slow": "error"}
    bad = dict((t, (kind_of[t], picas.token_state(d))) for t, d in docs.items()
               if picas.token_state(d) != expected[kind_of[t]])
    assert not bad, (done_message, bad, schedule.counts)
    completions = collections.defaultdict(list)
    with open(str(tmp_path / "completions")) as fh:
        for line in fh:
            tid, claim, pilot_pid, at, code = line.split()
            completions[tid].append((claim, int(pilot_pid), float(at), int(code)))
    for tid in ids:
        doc, kind = docs[tid], kind_of[tid]
        # A retry code is never charged: only a dead pilot's token (reset --stale) is.
        lost = doc.get("lost_pilots", 0)
        if kind in ("ok", "retry2"):
            assert doc["scrub_count"] == lost, (done_message, tid, doc)
        if kind == "retry2":
            told = sum(1 for run in completions[tid] if run[3] == 75)
            assert 0 <= doc.get("retries", 0) <= told <= 2, \
                (done_message, tid, completions[tid], doc)
        if kind == "fail":
            assert doc["exit_code"] == 1 and doc["scrub_count"] >= 1, (done_message, doc)
        if kind == "slow":
            assert doc["exit_code"] == 124 and doc["timeouts"] >= 1, (done_message, doc)
            assert completions[tid] == [], (done_message, tid, completions[tid])
            continue
        runs = [run[:3] for run in completions[tid]]
        stored = doc.get("claim_id")
        assert stored in [run[0] for run in runs], (done_message, tid, runs, doc)
        if kind != "ok":
            continue         # failed and retried runs are meant to run again
        # A run whose result was not kept is allowed only where no pilot can know the work
        # was done: its pilot was SIGKILLed, or it (or its task) got a signal in the instant
        # between the task's last write and its exit being seen.
        extra = [(pid, at) for claim, pid, at in runs if claim != stored and not (
            pid in killed or any(at - 0.05 <= t <= at + 0.25 for t in signalled[pid]))]
        involved = [p for p in pilots if p.pid in [run[1] for run in runs]]
        assert not extra, (
            done_message, "token %s ran to completion more than once" % tid, runs, killed,
            stopped, docs[tid], ["pilot %d (exit %s):\n%s" % (
                p.pid, p.proc.returncode, "".join(l for l in p.err.splitlines(True)
                                                  if tid in l or "signal" in l or "202" in l))
                for p in involved])
    assert picas.conflicted_tokens(db) == [], done_message      # no split left unrepaired
    journal = tmp_path / "picas-journal"
    assert not journal.exists() or not [n for n in os.listdir(str(journal))
                                        if n.endswith(".json")], done_message
    time.sleep(0.5)
    assert _processes_mentioning(str(task)) == [], done_message
    print("%s: faults %s, %d stops, %d kills, %d pilots" % (
        done_message, dict(schedule.counts), len(stopped), len(killed), len(pilots)))
