"""The token life cycle against the live server: claims, modifiers, the actor loop."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import picas
from helpers import (ROOT, alive, ensure_views, executions, make_tokens, read_pids,
                     run_pilot, start_pilot, states, view_ids, wait_for)


@pytest.fixture
def tdb(db):
    """A database with the standard views."""
    ensure_views(db)
    return db


class Recorder(picas.RunActor):
    """An actor that records what it ran and sets a chosen exit code."""

    def __init__(self, db, codes=None, work=None, **kwargs):
        picas.RunActor.__init__(self, db, **kwargs)
        self.ran = []
        self.codes = codes or {}
        self.work = work
        self.hooks = []

    def prepare_env(self):
        self.hooks.append("prepare_env")

    def prepare_run(self):
        self.hooks.append("prepare_run")

    def process_task(self, token):
        self.ran.append(token["_id"])
        if self.work:
            self.work(self, token)
        token["exit_code"] = self.codes.get(token["input"], 0)
        token["output"] = "result of %s" % token["input"]

    def cleanup_run(self):
        self.hooks.append("cleanup_run")

    def cleanup_env(self):
        self.hooks.append("cleanup_env")


# -- views and the token model -------------------------------------------------

def test_views_classify_tokens_like_token_state(tdb):
    docs = [
        dict(picas.TOKEN_DEFAULTS, _id="todo1"),
        dict(picas.TOKEN_DEFAULTS, _id="locked1", lock=5),
        dict(picas.TOKEN_DEFAULTS, _id="done1", lock=5, done=6, exit_code=0),
        dict(picas.TOKEN_DEFAULTS, _id="error1", lock=5, done=6, exit_code=3),
        dict(picas.TOKEN_DEFAULTS, _id="error2", lock=5, done=6, exit_code=""),
        dict(picas.TOKEN_DEFAULTS, _id="timeout", lock=5, done=6, exit_code=124),
        {"_id": "notatoken", "lock": 0, "done": 0},
    ]
    tdb.update(docs)
    for view in picas.STATES:
        expected = sorted(d["_id"] for d in docs if picas.token_state(d) == view)
        assert view_ids(tdb, view) == expected
    assert picas.count_states(tdb) == {"todo": 1, "locked": 1, "done": 1, "error": 3}


def test_task_methods_and_modifier_round_trip(tdb):
    make_tokens(tdb, ["a"])
    token = picas.Task(tdb.get("t-1"))
    mod = picas.BasicTokenModifier()
    mod.lock(token)
    tdb.save(token)
    assert view_ids(tdb, "locked") == ["t-1"]
    mod.close(token)
    token["exit_code"] = 0
    tdb.save(token)
    assert view_ids(tdb, "done") == ["t-1"]
    mod.scrub(token)                     # upstream's scrub left done set; ours resets it
    tdb.save(token)
    assert view_ids(tdb, "todo") == ["t-1"] and token["scrub_count"] == 1
    token.lock()
    token.error("it broke")
    tdb.save(token)
    assert view_ids(tdb, "error") == ["t-1"]
    stored = tdb.get("t-1")
    assert stored["error"][-1]["message"] == "it broke" and stored["exit_code"] == 1
    mod.unlock(token)
    mod.unclose(token)
    tdb.save(token)
    assert view_ids(tdb, "todo") == ["t-1"]


def test_new_task_is_visible_to_the_views(tdb):
    task = picas.Task({"input": "x"})
    tdb.save(task)
    assert task.id.startswith("task_") and view_ids(tdb, "todo") == [task.id]


def test_job_ids_from_batch_systems(tmp_path):
    ad = tmp_path / "job.ad"
    ad.write_text('ClusterId = 42\nProcId = 7\nOwner = "me"\n')
    env = {"SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "103",
           "DIRACJOBID": "55", "PBS_JOBID": "9.pbs", "_CONDOR_JOB_AD": str(ad)}
    assert picas.job_ids(env) == {"slurm_job_id": "100_3", "dirac_job_id": "55",
                                  "pbs_job_id": "9.pbs", "htcondor_job_id": "42.7"}
    assert picas.job_ids({"SLURM_JOB_ID": "103"}) == {"slurm_job_id": "103"}


# -- claiming ------------------------------------------------------------------

def test_claim_locks_with_pilot_and_claim_ids(tdb):
    make_tokens(tdb, ["a", "b"])
    it = picas.TaskViewIterator(tdb, "todo")
    token = next(it)
    stored = tdb.get(token["_id"])
    assert picas.token_state(stored) == "locked"
    assert stored["pilot_id"] == it.pilot_id and stored["claim_id"] == token["claim_id"]
    assert stored["_rev"] == token["_rev"]          # the rev from our own 201
    second = next(it)
    assert second["claim_id"] != token["claim_id"]
    with pytest.raises(StopIteration):
        next(it)
    assert it.stats.claims == 2 and it.stats.conflicts == 0


def test_claim_never_locks_a_revision_it_did_not_see_in_todo(tdb):
    """A token locked by someone else after our view read must not be claimed again."""
    make_tokens(tdb, ["a", "b", "c"])
    claimer = picas._Claimer(tdb, "todo")
    assert claimer._read_window()
    # Another pilot locks every token after our view read.
    rival = picas.TaskViewIterator(tdb, "todo")
    rival_ids = set(t["_id"] for t in rival)
    assert len(rival_ids) == 3
    claimer.window_age = 1e9
    got = []
    while claimer._candidates:
        doc = claimer._candidates.pop()
        token = claimer._lock(doc)
        if token is not None:
            got.append(token)
    assert got == [] and claimer.stats.conflicts == 3
    for tid in rival_ids:
        assert tdb.get(tid)["pilot_id"] == rival.pilot_id


def test_claim_skips_stale_view_rows_whose_document_is_no_longer_todo(tdb):
    make_tokens(tdb, ["a"])
    doc = tdb.get("t-1")
    doc["lock"], doc["done"] = 1, 2
    claimer = picas._Claimer(tdb, "todo")
    assert claimer._lock(doc) is None and claimer.stats.skipped == 1
    assert tdb.get("t-1")["lock"] == 0


def test_view_rows_that_are_not_tokens_are_skipped(tdb):
    tdb.ensure_design("Custom", {"all": {"map": "function(doc){ if(!doc.views) emit(doc._id, 1); }"}})
    tdb.save({"_id": "junk", "lock": 0, "done": 0})
    make_tokens(tdb, ["a"])
    it = picas.TaskViewIterator(tdb, "Custom/all")
    assert [t["_id"] for t in it] == ["t-1"]
    assert tdb.get("junk") == {"_id": "junk", "lock": 0, "done": 0, "_rev": tdb.get("junk")["_rev"]}


def test_prioritized_iterator_takes_high_priority_first(tdb):
    tdb.ensure_design("Prio", {
        "high": {"map": 'function(doc){ if(doc.type=="token" && doc.lock==0 && doc.done==0 && doc.prio) emit(doc._id,1); }'},
        "low": {"map": 'function(doc){ if(doc.type=="token" && doc.lock==0 && doc.done==0 && !doc.prio) emit(doc._id,1); }'},
    })
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id="low%d" % i) for i in range(3)] +
               [dict(picas.TOKEN_DEFAULTS, _id="high%d" % i, prio=1) for i in range(3)])
    it = picas.PrioritizedViewIterator(tdb, "high", "low", design_doc="Prio")
    order = [t["_id"] for t in it]
    assert sorted(order[:3]) == ["high0", "high1", "high2"]
    assert sorted(order[3:]) == ["low0", "low1", "low2"]


def test_endless_iterator_waits_for_new_work_and_stops_on_callback(tdb):
    it = picas.EndlessViewIterator(picas.TaskViewIterator(tdb, "todo"), sleep_sec=0.2,
                                   max_sleep_sec=0.4,
                                   stop_callback=lambda deadline: time.time() > deadline,
                                   deadline=time.time() + 6)
    timer = threading.Timer(1.0, make_tokens, args=(tdb, ["late"]))
    timer.start()
    started = time.time()
    token = next(it)
    assert token["input"] == "late" and time.time() - started >= 0.9
    started = time.time()
    with pytest.raises(StopIteration):
        next(it)
    assert time.time() - started < 6.5


def test_racing_pilot_processes_never_run_a_token_twice(couch, tdb, tmp_path):
    make_tokens(tdb, ["x%d" % i for i in range(80)])
    log = tmp_path / "executions.log"
    task = ["sh", "-c", 'echo "$2" >> %s' % log, "sh"]
    pilots = [start_pilot(couch, tdb, ["run", "--"] + task) for _ in range(4)]
    codes = [p.wait(120) for p in pilots]
    assert all(code in (0, 3) for code in codes), [p.stderr.read() for p in pilots]
    ran = executions(str(log))
    assert len(ran) == 80 and len(set(ran)) == 80
    assert set(states(tdb).values()) == {"done"}


# -- the actor loop ------------------------------------------------------------

def test_actor_runs_every_token_and_saves_results(tdb):
    make_tokens(tdb, ["ok1", "bad", "ok2"])
    actor = Recorder(tdb, codes={"bad": 7})
    actor.run()
    assert sorted(actor.ran) == ["t-1", "t-2", "t-3"] and actor.tasks_processed == 3
    assert view_ids(tdb, "done") == ["t-1", "t-3"] and view_ids(tdb, "error") == ["t-2"]
    assert tdb.get("t-2")["exit_code"] == 7 and tdb.get("t-1")["output"] == "result of ok1"
    assert actor.hooks[0] == "prepare_env" and actor.hooks[-1] == "cleanup_env"
    assert actor.hooks.count("prepare_run") == 3 and actor.hooks.count("cleanup_run") == 3
    assert actor.current_task["_id"] == "t-3" or actor.current_task["_id"] in actor.ran  # kept set, as upstream


def test_exception_in_process_task_lands_in_error_with_traceback(tdb):
    make_tokens(tdb, ["a"])

    def boom(actor, token):
        raise ValueError("bad input file")
    Recorder(tdb, work=boom).run()
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["exit_code"] != 0
    assert "bad input file" in doc["error"][-1]["message"]
    assert "ValueError" in doc["error"][-1]["exception"]


def test_failed_tokens_are_scrubbed_up_to_max_scrub(tdb):
    make_tokens(tdb, ["bad"])
    actor = Recorder(tdb, codes={"bad": 1})
    actor.run(max_scrub=2)
    assert actor.ran == ["t-1"] * 3
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["scrub_count"] == 2


@pytest.mark.parametrize("limit", ["max_tasks", "max_total_time", "walltime", "stop_function"])
def test_stop_criteria_are_checked_before_claiming(tdb, limit):
    make_tokens(tdb, ["a%d" % i for i in range(6)])
    sleepy = lambda actor, token: time.sleep(0.4)
    actor = Recorder(tdb, work=sleepy)
    if limit == "max_tasks":
        actor.run(max_tasks=2)
        expected = 2
    elif limit == "max_total_time":
        # Alone, as upstream: claim nothing after it (no fit check).
        actor.run(max_total_time=1.0)          # 0.4 s per token: claims at 0, 0.4, 0.8
        expected = 3
    elif limit == "walltime":
        # 1.2 s in total, tokens may take 1 s: after the first token (0.4 s)
        # only 0.8 s remain, too little to start another.
        actor.run(max_total_time=1.2, max_token_time=1.0)
        expected = 1
    else:
        actor.run(stop_function=lambda actor: actor.tasks_processed >= 4, actor=actor)
        expected = 4
    assert actor.tasks_processed == expected
    counts = picas.count_states(tdb)
    assert counts == {"todo": 6 - expected, "locked": 0, "done": expected, "error": 0}


def test_timeout_interrupts_python_code(tdb):
    make_tokens(tdb, ["spin"])

    def spin(actor, token):
        while True:
            sum(range(1000))
    started = time.time()
    Recorder(tdb, work=spin).run(max_token_time=0.5)
    assert time.time() - started < 5
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["exit_code"] == 124
    assert "timed out" in doc["error"][-1]["message"]


def test_timeout_kills_a_task_that_traps_sigterm_and_its_grandchild(tdb, tmp_path):
    make_tokens(tdb, ["stubborn"])
    pids = tmp_path / "pids"
    script = tmp_path / "stubborn.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        trap 'echo ignoring TERM' TERM
        sleep 300 &
        echo $$ $! > %s
        while true; do sleep 0.1; done
        """ % pids))
    script.chmod(0o755)

    def run_it(actor, token):
        proc, code, out, err = picas.execute([str(script)])
        token["exit_code"] = code
    actor = Recorder(tdb, work=run_it, grace=0.5)
    started = time.time()
    actor.run(max_token_time=1.0)
    assert time.time() - started < 10
    found = read_pids(str(pids))
    assert len(found) == 2
    assert wait_for(lambda: not any(alive(p) for p in found), timeout=3)
    doc = tdb.get("t-1")
    assert doc["exit_code"] == 124 and picas.token_state(doc) == "error"


