"""The result path: nothing lost, nothing run twice, nothing stuck (issue 12's table, row by row).

Each test is one way a grid loses or double-runs work, as users and reviewers
met it: a stop signal that reaches the task and the pilot together, a
degraded cluster, a result save that waited for the next claim, a conflict
followed by an outage, values JSON cannot hold, user code that saves the
token while heartbeats run, credentials in task environments, a local copy
nobody reads back, a slow heartbeat during a stop, long non-ASCII ids. Every
test failed on the code before the result journal and the unsure-lock design
(see the README's guarantees); they run against the real test server, with
tests/faultserver.py in between where a fault is needed.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import picas
from helpers import ROOT, ensure_views, make_tokens, states, wait_for
from test_faults import Pilot, proxy, run_cli, script, token_docs, write_kind  # noqa: F401


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


@pytest.fixture(autouse=True)
def _no_pilot_left():
    yield
    while Pilot.started:
        Pilot.started.pop().kill()


def journal_entries(folder, name="picas-journal"):
    """The entries waiting in the journal ``folder/name`` (``name`` None: ``folder`` itself)."""
    journal = os.path.join(str(folder), name) if name else str(folder)
    return sorted(os.path.join(journal, n) for n in os.listdir(journal)
                  if n.endswith(".json")) if os.path.isdir(journal) else []


class Recorder(picas.RunActor):
    """A Python-API pilot whose process_task is a function of (actor, token)."""

    def __init__(self, db, work, **kwargs):
        picas.RunActor.__init__(self, db, **kwargs)
        self.work = work
        self.ran = []

    def process_task(self, token):
        self.ran.append(token["_id"])
        self.work(self, token)


# 1. A stop signal that reaches the task and the pilot at (almost) the same instant --------

@pytest.mark.faults
@pytest.mark.parametrize("gap", [0.0, 0.05, 0.3])
def test_a_task_killed_by_the_same_stop_signal_goes_back_to_todo(couch, tdb, tmp_path, gap):
    """SLURM at the time limit signals every process of the job: the task may die of the
    SIGTERM before the pilot's own copy arrives. That is the stop's doing, not a result."""
    make_tokens(tdb, ["a"])
    pidfile = tmp_path / "task.pid"
    task = script(tmp_path / "task.sh", 'echo $$ > %s\nexec sleep 30\n' % pidfile)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", task], cwd=tmp_path)
    assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30), pilot.err
    task_pid = int(pidfile.read_text())
    os.kill(task_pid, signal.SIGTERM)          # the task first...
    time.sleep(gap)
    pilot.send(signal.SIGTERM)                 # ...then the pilot
    assert pilot.wait(30) == 128 + signal.SIGTERM, pilot.err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo", (doc, pilot.err)
    assert doc["scrub_count"] == 0 and "Traceback" not in pilot.err


def test_a_task_that_exits_143_without_a_stop_is_a_result(couch, tdb, tmp_path):
    """The rule is about the pilot's own stop: a task that fails with 143 by itself is an error."""
    make_tokens(tdb, ["a"])
    code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                                          "kill -TERM $$"], cwd=tmp_path)
    assert code == 0, err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["exit_code"] == 143


# 2. A degraded cluster: every write answered 202 -----------------------------------------

class Degraded(object):
    """A proxy action: while ``on``, every write that the server answers 201 is answered 202,
    as a CouchDB cluster missing two of its three nodes does (the write reached one copy)."""

    def __init__(self):
        self.on = True
        self.lock_writes = []

    def __call__(self, fs, request):
        status, headers, body = fs.forward(request)
        if request.method in ("PUT", "POST") and self.on and status == 201:
            if "/_local/" not in request.path and "lock" in (write_kind(request, {}) or ""):
                self.lock_writes.append(request)
            return ("raw", 202, body, dict(headers, **{"Content-Type": "application/json"}))
        return ("raw", status, body, headers)


