"""What code written for upstream picas relies on beyond its scripts (issue 16).

Database objects that offer only upstream's contract, the actor's overridable
steps and handlers, when ``stop_function`` is asked, ``add_job_id``, short-lived
clients that leave nothing open, and token numbering from ``doc_count()``.
Everything that touches a database runs against the real test server.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from unittest import mock

import pytest

import picas
from helpers import ROOT, ensure_views, make_tokens, run_pilot, states, view_ids


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


def client_for(couch, db):
    return picas.CouchDB(couch.url, db.name, couch.username, couch.password)


class ResourceConflict(Exception):
    """python-couchdb's conflict: not a picas.py class."""


class ContractOnly(object):
    """A user's own database wrapper over the real server, with nothing but upstream's
    contract (what upstream's MockDB offers): get_single_from_view, get, save, copy.

    ``draws`` (optional) fixes which documents get_single_from_view returns, in
    order, as fresh reads (upstream's client GETs the drawn row's document);
    ``stale`` maps ids to old copies returned instead, as a view row's
    document read before another pilot's lock. Conflicts are raised as
    python-couchdb raised them.
    """

    def __init__(self, couch, db, draws=None, stale=None):
        self.client = client_for(couch, db)
        self.draws = None if draws is None else list(draws)
        self.stale = dict(stale or {})
        self.saves = 0

    def get_single_from_view(self, view, window_size=1, design_doc="Monitor", **params):
        if self.draws is None:
            return self.client.get_single_from_view(view, window_size=window_size,
                                                    design_doc=design_doc, **params)
        if not self.draws:
            raise IndexError("empty")
        doc_id = self.draws.pop(0)
        return picas.Document(self.stale.pop(doc_id, None) or self.client.get(doc_id))

    def get(self, doc_id):
        return self.client.get(doc_id)

    def save(self, doc):
        self.saves += 1
        try:
            return self.client.save(doc)
        except picas.Conflict:
            raise ResourceConflict(("conflict", "Document update conflict."))

    def copy(self):
        return self


class Worker(picas.RunActor):
    def __init__(self, db, **kwargs):
        picas.RunActor.__init__(self, db, **kwargs)
        self.ran = []

    def process_task(self, task):
        self.ran.append(task["_id"])
        task["exit_code"] = 0


# -- a database with only upstream's contract ----------------------------------

def test_a_contract_only_database_drives_the_iterator_with_compare_and_set_locks(couch, tdb):
    ids = make_tokens(tdb, ["a", "b", "c"])
    contract = ContractOnly(couch, tdb)
    claimed = list(picas.TaskViewIterator(contract, "todo"))
    assert sorted(t["_id"] for t in claimed) == ids
    for token in claimed:
        stored = tdb.get(token["_id"])
        assert picas.token_state(stored) == "locked" and stored["_rev"] == token["_rev"]
        assert stored["claim_id"] == token["claim_id"] and stored["pilot_id"]
    assert len(set(t["claim_id"] for t in claimed)) == 3


def test_a_contract_claim_passes_over_a_token_already_locked(couch, tdb):
    make_tokens(tdb, ["a", "b"])
    other = picas.TaskViewIterator(tdb, "todo", pilot_id="other")
    first = other.claim_task()
    left = "t-2" if first["_id"] == "t-1" else "t-1"
    # The view row is older than the document: the fresh read shows the lock.
    contract = ContractOnly(couch, tdb, draws=[first["_id"], left])
    iterator = picas.TaskViewIterator(contract, "todo", pilot_id="mine")
    assert [t["_id"] for t in iterator] == [left]
    assert tdb.get(first["_id"])["claim_id"] == first["claim_id"]
    assert tdb.get(left)["pilot_id"] == "mine" and iterator.stats.skipped == 1


def test_a_contract_claim_that_meets_a_conflict_leaves_the_token_to_the_winner(couch, tdb):
    make_tokens(tdb, ["a"])
    before = tdb.get("t-1")                      # todo, as the view row saw it
    winner = picas.TaskViewIterator(tdb, "todo", pilot_id="winner").claim_task()
    contract = ContractOnly(couch, tdb, draws=["t-1"], stale={"t-1": before})
    iterator = picas.TaskViewIterator(contract, "todo", pilot_id="loser")
    assert list(iterator) == []
    assert contract.saves == 1 and iterator.stats.conflicts == 1
    stored = tdb.get("t-1")
    assert stored["pilot_id"] == "winner" and stored["claim_id"] == winner["claim_id"]


def test_racing_contract_pilots_never_claim_a_token_twice(couch, tdb):
    make_tokens(tdb, ["x%d" % i for i in range(40)])
    claims, errors = [], []

    def pilot():
        try:
            for token in picas.TaskViewIterator(ContractOnly(couch, tdb), "todo"):
                claims.append(token["_id"])
        except Exception as exc:           # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=pilot) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(claims) == 40 and len(set(claims)) == 40
    assert set(states(tdb).values()) == {"locked"}