def test_conflict_on_result_save_reapplies_the_result(tdb):
    make_tokens(tdb, ["a"])

    def meddle(actor, token):
        other = tdb.get(token["_id"])
        other["note"] = "added by an operator while the task ran"
        tdb.save(other)
    Recorder(tdb, work=meddle, heartbeat=0).run()
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done"
    assert doc["output"] == "result of a"
    assert doc["note"] == "added by an operator while the task ran"


def test_conflict_on_result_save_reapplies_the_result_with_heartbeats_on(tdb):
    make_tokens(tdb, ["a"])
    revs = []

    def meddle(actor, token):
        other = tdb.get(token["_id"])
        other["note"] = "added by an operator while the task ran"
        tdb.save(other)
        for _ in range(10):                 # heartbeats meet the operator's revision
            time.sleep(0.1)
            revs.append(tdb.get(token["_id"])["_rev"])
    Recorder(tdb, work=meddle, heartbeat=0.2).run()
    assert len(set(revs)) >= 3
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done"
    assert doc["output"] == "result of a"
    assert doc["note"] == "added by an operator while the task ran"


def test_stop_signal_after_user_code_saved_the_result_keeps_it(tdb):
    make_tokens(tdb, ["a", "b"])

    def save_then_get_stopped(actor, token):
        token["exit_code"] = 0
        token["done"] = picas.seconds()
        tdb.save(token)                      # as upstream-style process_task code does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                        # interrupted here
    actor = Recorder(tdb, work=save_then_get_stopped, heartbeat=0)
    with pytest.raises(SystemExit) as info:
        actor.run()
    assert info.value.code == 128 + signal.SIGTERM
    ran, = actor.ran
    other, = set(["t-1", "t-2"]) - set([ran])
    assert states(tdb) == {ran: "done", other: "todo"}
    assert tdb.get(ran)["scrub_count"] == 0