@pytest.mark.faults
def test_a_degraded_cluster_gets_one_unsure_lock_and_the_pilot_waits_then_runs_it(
        couch, tdb, proxy, tmp_path):
    ids = make_tokens(tdb, ["a", "b", "c", "d", "e"])
    runs = tmp_path / "runs"
    degraded = Degraded()
    fs = proxy(default=degraded)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                               'echo "$2" >> %s' % runs, "sh"], url=fs.url, cwd=tmp_path)
    time.sleep(3.0)                                       # the outage goes on
    locked = [t for t, s in states(tdb).items() if s == "locked"]
    assert len(locked) <= 1 and len(degraded.lock_writes) <= 1, (locked, pilot.err)
    assert not runs.exists()                              # nothing ran on a 202
    assert "202" in pilot.err
    degraded.on = False                                   # the nodes are back
    assert pilot.wait(60) == 0, pilot.err
    ran = runs.read_text().split()
    assert sorted(ran) == sorted(ids)                     # each exactly once
    assert set(states(tdb).values()) == {"done"}
    assert "Traceback" not in pilot.err


def test_status_shows_a_token_a_pilot_holds_an_unsure_lock_on(couch, tdb, proxy, monkeypatch,
                                                              capsys):
    make_tokens(tdb, ["a"])
    degraded = Degraded()
    fs = proxy(default=degraded)
    proxy_db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    it = picas.TaskViewIterator(proxy_db, "todo")
    with pytest.raises(picas.Degraded):
        next(it)
    for name, value in (("PICAS_HOST_URL", couch.url), ("PICAS_DATABASE", tdb.name),
                        ("PICAS_USERNAME", couch.username), ("PICAS_PASSWORD", couch.password)):
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    notes = tdb.pilot_notes()
    if not notes:
        pytest.skip("this server does not list local documents (_local_docs)")
    assert picas.main(["status"]) == 0
    assert "UNCERTAIN 1 (t-1" in capsys.readouterr().out
    degraded.on = False
    assert next(it)["_id"] == "t-1"                       # settled: it was ours
    assert picas.main(["status"]) == 0
    assert "UNCERTAIN" not in capsys.readouterr().out


# 3. Saving never depends on claiming ------------------------------------------------------

def test_a_long_task_makes_about_one_request_per_token(couch, tdb, proxy, monkeypatch):
    """A window older than window_age is not re-read before the save: the next lock rides
    along with the candidate in memory (a stale one only costs a conflict, never the result)."""
    monkeypatch.setattr(picas._Claimer, "window_age", 0.2)
    make_tokens(tdb, ["a", "b", "c", "d", "e", "f"])
    fs = proxy()
    proxy_db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    actor = picas.CommandActor(proxy_db, ["sh", "-c", "sleep 0.4", "sh"], heartbeat=0)
    actor.run()
    assert actor.tasks_processed == 6 and set(states(tdb).values()) == {"done"}
    token_requests = [r for r in fs.requests if "/_local/" not in r.path]
    assert len(token_requests) <= 1.4 * 6 + 2, [(r.method, r.path) for r in token_requests]


def test_a_view_answering_404_after_the_claim_does_not_touch_the_result(couch, tdb, proxy,
                                                                        tmp_path):
    make_tokens(tdb, ["a", "b"])
    reads = []

    def view_gone_after_first_read(fs, request):
        if "/_view/" in request.path:
            reads.append(request)
            if len(reads) > 1:
                return ("json", 404, {"error": "not_found", "reason": "missing"})
        return ("proxy",)
    fs = proxy(default=view_gone_after_first_read)
    proxy_db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    actor = picas.CommandActor(proxy_db, ["true"], heartbeat=0, view="todo",
                               journal=str(tmp_path / "j"))
    claimer = actor.iterator._claimer
    claimer.window = claimer.first_window = 1               # one candidate per read
    with pytest.raises(picas.NotFound):
        actor.run()
    done = [t for t, s in states(tdb).items() if s == "done"]
    assert len(done) == 1 and not journal_entries(tmp_path / "j")
    assert sorted(states(tdb).values()) == ["done", "todo"]