def test_run_actor_over_a_contract_only_database_saves_every_result(couch, tdb, tmp_path):
    make_tokens(tdb, ["ok", "bad", "ok2"])

    class Codes(Worker):
        def process_task(self, task):
            Worker.process_task(self, task)
            task["exit_code"] = 3 if task["input"] == "bad" else 0

    actor = Codes(ContractOnly(couch, tdb), journal=str(tmp_path / "journal"))
    actor.run(max_scrub=1)
    assert sorted(actor.ran) == ["t-1", "t-2", "t-2", "t-3"]
    assert view_ids(tdb, "done") == ["t-1", "t-3"] and view_ids(tdb, "error") == ["t-2"]
    assert tdb.get("t-2")["scrub_count"] == 1
    assert not (tmp_path / "journal").exists()


# -- the actor's overridable steps and handlers ---------------------------------

def test_stop_function_is_asked_after_each_token_with_current_task_set(tdb):
    make_tokens(tdb, ["a", "b", "c", "d"])
    asked = []

    def stop(actor):
        asked.append((actor.tasks_processed, actor.current_task["_id"]))
        return actor.tasks_processed == 2

    actor = Worker(tdb)
    actor.run(stop_function=stop, actor=actor)
    assert asked == [(1, actor.ran[0]), (2, actor.ran[1])]
    assert actor.current_task["_id"] == actor.ran[1] and len(actor.ran) == 2


def test_run_calls_an_overridden_run_step_for_every_token(tdb):
    make_tokens(tdb, ["a", "b"])

    class Wrapped(Worker):
        steps = []

        def _run(self, task, timeout):
            self.steps.append((task["_id"], timeout))
            Worker._run(self, task, timeout)

    actor = Wrapped(tdb)
    actor.run(max_token_time=30)
    assert sorted(actor.steps) == [("t-1", 30), ("t-2", 30)]
    assert view_ids(tdb, "done") == ["t-1", "t-2"]


def test_run_step_called_on_its_own_stops_the_task_after_its_timeout(tdb):
    make_tokens(tdb, ["spin"])
    before = signal.getsignal(signal.SIGTERM)

    class Spinner(picas.RunActor):
        def process_task(self, task):
            while True:
                sum(range(1000))

    actor = Spinner(tdb)
    task = actor.iterator.claim_task()
    started = time.time()
    actor._run(task, timeout=0.5)
    assert time.time() - started < 5 and actor.tasks_processed == 1
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["exit_code"] == 124
    assert signal.getsignal(signal.SIGTERM) == before


def test_overridden_setup_handler_and_handler_are_what_a_signal_reaches(tdb):
    make_tokens(tdb, ["a"])
    before = signal.getsignal(signal.SIGTERM)

    class Handled(Worker):
        calls = []

        def setup_handler(self):
            self.calls.append("setup_handler")
            Worker.setup_handler(self)

        def handler(self, signum, frame):
            self.calls.append(signum)
            Worker.handler(self, signum, frame)

        def process_task(self, task):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)

    actor = Handled(tdb)
    with pytest.raises(SystemExit) as stopped:
        actor.run()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert actor.calls == ["setup_handler", signal.SIGTERM]
    assert picas.token_state(tdb.get("t-1")) == "todo"
    assert signal.getsignal(signal.SIGTERM) == before


def test_handler_called_when_no_pilot_runs_stops_and_gives_back_only_unfinished_work(tdb):
    make_tokens(tdb, ["a", "b"])
    cleaned = []

    class Script(Worker):
        def cleanup_env(self):
            cleaned.append(True)

    actor = Script(tdb)
    actor.run(max_tasks=1)                       # t-? is done, current_task still set
    finished = actor.current_task["_id"]
    with pytest.raises(SystemExit) as stopped:
        actor.handler(signal.SIGTERM, None)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert picas.token_state(tdb.get(finished)) == "done"      # never sent back

    iterator = picas.TaskViewIterator(tdb, "todo", pilot_id=actor.pilot_id)
    actor.current_task = iterator.claim_task()                   # locked, unfinished
    actor.subprocess = subprocess.Popen(["sleep", "30"])
    with pytest.raises(SystemExit):
        actor.handler(signal.SIGINT, None)
    assert actor.subprocess.poll() is not None
    assert picas.token_state(tdb.get(actor.current_task["_id"])) == "todo"
    assert cleaned == [True, True, True]


def test_patching_picas_actors_log_sees_what_the_actor_logs(tdb):
    make_tokens(tdb, ["a"])
    from picas import actors
    with mock.patch("picas.actors.log") as fake:
        Worker(tdb).run()
    fake.info.assert_any_call("Setting up signal handlers")
    assert actors.log is picas.log and picas.log.name == "picas"