def test_a_result_is_kept_in_the_journal_while_the_server_fails_then_saved(
        couch, tdb, tmp_path, monkeypatch):
    from faultserver import FaultServer
    monkeypatch.chdir(str(tmp_path))
    monkeypatch.setattr(picas, "RESULT_RETRY_PAUSE", (0.05, 0.1))
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.01)
    make_tokens(tdb, ["a"])
    journal = tmp_path / "picas-journal"

    class stash(object):           # the journal entry of the result
        @staticmethod
        def exists():
            return journal.is_dir() and any(n.endswith(".json") for n in os.listdir(str(journal)))
    seen = {"failed": 0, "stash_while_failing": False}

    def fail_results_three_times(fault, request):
        body = request.json() if request.method == "PUT" and request.body[:1] == b"{" else {}
        if body.get("done"):
            if seen["failed"] < 3:
                seen["failed"] += 1
                seen["stash_while_failing"] |= stash.exists()
                return ("status", 503)
            seen["stash_at_success"] = stash.exists()
        return ("proxy",)
    with FaultServer(upstream=couch.url, default=fail_results_three_times) as proxy:
        db = picas.Server(proxy.url, couch.username, couch.password, retries=1).database(tdb.name)
        Recorder(db, heartbeat=0).run()
    assert seen["failed"] == 3 and seen["stash_while_failing"] and seen["stash_at_success"]
    assert not stash.exists()                  # removed once the result was saved
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["output"] == "result of a"