@pytest.mark.faults
def test_a_hanging_view_read_and_sigkill_after_a_task_lose_nothing(couch, tdb, proxy, tmp_path):
    """The task finished, the pilot is reading the view for the next claim, the server hangs
    there; SIGTERM, then SIGKILL: the result is in the database or in the journal."""
    make_tokens(tdb, ["a", "b"])
    finished = tmp_path / "finished"
    reads = []

    def hang_second_view_read(fs, request):
        if "/_view/" in request.path and "limit=0" not in request.path:
            reads.append(request)
            if len(reads) > 1:
                return ("sleep", 60, ("proxy",))
        return ("proxy",)
    fs = proxy(default=hang_second_view_read)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                               'echo "$2" >> %s' % finished, "sh"], url=fs.url, cwd=tmp_path)
    assert wait_for(lambda: len(reads) > 1, 30), pilot.err
    pilot.send(signal.SIGTERM)
    time.sleep(1.0)
    pilot.kill()
    ran = finished.read_text().split()
    assert ran
    if any(picas.token_state(tdb.get(t)) != "done" for t in ran):
        assert journal_entries(tmp_path)
        code, out, err = run_cli(couch, tdb, ["replay"], cwd=tmp_path)
        assert code == 0, err
    assert all(picas.token_state(tdb.get(t)) == "done" for t in ran)
    assert not journal_entries(tmp_path)


# 4. A result write meets a 409, then the server goes away -------------------------------

def test_a_conflict_then_an_outage_keeps_the_result_in_the_journal(couch, tdb, proxy,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(picas, "RESULT_SAVE_PATIENCE", 0.5)
    monkeypatch.setattr(picas, "RESULT_RETRY_PAUSE", (0.05, 0.1))
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.01)
    make_tokens(tdb, ["a"])
    seen = {"conflict": False}

    def conflict_then_gone(fs, request):
        kind = write_kind(request, {})
        if kind and "result" in kind and not seen["conflict"]:
            seen["conflict"] = True
            return ("json", 409, {"error": "conflict", "reason": "Document update conflict."})
        if seen["conflict"]:
            return ("drop",)
        return ("proxy",)
    fs = proxy(default=conflict_then_gone)
    proxy_db = picas.Server(fs.url, couch.username, couch.password, retries=1).database(tdb.name)
    journal = tmp_path / "journal"
    actor = Recorder(proxy_db, lambda actor, token: token.update(output="precious"),
                     heartbeat=0, journal=str(journal))
    actor.run(max_tasks=1)                               # no exception escapes
    assert seen["conflict"] and states(tdb)["t-1"] == "locked"
    entries = journal_entries(journal, None)
    assert len(entries) == 1
    counts = picas.replay_journal(tdb, picas.Journal(str(journal)))
    assert counts["saved"] == 1
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["output"] == "precious"
    assert not os.path.exists(entries[0])


# 5. Values that cannot be stored ----------------------------------------------------------

def test_push_refuses_a_lone_surrogate_nan_naming_the_token(couch, tdb, tmp_path):
    path = tmp_path / "tokens.jsonl"
    path.write_text('{"input": "fine"}\n{"input": "x\\ud83d"}\n{"input": NaN}\n',
                    encoding="utf-8")
    code, out, err = run_cli(couch, tdb, ["push", "--json", str(path), "--id-prefix", "p"])
    assert code == 1 and "Traceback" not in err, err
    assert "created 1 tokens" in out and "2 FAILED" in out
    assert "token 2 (id p-2)" in err and "lone surrogate U+D83D" in err
    assert "token 3 (id p-3)" in err and "nan" in err
    assert sorted(token_docs(tdb)) == ["p-1"]


def _plant_raw(couch, db, doc_id, raw_json):
    """Store a document as raw JSON text; return False when the server refuses it."""
    server = couch.server()
    try:
        server.request("PUT", "/%s/%s" % (db.name, doc_id), body=raw_json.encode("ascii"),
                       headers={"Content-Type": "application/json"})
        return True
    except picas.BadRequest:
        return False