# -- upstream's add_job_id -------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"DIRACJOBID": "d1", "SLURM_JOB_ID": "s1", "PBS_JOBID": "p1"}, {"dirac_job_id": "d1"}),
    ({"GLITE_WMS_JOBID": "https://wms/1", "CREAM_JOBID": "c1"}, {"wms_job_id": "https://wms/1"}),
    ({"GLITE_WMS_JOBID": "not-a-url", "SLURM_JOB_ID": "s1"}, {"wms_job_id": None}),
    ({"PBS_JOBID": "p1", "SLURM_JOB_ID": "s1"}, {"pbs_job_id": "p1"}),
    ({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "9"},
     {"slurm_job_id": "7_3"}),
    ({"SLURM_JOB_ID": "9"}, {"slurm_job_id": "9"}),
])
def test_add_job_id_records_the_first_id_in_upstreams_order(monkeypatch, env, expected):
    from picas.jobid import add_job_id
    for name in ("DIRACJOBID", "GLITE_WMS_JOBID", "CREAM_JOBID", "PBS_JOBID", "SLURM_JOB_ID",
                 "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "_CONDOR_JOB_AD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    doc = picas.Document({"_id": "t", "wms_job_id": "https://old"})
    add_job_id(doc)
    expected = dict({"_id": "t", "wms_job_id": "https://old"}, **expected)
    assert dict(doc) == expected


def test_http_errors_can_be_raised_without_arguments_as_python_couchdbs_were():
    with pytest.raises(picas.ResourceConflict) as raised:
        raise picas.ResourceConflict
    assert raised.value.status == 409 and "409" in str(raised.value)
    assert picas.NotFound("missing").status == 404 and "missing" in str(picas.NotFound("missing"))


# -- short-lived clients leave nothing open --------------------------------------

SHORT_SCRIPT = """\
import os, threading, time
import picas
from picas.clients import CouchDB
from picas.documents import Task
from picas.actors import RunActor
from picas.executers import execute

url, name = os.environ["PICAS_HOST_URL"], os.environ["PICAS_DATABASE"]
user, password = os.environ["PICAS_USERNAME"], os.environ["PICAS_PASSWORD"]
client = CouchDB(url=url, db=name, username=user, password=password)
first = client.doc_count()
client.save_documents([Task({"_id": "token_%d" % (first + i), "type": "token", "input": "x"})
                       for i in range(3)])
other = client.copy()                   # dropped without close()
other.get("token_%d" % first)
del other
with CouchDB(url=url, db=name, username=user, password=password) as scoped:
    scoped.get("token_%d" % first)
with picas.Server(url, user, password) as server:
    server.database(name).info()

def in_a_thread():                      # the thread's own connection, then it ends
    client.get("token_%d" % first)
    CouchDB(url=url, db=name, username=user, password=password).get("token_%d" % first)
thread = threading.Thread(target=in_a_thread)
thread.start()
thread.join()

class Pilot(RunActor):
    def process_task(self, task):
        proc, code, out, err = execute(["sh", "-c", "echo hi"])   # starts the watchdog
        time.sleep(0.3)                                          # a heartbeat or two
        task["exit_code"] = code

Pilot(client, heartbeat=0.1).run()
print("processed", client.doc_count())
"""


def test_short_lived_clients_leave_no_socket_or_subprocess_behind(couch, tdb, tmp_path):
    script = tmp_path / "short.py"
    script.write_text(SHORT_SCRIPT)
    env = couch.env(tdb.name)
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning",
                           str(script)], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "processed 4" in out               # _design/Monitor and three tokens
    assert "ResourceWarning" not in err and "still running" not in err, err
    assert view_ids(tdb, "done") == ["token_1", "token_2", "token_3"]


# -- numbering tokens from doc_count(), as upstream's push_tokens.py does --------

def push_tokens(client, lines):
    """Upstream's push_tokens.py: ids token_<doc_count() + i>, saved with save_documents."""
    i = client.doc_count()
    tokens = []
    for line in lines:
        tokens.append(picas.Task({"_id": "token_" + str(i), "type": "token", "input": line}))
        i += 1
    return [t["_id"] for t in tokens], client.save_documents(tokens)


def upstream_create_views(client):
    """Upstream's create_views.py: the standard views in _design/Monitor, nothing else."""
    for name, view in picas.standard_views().items():
        client.add_view(name, view["map"], view.get("reduce"))


def test_tokens_numbered_from_doc_count_match_upstreams_after_picas_views(couch, db):
    quick = ['echo "this is token A"', 'echo "this is token B"', 'echo "this is token C"']
    code, out, err = run_pilot(couch, db, ["views"])
    assert code == 0, err
    assert db.get("_design/Conflicts") is not None      # picas.py's own view is still made
    upstream_db = couch.server().create_database("picas-test-%s" % uuid.uuid4().hex[:12])
    try:
        upstream = picas.CouchDB(couch.url, upstream_db.name, couch.username, couch.password)
        upstream_create_views(upstream)
        ours = client_for(couch, db)
        for _ in range(2):                       # a second push continues the numbering
            expected, saved = push_tokens(upstream, quick)
            ids, saved_here = push_tokens(ours, quick)
            assert ids == expected and all(saved) and all(saved_here)
        assert ids == ["token_4", "token_5", "token_6"]
        assert view_ids(db, "todo") == ["token_%d" % i for i in range(1, 7)]
        assert ours.doc_count() == upstream.doc_count() == 7
        assert db.info()["doc_count"] == 8       # CouchDB's own count includes Conflicts
    finally:
        couch.server().delete_database(upstream_db.name)