def test_result_of_a_token_reset_meanwhile_and_run_by_nobody_is_saved(tdb):
    """`reset --stale` freed it (its heartbeat looked stale): the work is done, keep it."""
    make_tokens(tdb, ["a"])

    def reset_meanwhile(actor, token):
        other = tdb.get(token["_id"])
        picas.scrub_token(other)
        tdb.save(other)
    actor = Recorder(tdb, work=reset_meanwhile, heartbeat=0)
    actor.run(max_tasks=1)
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["scrub_count"] == 1
    assert doc["output"] == "result of a" and doc["pilot_id"] == actor.pilot_id


def test_result_of_a_token_taken_by_another_claim_meanwhile_is_kept_in_its_error_list(tdb):
    make_tokens(tdb, ["a"])

    def taken_meanwhile(actor, token):
        other = tdb.get(token["_id"])
        picas.scrub_token(other)
        tdb.save(other)
        other.update(lock=picas._now(), pilot_id="rival", claim_id="rival-claim")
        tdb.save(other)
    actor = Recorder(tdb, work=taken_meanwhile, heartbeat=0)
    actor.run(max_tasks=1)
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "locked" and doc["claim_id"] == "rival-claim"
    entry = doc["error"][-1]
    assert "reset or taken" in entry["message"]
    assert entry["result"]["output"] == "result of a" and entry["result"]["exit_code"] == 0