@pytest.mark.faults
def test_a_stored_token_with_a_lone_surrogate_goes_to_error_and_the_pilot_goes_on(
        couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b", "c"])
    if not _plant_raw(couch, tdb, "bad", '{"type":"token","lock":0,"done":0,'
                      '"input":"x\\ud83d","scrub_count":0,"exit_code":"","error":[]}'):
        pytest.skip("this server refuses lone surrogates itself (CouchDB does: 400)")
    runs = tmp_path / "runs"
    for _ in range(3):
        code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                                              'echo "$2" >> %s' % runs, "sh"], cwd=tmp_path)
        assert code == 0 and "Traceback" not in err, err
        assert "lone surrogate" in err
        assert sorted(runs.read_text().split()) == ["t-1", "t-2", "t-3"]
        docs = token_docs(tdb)
        assert picas.token_state(docs["bad"]) == "error"
        assert "lone surrogate" in docs["bad"]["error"][-1]["message"]
        assert all(picas.token_state(docs[t]) == "done" for t in ("t-1", "t-2", "t-3"))
        for doc_id in ("t-1", "t-2", "t-3", "bad"):     # again, in another order
            doc = tdb.get(doc_id)
            tdb.save(picas.scrub_token(doc))
        runs.unlink()


# 6. The claimed snapshot is deep ----------------------------------------------------------

def test_an_error_after_another_writer_touched_the_token_keeps_every_change(tdb):
    picas.push_tokens(tdb, tokens=[{"input": "a", "output": {"n": 0}}], id_prefix="t")

    def work(actor, token):
        token["output"]["n"] = 1                     # changed in place
        other = tdb.get(token["_id"])
        other["note"] = "from another writer"
        tdb.save(other)
        raise ValueError("boom")
    actor = Recorder(tdb, work, heartbeat=0)
    actor.run()
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error"
    assert doc["output"] == {"n": 1} and doc["note"] == "from another writer"
    assert any("ValueError" in e["message"] for e in doc["error"])


# 7. User code saving the token while heartbeats run ---------------------------------------

def test_user_saves_never_conflict_with_heartbeats(tdb):
    make_tokens(tdb, ["a"])
    failures = []

    def work(actor, token):
        for i in range(300):
            token["step"] = i
            try:
                actor.db.save(token)
            except picas.Conflict as exc:
                failures.append((i, exc))
                return
    actor = Recorder(tdb, work, heartbeat=0.002)
    actor.run()
    assert failures == []
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["step"] == 299


# 8. Credentials out of every task environment, by name -----------------------------------

def test_execute_and_old_api_tasks_never_see_the_password(monkeypatch):
    monkeypatch.setenv("PICAS_PASSWORD", "sekrit-e")
    monkeypatch.setenv("PICAS_HOST_URL", "https://me:sekrit-e@couch.example.org/")
    monkeypatch.setenv("KEEP_ME", "value")
    _, code, out, _ = picas.execute(["env"])
    assert code == 0
    env = out.decode()
    assert "sekrit" not in env and "KEEP_ME=value" in env
    assert "PICAS_HOST_URL=https://couch.example.org/" in env
    code = picas.execute_old("env > /dev/null; test -z \"$PICAS_PASSWORD\"")
    assert code == 0


def test_the_cli_pilot_removes_credentials_by_name_not_by_value(couch, tdb, tmp_path):
    """A variable whose value happens to contain the password (here PATH) is kept."""
    make_tokens(tdb, ["a"])
    out_file = tmp_path / "env"
    bindir = tmp_path / ("bin-%s" % couch.password)
    bindir.mkdir()
    path = "%s:%s" % (bindir, os.environ["PATH"])
    code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                                          "env > %s" % out_file], cwd=tmp_path,
                             env={"PATH": path, "TERM": "xterm"})
    assert code == 0, err
    env = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line)
    assert "PICAS_PASSWORD" not in env
    assert env.get("PATH") == path and env.get("TERM") == "xterm"