def test_heartbeat_refreshes_the_running_token(tdb):
    make_tokens(tdb, ["a"])
    seen = []

    def watch(actor, token):
        for _ in range(8):
            time.sleep(0.25)
            seen.append(tdb.get(token["_id"]))
    Recorder(tdb, work=watch, heartbeat=0.5).run()
    revs = set(d["_rev"] for d in seen)
    assert len(revs) >= 3                          # heartbeats wrote new revisions
    assert all(picas.token_state(d) == "locked" for d in seen)
    assert seen[-1]["heartbeat"] > seen[0]["heartbeat"]
    assert seen[0]["heartbeat_interval"] == 0.5
    assert picas.token_state(tdb.get("t-1")) == "done"


# -- signals (pilot subprocesses) ----------------------------------------------

SLOW_TASK = """#!/bin/sh
echo $$ >> {pids}
sleep 300 &
echo $! >> {pids}
wait
"""


def _slow_script(tmp_path):
    pids = tmp_path / "pids"
    script = tmp_path / "slow.sh"
    script.write_text(SLOW_TASK.format(pids=pids))
    script.chmod(0o755)
    return script, pids


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGINT", "SIGXCPU"])
def test_stop_signal_mid_task_gives_the_token_back(couch, tdb, tmp_path, signame):
    make_tokens(tdb, ["a", "b"])
    script, pids = _slow_script(tmp_path)
    pilot = start_pilot(couch, tdb, ["run", "--grace", "1", "--", str(script)])
    assert wait_for(lambda: len(read_pids(str(pids))) == 2, timeout=20)
    pilot.send_signal(getattr(signal, signame))
    code = pilot.wait(20)
    assert code == 128 + getattr(signal, signame), pilot.stderr.read()
    assert wait_for(lambda: not any(alive(p) for p in read_pids(str(pids))), timeout=3)
    assert set(states(tdb).values()) == {"todo"}
    assert all(tdb.get(t)["scrub_count"] == 0 for t in ("t-1", "t-2"))