# 9. The journal: read back, documented, shipped, never raising ----------------------------

def test_an_unwritable_journal_never_stops_a_result(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    (tmp_path / "picas-journal").write_text("a file where the folder should be")
    code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "true"],
                             cwd=tmp_path)
    assert code == 0 and "Traceback" not in err, err
    assert "could not keep the result in the journal" in err
    assert states(tdb)["t-1"] == "done"


def test_the_journal_is_documented_and_shipped_by_every_recipe():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert "picas-journal" in readme and "picas.py replay" in readme
    for name in ("grid-sandbox/grid-example.jdl", "examples/slurm_example.sh",
                 "examples/htcondor_example.sub"):
        with open(os.path.join(ROOT, name)) as fh:
            assert "picas-journal" in fh.read(), name


def test_a_pilot_replays_earlier_pilots_entries_before_it_claims(couch, tdb, tmp_path):
    """A pilot killed after its task finished left the result in the journal only."""
    make_tokens(tdb, ["a", "b"])
    db = tdb
    claimer = picas._Claimer(db, "todo")
    token = claimer.claim()
    run = picas._TokenRun(db, token, 0)
    run.lease.stop()
    token["done"], token["exit_code"], token["output"] = picas._now(), 0, "from the dead pilot"
    journal = picas.Journal(str(tmp_path / "picas-journal"))
    assert journal.write(token, run.claimed, db, claimer.pilot_id)
    runs = tmp_path / "runs"
    code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                                          'echo "$2" >> %s' % runs, "sh"], cwd=tmp_path)
    assert code == 0, err
    assert runs.read_text().split() == [t for t in ("t-1", "t-2") if t != token["_id"]]
    assert tdb.get(token["_id"])["output"] == "from the dead pilot"
    assert set(states(tdb).values()) == {"done"} and not journal_entries(tmp_path)


def test_replay_never_overwrites_a_newer_result(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    claimer = picas._Claimer(tdb, "todo")
    token = claimer.claim()
    run = picas._TokenRun(tdb, token, 0)
    run.lease.stop()
    stale = dict(token, done=picas._now(), exit_code=3)
    journal = picas.Journal(str(tmp_path / "j"))
    journal.write(stale, run.claimed, tdb, claimer.pilot_id)
    # Meanwhile: reset, and run to completion by another pilot.
    doc = tdb.get("t-1")
    tdb.save(picas.scrub_token(doc))
    picas.CommandActor(tdb, ["true"], heartbeat=0, journal=str(tmp_path / "other")).run()
    newer = tdb.get("t-1")
    code, out, err = run_cli(couch, tdb, ["replay", str(tmp_path / "j")])
    assert code == 0, err
    assert "1 kept in the error list" in out
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["claim_id"] == newer["claim_id"]
    assert doc["error"][-1]["result"]["exit_code"] == 3
    assert not journal_entries(tmp_path / "j", None)


# 10. A slow heartbeat answer when SIGTERM arrives -----------------------------------------

@pytest.mark.faults
def test_a_stop_during_a_hanging_heartbeat_exits_within_grace_and_budget(couch, tdb, proxy,
                                                                          tmp_path):
    make_tokens(tdb, ["a"])
    revs = {}
    hung = threading.Event()

    def hang_heartbeats(fs, request):
        if write_kind(request, revs) == "heartbeat":
            hung.set()
            return ("sleep", 60, ("proxy",))
        return ("proxy",)
    fs = proxy(default=hang_heartbeats)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0.5", "--grace", "2", "--", "sh", "-c",
                               "sleep 60", "sh"], url=fs.url, cwd=tmp_path)
    assert hung.wait(30), pilot.err
    started = time.monotonic()
    pilot.send(signal.SIGTERM)
    assert pilot.wait(60) == 128 + signal.SIGTERM, pilot.err
    took = time.monotonic() - started
    assert took < 2 + picas.STOP_BUDGET + 3, (took, pilot.err)
    assert "Traceback" not in pilot.err


# 11. A non-JSON value put into the token by user code -------------------------------------

def test_bytes_in_a_result_put_the_token_in_error_and_the_pilot_goes_on(tdb, tmp_path):
    make_tokens(tdb, ["a", "b"])

    def work(actor, token):
        token["output"] = b"raw bytes from execute()"
        token["ratio"] = float("nan")
    actor = Recorder(tdb, work, heartbeat=0, journal=str(tmp_path / "j"))
    actor.run()
    assert actor.tasks_processed == 2
    for tid in ("t-1", "t-2"):
        doc = tdb.get(tid)
        assert picas.token_state(doc) == "error"
        assert doc["output"] == "raw bytes from execute()" and doc["ratio"] == "nan"
        assert "output holds bytes" in doc["error"][-1]["message"]
    assert not os.path.isdir(str(tmp_path / "j"))      # emptied and tidied away


# 12. Long non-ASCII ids --------------------------------------------------------------------

def test_a_45_character_greek_token_id_runs(couch, tdb, tmp_path):
    tid = "αβγδεζηθικ" * 4 + "λμνξο"
    assert len(tid) == 45
    picas.push_tokens(tdb, tokens=[{"_id": tid, "input": "x"}])
    code, out, err = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", "sh", "-c",
                                          'echo "out $2"', "sh"], cwd=tmp_path)
    assert code == 0 and "Traceback" not in err, err
    doc = tdb.get(tid)
    assert picas.token_state(doc) == "done"
    assert tdb.get_attachment(tid, "logs_%s.out" % tid) == ("out %s\n" % tid).encode("utf-8")


# Also: a lone lock whose answer was lost, then an outage; outages of endless pilots; the re-exec

def test_a_lost_lock_answer_followed_by_an_outage_is_settled_later(couch, tdb, proxy,
                                                                   monkeypatch):
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.01)
    make_tokens(tdb, ["a"])
    mode = {"lost": False, "gone": False}

    def lose_then_vanish(fs, request):
        if mode["gone"]:
            return ("drop",)
        if write_kind(request, {}) == "lock" and not mode["lost"]:
            mode["lost"] = mode["gone"] = True
            return ("proxy_then_drop",)
        return ("proxy",)
    fs = proxy(default=lose_then_vanish)
    proxy_db = picas.Server(fs.url, couch.username, couch.password, retries=1).database(tdb.name)
    it = picas.TaskViewIterator(proxy_db, "todo")
    with pytest.raises(picas.ServerUnreachable):
        next(it)
    assert states(tdb)["t-1"] == "locked"            # the lock landed; nobody heard
    mode["gone"] = False
    token = next(it)
    assert token["_id"] == "t-1" and it.stats.claims == 1


def test_an_endless_iterator_waits_through_an_outage(couch, tdb, proxy, monkeypatch):
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.01)
    make_tokens(tdb, ["a"])
    fs = proxy()
    proxy_db = picas.Server(fs.url, couch.username, couch.password, retries=1).database(tdb.name)
    it = picas.EndlessViewIterator(picas.TaskViewIterator(proxy_db, "todo"), sleep_sec=0.2,
                                   max_sleep_sec=0.5)
    threading.Thread(target=fs.outage, args=(2.0,)).start()
    time.sleep(0.1)
    token = next(it)
    assert token["_id"] == "t-1"