def test_sigterm_after_the_last_task_leaves_finished_tokens_done(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b"])
    marker = tmp_path / "cleanup-started"
    script = tmp_path / "pilot.py"
    script.write_text(textwrap.dedent("""\
        import sys, time
        sys.path.insert(0, %r)
        import picas
        class Actor(picas.RunActor):
            def process_task(self, token):
                token["exit_code"] = 0
            def cleanup_env(self):
                open(%r, "w").close()
                time.sleep(3)
        db = picas.Server(%r, %r, %r).database(%r)
        Actor(db).run()
        """ % (ROOT, str(marker), couch.url, couch.username, couch.password, tdb.name)))
    pilot = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    assert wait_for(marker.exists, timeout=20)
    pilot.send_signal(signal.SIGTERM)
    pilot.wait(20)
    assert set(states(tdb).values()) == {"done"}
    assert all(tdb.get(t)["scrub_count"] == 0 for t in ("t-1", "t-2"))


def test_sigkilled_pilot_takes_its_task_processes_with_it(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    script, pids = _slow_script(tmp_path)
    pilot = start_pilot(couch, tdb, ["run", "--", str(script)])
    assert wait_for(lambda: len(read_pids(str(pids))) == 2, timeout=20)
    pilot.kill()
    pilot.wait(10)
    started = time.time()
    assert wait_for(lambda: not any(alive(p) for p in read_pids(str(pids))), timeout=1.0)
    assert time.time() - started <= 1.0
    assert states(tdb) == {"t-1": "locked"}         # for `reset --stale` to find


def test_pilot_whose_whole_process_group_is_sigkilled_leaves_no_task(couch, tdb, tmp_path):
    # As a batch system or `kill -9 -PGID` does: the watchdog must not be in that group.
    make_tokens(tdb, ["a"])
    script, pids = _slow_script(tmp_path)
    pilot = start_pilot(couch, tdb, ["run", "--", str(script)], start_new_session=True)
    assert wait_for(lambda: len(read_pids(str(pids))) == 2, timeout=20)
    os.killpg(pilot.pid, signal.SIGKILL)
    pilot.wait(10)
    assert wait_for(lambda: not any(alive(p) for p in read_pids(str(pids))), timeout=1.0)
    assert states(tdb) == {"t-1": "locked"}


def test_sigkilled_pilot_takes_a_grandchild_that_left_the_process_group(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    pids = tmp_path / "pids"
    script = tmp_path / "escape.sh"
    script.write_text("#!/bin/sh\necho $$ >> %s\nsetsid sh -c 'echo $$ >> %s; exec sleep 300' &\n"
                      "sleep 300\n" % (pids, pids))
    script.chmod(0o755)
    pilot = start_pilot(couch, tdb, ["run", "--", str(script)])
    assert wait_for(lambda: len(read_pids(str(pids))) == 2, timeout=20)
    task, escaped = read_pids(str(pids))
    assert os.getpgid(escaped) != os.getpgid(task)        # out of the task's group
    pilot.kill()
    pilot.wait(10)
    assert wait_for(lambda: not alive(task) and not alive(escaped), timeout=1.0)


def test_run_exit_status_tells_no_work_from_work_done(couch, tdb):
    code, out, err = run_pilot(couch, tdb, ["run", "--", "true"])
    assert code == picas.EXIT_NO_WORK
    make_tokens(tdb, ["a"])
    code, out, err = run_pilot(couch, tdb, ["run", "--", "true"])
    assert code == picas.EXIT_OK and "exit code 0" in err