def test_the_script_reexec_keeps_interpreter_options(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    out_file = tmp_path / "cmdline"
    env = couch.env(tdb.name)
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.run(
        [sys.executable, "-u", "-X", "utf8", "-W", "ignore::DeprecationWarning",
         os.path.join(ROOT, "picas.py"), "run", "--heartbeat", "0", "--", "sh", "-c",
         "tr '\\0' ' ' < /proc/$PPID/cmdline > %s" % out_file],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmdline = out_file.read_text()
    assert " -c " in cmdline                          # it did re-execute as a module
    for option in ("-u", "-X utf8", "-W ignore::DeprecationWarning"):
        assert " %s " % option in cmdline, cmdline


# Found by review: replay after reset --stale, a second stop signal, scrubbed results, priorities

def _journaled_then_killed(db, tmp_path, change):
    """A claim whose result ``change(token)`` made was journaled by a pilot that then died."""
    claimer = picas._Claimer(db, "todo")
    token = claimer.claim()
    run = picas._TokenRun(db, token, 0)
    run.lease.stop()
    change(token)
    journal = picas.Journal(str(tmp_path / "picas-journal"))
    assert journal.write(token, run.claimed, db, claimer.pilot_id)
    return token, journal


def test_replay_after_reset_stale_puts_the_result_in_the_done_view(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    token, journal = _journaled_then_killed(
        tdb, tmp_path, lambda t: t.update(done=picas._now(), exit_code=0, output="kept"))
    doc = tdb.get("t-1")
    tdb.save(picas.scrub_token(doc))                 # what `reset locked --stale` does
    assert picas.replay_journal(tdb, journal)["saved"] == 1
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["output"] == "kept"
    assert doc["claim_id"] == token["claim_id"] and doc["scrub_count"] == 1
    assert "t-1" in [r["id"] for r in tdb.view("Monitor/done")["rows"]]


def test_replay_of_a_scrubbed_result_by_a_killed_pilot_frees_the_token(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    token, journal = _journaled_then_killed(
        tdb, tmp_path, lambda t: picas.Task.scrub(t.update(done=picas._now(), exit_code=2) or t))
    assert "noclaim" not in os.listdir(journal.directory)[0]     # named after the claim
    assert picas.replay_journal(tdb, journal)["saved"] == 1
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and doc["scrub_count"] == 1
    assert picas.replay_journal(tdb, journal) == dict.fromkeys(
        ("saved", "already", "in_error_list", "left", "deleted"), 0)


def test_an_old_entry_is_not_applied_to_a_fresh_token_with_the_same_id(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    token, journal = _journaled_then_killed(
        tdb, tmp_path, lambda t: t.update(done=picas._now(), exit_code=0, output="old"))
    doc = tdb.get("t-1")
    tdb.delete(doc)
    make_tokens(tdb, ["a"])                          # pushed again: a new token, same id
    counts = picas.replay_journal(tdb, journal)
    assert counts["in_error_list"] == 1 and counts["saved"] == 0
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and "output" not in doc


@pytest.mark.faults
def test_a_second_stop_signal_while_the_task_is_stopped_still_gives_the_token_back(
        couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    started = tmp_path / "started"
    task = script(tmp_path / "task.sh", "trap '' TERM\ntouch %s\nwhile :; do sleep 0.1; done\n"
                  % started)
    grace = picas.STOP_BUDGET + 3
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--grace", str(grace), "--", task],
                  cwd=tmp_path)
    assert wait_for(started.exists, 30), pilot.err
    pilot.send(signal.SIGTERM)
    time.sleep(1.0)
    pilot.send(signal.SIGTERM)                       # the batch system insists
    assert pilot.wait(60) == 128 + signal.SIGTERM, pilot.err
    assert picas.token_state(tdb.get("t-1")) == "todo", pilot.err
    assert "Traceback" not in pilot.err


def test_a_prioritized_iterator_holds_at_most_one_unsure_lock(couch, tdb, proxy):
    tdb.ensure_design("High", picas.standard_views("doc.high == 1"))
    make_tokens(tdb, ["low"])
    degraded = Degraded()
    fs = proxy(default=degraded)
    proxy_db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    it = picas.PrioritizedViewIterator(proxy_db, "High/todo", "Monitor/todo")
    with pytest.raises(picas.Degraded):
        next(it)                                     # the low token's lock: 202
    picas.push_tokens(tdb, tokens=[{"input": "high", "high": 1}], id_prefix="h")
    with pytest.raises(picas.Degraded):
        next(it)                                     # settles first: no second lock
    assert [t for t, s in states(tdb).items() if s == "locked"] == ["t-1"]
    degraded.on = False
    assert next(it)["_id"] == "t-1" and next(it)["_id"] == "h-1"
