"""A pilot that manages its own time and failures (issue 14).

Walltime read from the batch system (fake SLURM, PBS/Torque and HTCondor
environments, and fake squeue/scontrol/qstat commands on PATH), learned run
times deciding whether a token fits, black-hole hosts, the retry exit code
and poison tokens. Pilots run against the real test server.
"""
import os
import signal
import subprocess
import time

import pytest

import picas
from helpers import ROOT, ensure_views, make_tokens, wait_for
from test_faults import Pilot, run_cli, script, token_docs  # noqa: F401


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


@pytest.fixture(autouse=True)
def _no_pilot_left():
    yield
    while Pilot.started:
        Pilot.started.pop().kill()


def fake_command(folder, name, body):
    """An executable ``name`` in ``folder`` (put first on PATH) that records its arguments."""
    folder.mkdir(exist_ok=True)
    return script(folder / name, 'echo "$@" >> "%s/%s.args"\n%s' % (folder, name, body))


def path_with(folder):
    return "%s:%s" % (folder, os.environ.get("PATH", "/usr/bin:/bin"))


# -- walltime from the batch system ----------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("5", 300), ("0:00", 0),
    ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None), ("", None), ("1:2:3:4", None),
    ("x-01:00:00", None), ("-1:00", None), ("1:0a", None),
])
def test_clock_seconds_reads_slurm_and_pbs_time_formats(text, seconds):
    assert picas._clock_seconds(text) == seconds


def test_the_earliest_end_wins():
    now = 1000000.0
    env = {"PICAS_END_TIME": str(now + 500), "SLURM_JOB_ID": "7",
           "SLURM_JOB_END_TIME": str(now + 9000)}
    assert picas.detect_walltime(env, now) == (now + 500, "PICAS_END_TIME")
    env["SLURM_JOB_END_TIME"] = str(now + 100)
    assert picas.detect_walltime(env, now) == (now + 100, "SLURM_JOB_END_TIME of SLURM job 7")


def test_slurm_job_end_time_needs_no_query(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "squeue", "echo 99:00:00\n")
    now = time.time()
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": "%d" % (now + 3600),
           "PATH": path_with(bin_dir)}
    end, source = picas.detect_walltime(env, now)
    assert abs(end - (now + 3600)) < 1 and "SLURM_JOB_END_TIME" in source and "42" in source
    assert not (bin_dir / "squeue.args").exists()          # no query when the variable says it


def test_slurm_time_left_from_squeue(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "squeue", "echo 1-00:30:00\n")
    now = time.time()
    end, source = picas.detect_walltime({"SLURM_JOB_ID": "42", "PATH": path_with(bin_dir)}, now)
    assert end == now + 86400 + 1800 and "squeue" in source
    assert (bin_dir / "squeue.args").read_text().split() == ["-h", "-j", "42", "-o", "%L"]


def test_slurm_unlimited_in_squeue_falls_back_to_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "squeue", "echo UNLIMITED\n")
    fake_command(bin_dir, "scontrol", "echo 'JobId=42 JobName=pilot StartTime=2026-12-02T10:00:00 "
                                      "EndTime=2026-12-02T22:00:00 Deadline=N/A'\n")
    end, source = picas.detect_walltime({"SLURM_JOB_ID": "42", "PATH": path_with(bin_dir)})
    assert end == time.mktime(time.strptime("2026-12-02T22:00:00", "%Y-%m-%dT%H:%M:%S"))
    assert "scontrol" in source
    # An end scontrol does not know is no limit.
    fake_command(bin_dir, "scontrol", "echo 'JobId=42 EndTime=Unknown'\n")
    end, source = picas.detect_walltime({"SLURM_JOB_ID": "42", "PATH": path_with(bin_dir)})
    assert end is None and "SLURM" in source


def test_bad_input_walltime_query_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(picas, "WALLTIME_QUERY_TIMEOUT", 0.5)
    bin_dir = tmp_path / "bin"
    env = {"SLURM_JOB_ID": "42", "PBS_JOBID": "9.pbs", "PATH": path_with(bin_dir)}
    fake_command(bin_dir, "squeue", "exec sleep 30\n")
    fake_command(bin_dir, "scontrol", "echo 'slurm_load_jobs error: Invalid job id' >&2; exit 1\n")
    fake_command(bin_dir, "qstat", "printf 'garbage\\n=\\nWalltime.Remaining = soon\\n'\n")
    started = time.monotonic()
    end, source = picas.detect_walltime(env)
    assert time.monotonic() - started < 3
    assert end is None and "SLURM" in source and "PBS" in source
    # Nothing on PATH at all.
    end, source = picas.detect_walltime({"SLURM_JOB_ID": "42", "PATH": str(tmp_path / "none")})
    assert end is None


def test_pbs_torque_walltime_from_qstat(tmp_path):
    bin_dir = tmp_path / "bin"
    now = time.time()
    env = {"PBS_JOBID": "123.server", "PATH": path_with(bin_dir)}
    fake_command(bin_dir, "qstat", "echo 'Job Id: 123.server'\necho '    Walltime.Remaining = 1800'\n")
    assert picas.detect_walltime(env, now) == (now + 1800, "qstat (Walltime.Remaining of PBS job "
                                                           "123.server)")
    assert (bin_dir / "qstat.args").read_text().split() == ["-f", "123.server"]
    fake_command(bin_dir, "qstat", "echo '    Resource_List.walltime = 02:00:00'\n"
                                   "echo '    resources_used.walltime = 00:30:00'\n")
    assert picas.detect_walltime(env, now)[0] == now + 5400
    fake_command(bin_dir, "qstat", "exit 1\n")
    assert picas.detect_walltime(dict(env, PBS_WALLTIME="600"), now)[0] == now + 600


def test_htcondor_walltime_from_the_job_and_machine_ads(tmp_path):
    now = time.time()
    job_ad = tmp_path / "job.ad"
    job_ad.write_text('ClusterId = 5\nProcId = 0\nJobCurrentStartDate = %d\nMaxRuntime = 7200\n'
                      % (now - 600))
    end, source = picas.detect_walltime({"_CONDOR_JOB_AD": str(job_ad)}, now)
    assert end == int(now - 600) + 7200 and "job ad" in source
    job_ad.write_text('ClusterId = 5\nMaxWallTimeMins = 30\n')
    assert picas.detect_walltime({"_CONDOR_JOB_AD": str(job_ad)}, now)[0] == now + 1800
    machine_ad = tmp_path / "machine.ad"
    machine_ad.write_text('GLIDEIN_ToDie = %d\n' % (now + 900))
    end, source = picas.detect_walltime({"_CONDOR_JOB_AD": str(job_ad),
                                         "_CONDOR_MACHINE_AD": str(machine_ad)}, now)
    assert end == int(now + 900) and "GLIDEIN_ToDie" in source           # the earlier one
    # An ad without a limit, an unreadable ad, garbage values: no limit, no error.
    job_ad.write_text('ClusterId = 5\nMaxRuntime = "soon"\n')
    assert picas.detect_walltime({"_CONDOR_JOB_AD": str(job_ad),
                                  "_CONDOR_MACHINE_AD": str(tmp_path / "missing")})[0] is None


def test_nothing_found_says_where_it_looked():
    end, source = picas.detect_walltime({})
    assert end is None and "PICAS_END_TIME" in source


def test_run_stops_claiming_before_the_slurm_job_ends(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b", "c", "d"])
    task = script(tmp_path / "task.sh", "sleep 1\n")
    # 3.5 s of claiming left: the first token (1 s) is claimed before anything is
    # known; the second only if 1.25 x 1 s + 2 s fit in what is left, so not both.
    end = time.time() + picas.WALLTIME_RESERVE + 3.5
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": "%d" % end}
    result = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--", task], env=env)
    assert result.code == 0, result
    assert "walltime: this job ends at" in result.err and "SLURM job 4242" in result.err
    assert "a token needs about" in result.err, result
    done = [t for t, d in token_docs(tdb).items() if picas.token_state(d) == "done"]
    assert 1 <= len(done) <= 2, token_docs(tdb)
    # An explicit --max-time wins over the batch system's end (and alone, without
    # --max-token-time, means "claim nothing after", as upstream).
    result = run_cli(couch, tdb, ["run", "--heartbeat", "0", "--max-time", "600", "--", task],
                     env=env)
    assert result.code == 0 and "walltime:" not in result.err, result
    assert all(picas.token_state(d) == "done" for d in token_docs(tdb).values())


def test_run_reads_the_time_left_from_a_fake_squeue(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "squeue", "echo 0:30\n")          # 30 s left: less than the reserve
    result = run_cli(couch, tdb, ["run", "--", "true"],
                     env={"SLURM_JOB_ID": "77", "PATH": path_with(bin_dir)})
    assert result.code == picas.EXIT_NO_WORK, result
    assert "from squeue" in result.err and "claiming stops 60 s before" in result.err
    assert picas.token_state(tdb.get("t-1")) == "todo"


# -- learned run times -----------------------------------------------------------

class Timed(picas.RunActor):
    """Records when each token started and ended (monotonic), and sleeps ``seconds``."""

    def __init__(self, db, seconds, **kwargs):
        picas.RunActor.__init__(self, db, heartbeat=0, **kwargs)
        self.seconds = seconds
        self.spans = []

    def process_task(self, token):
        started = time.monotonic()
        time.sleep(self.seconds)
        token["exit_code"] = 0
        self.spans.append((started, time.monotonic()))


def test_upstream_example_limits_no_longer_stop_a_pilot_at_half_time(tdb, monkeypatch):
    # Upstream's run(max_token_time=1800, max_total_time=3600), scaled down: upstream
    # stops claiming once less than max_token_time is left, here after the first
    # token. The learned rule claims while 1.25 x 0.3 s + 0.1 s fit.
    monkeypatch.setattr(picas, "RUNTIME_SLACK", 0.1)
    make_tokens(tdb, ["x%d" % i for i in range(12)])
    actor = Timed(tdb, 0.3)
    started = time.monotonic()
    actor.run(max_token_time=1.8, max_total_time=3.6)
    assert actor.tasks_processed >= 5, actor.spans
    # Every token it started could finish, and did, within the total time.
    assert all(end - started < 3.6 for _, end in actor.spans), (started, actor.spans)


def test_the_pools_run_times_count_before_the_pilot_has_its_own(tdb):
    make_tokens(tdb, ["new"])
    finished = [dict(picas.TOKEN_DEFAULTS, _id="old-%d" % i, lock=5, done=6, exit_code=0,
                     run_seconds=100.0) for i in range(10)]
    tdb.update(finished)
    actor = Timed(tdb, 0.1)
    actor.run(max_total_time=60, max_token_time=1000)   # tokens take about 100 s: none fits
    assert actor.tasks_processed == 0
    assert picas.token_state(tdb.get("t-1")) == "todo"
    assert actor._runtimes.needed() == pytest.approx(1.25 * 100 + picas.RUNTIME_SLACK)
    # A max_total_time alone keeps upstream's meaning (claim nothing after it): the
    # token runs. Without a time limit the pool is not even read.
    actor = Timed(tdb, 0.1)
    actor.run(max_total_time=60)
    assert actor.tasks_processed == 1
    make_tokens(tdb, ["newer"], prefix="u")
    actor = Timed(tdb, 0.1)
    actor.run()
    assert actor.tasks_processed == 1 and actor._runtimes.pool == []


def test_a_token_whose_hint_does_not_fit_is_never_locked(tdb):
    tdb.update([dict(picas.TOKEN_DEFAULTS, _id="big", input="big", expected_run_seconds=1000),
                dict(picas.TOKEN_DEFAULTS, _id="small", input="small", expected_run_seconds=1),
                dict(picas.TOKEN_DEFAULTS, _id="plain", input="plain",
                     expected_run_seconds="garbage")])
    before = tdb.get("big")["_rev"]
    actor = Timed(tdb, 0.05)
    actor.run(max_total_time=30, max_token_time=2000)
    docs = token_docs(tdb)
    assert picas.token_state(docs["small"]) == "done" and picas.token_state(docs["plain"]) == "done"
    assert docs["big"]["_rev"] == before               # passed over before any write


def test_runtimes_rule():
    runtimes = picas._Runtimes()
    assert runtimes.needed(1800) is None                # nothing known: claim
    runtimes.pool = [10.0] * 9 + [1000.0]
    assert runtimes.needed() == 1.25 * 1000 + picas.RUNTIME_SLACK
    assert runtimes.needed(60) == 60 + picas.RUNTIME_SLACK  # the kill limit caps it
    for seconds in (1.0, 2.0, 3.0):
        runtimes.learn(seconds)
    assert runtimes.needed() == 1.25 * 3.0 + picas.RUNTIME_SLACK  # its own runs only, now


# -- black holes -----------------------------------------------------------------

def test_bad_input_black_hole_host(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b", "c", "d", "e"])
    before = dict((t, d["_rev"]) for t, d in token_docs(tdb).items())
    broken = script(tmp_path / "broken.sh", "echo 'libfoo.so: cannot open' >&2\nexit 1\n")
    result = run_cli(couch, tdb, ["run", "--max-scrub", "2", "--", broken],
                     env={"PICAS_HOSTNAME": "node-a"})
    assert result.code == picas.EXIT_BLACK_HOLE, result
    assert "looks broken" in result.err and "node-a" in result.err
    docs = token_docs(tdb)
    failed = [t for t, d in docs.items() if d.get("failed_hosts")]
    untouched = [t for t, d in docs.items() if d["_rev"] == before[t]]
    assert len(failed) == 3 and len(untouched) == 2, docs
    for tid in failed:
        doc = docs[tid]
        assert picas.token_state(doc) == "todo" and doc["failed_hosts"] == ["node-a"], doc
        assert doc["scrub_count"] == 0, doc                 # not charged
        assert "pilot_id" not in doc and "looks broken" in doc["error"][-1]["message"]
    # Another pilot on the same host passes those over, and runs the others.
    result = run_cli(couch, tdb, ["run", "--", "true"], env={"PICAS_HOSTNAME": "node-a"})
    assert result.code == 0 and "passed over 3 todo tokens" in result.err, result
    docs = token_docs(tdb)
    assert all(picas.token_state(docs[t]) == "done" for t in untouched)
    assert all(picas.token_state(docs[t]) == "todo" for t in failed)
    # A pilot on another host runs them.
    result = run_cli(couch, tdb, ["run", "--", "true"], env={"PICAS_HOSTNAME": "node-b"})
    assert result.code == 0, result
    assert all(picas.token_state(d) == "done" for d in token_docs(tdb).values())


def test_tokens_that_fail_everywhere_are_charged_not_blamed_on_hosts(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b", "c"])
    bad = script(tmp_path / "bad.sh", "exit 3\n")
    result = run_cli(couch, tdb, ["run", "--", bad], env={"PICAS_HOSTNAME": "node-a"})
    assert result.code == picas.EXIT_BLACK_HOLE, result
    # On node-b they fail again: the tokens' fault, so they go to error, and the
    # pilot is not a black hole.
    result = run_cli(couch, tdb, ["run", "--", bad], env={"PICAS_HOSTNAME": "node-b"})
    assert result.code == 0, result
    docs = token_docs(tdb)
    assert all(picas.token_state(d) == "error" and d["failed_hosts"] == ["node-a"]
               for d in docs.values()), docs
    # An operator's reset forgets the hosts: try again everywhere.
    result = run_cli(couch, tdb, ["reset", "error", "--yes"])
    assert result.code == 0, result
    assert all(picas.token_state(d) == "todo" and "failed_hosts" not in d
               for d in token_docs(tdb).values())


def test_one_token_failing_again_and_again_is_no_black_hole(couch, tdb, tmp_path):
    make_tokens(tdb, ["bad"])
    result = run_cli(couch, tdb, ["run", "--max-scrub", "4", "--", "false"])
    assert result.code == 0, result
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["scrub_count"] == 4
    assert "failed_hosts" not in doc


def test_exit_code_127_counts_however_slow_and_a_slow_failure_does_not(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b", "c"])
    slow_127 = script(tmp_path / "t127.sh", "sleep 0.3\nexit 127\n")
    result = run_cli(couch, tdb, ["run", "--fast-failure", "0.1", "--", slow_127])
    assert result.code == picas.EXIT_BLACK_HOLE, result
    assert all(picas.token_state(d) == "todo" for d in token_docs(tdb).values())
    slow_1 = script(tmp_path / "t1.sh", "sleep 0.3\nexit 1\n")
    result = run_cli(couch, tdb, ["run", "--fast-failure", "0.1", "--", slow_1],
                     env={"PICAS_HOSTNAME": "node-b"})
    assert result.code == 0, result
    assert all(picas.token_state(d) == "error" for d in token_docs(tdb).values())


def test_black_hole_off():
    health = picas._HostHealth(limit=0)
    assert not health.judge(127, 0.1, {"_id": "x"})


def test_streak_rules():
    health = picas._HostHealth(limit=3, fast=5.0)
    token = lambda tid, **kw: dict(kw, _id=tid)
    assert health.judge(1, 0.5, token("a"))
    health.streak.append(("a", "1-x", 0))
    assert not health.judge(1, 0.5, token("a"))           # the same token again: neutral
    assert len(health.streak) == 1
    assert not health.judge(1, 0.5, token("b", failed_hosts=["elsewhere"]))   # the token's fault
    assert len(health.streak) == 1
    assert not health.judge(1, 60.0, token("c"))          # a slow failure ends the streak
    assert health.streak == []
    assert health.judge(126, 60.0, token("d"))             # 126: not executable, however slow


# -- the retry exit code ---------------------------------------------------------

def test_exit_code_75_sends_the_token_back_uncharged_and_another_pilot_runs_it(couch, tdb, tmp_path):
    make_tokens(tdb, ["x"])
    marks = tmp_path / "marks"
    marks.mkdir()
    task = script(tmp_path / "task.sh", """
        if [ -e "%s/$2" ]; then exit 0; fi
        touch "%s/$2"
        echo 'storage busy' >&2
        exit 75
        """ % (marks, marks))
    result = run_cli(couch, tdb, ["run", "--max-scrub", "0", "--", task])
    assert result.code == 0, result
    assert "try again later" in result.err and "passed over 1 todo tokens" in result.err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and doc["scrub_count"] == 0 and doc["retries"] == 1
    assert doc["exit_code"] == 75 and "pilot_id" not in doc
    result = run_cli(couch, tdb, ["run", "--", task])
    assert result.code == 0, result
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["retries"] == 1


def test_retry_codes_are_configurable_and_bounded(couch, tdb, tmp_path):
    make_tokens(tdb, ["x", "y"])
    task = script(tmp_path / "task.sh", '[ "$1" = x ] && exit 99\nexit 75\n')
    result = run_cli(couch, tdb, ["run", "--retry-codes", "99", "--max-retries", "1",
                                       "--black-hole", "0", "--", task])
    assert result.code == 0, result
    docs = token_docs(tdb)
    assert picas.token_state(docs["t-1"]) == "todo" and docs["t-1"]["retries"] == 1
    assert picas.token_state(docs["t-2"]) == "error" and "retries" not in docs["t-2"]
    # A second time over --max-retries: error, saying so.
    result = run_cli(couch, tdb, ["run", "--retry-codes", "99", "--max-retries", "1",
                                       "--", task])
    assert result.code == 0, result
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc["retries"] == 2
    assert "came back 2 times" in doc["error"][-1]["message"]
    # No retry codes at all: 75 is a failure like any other.
    make_tokens(tdb, ["z"], prefix="u")
    result = run_cli(couch, tdb, ["run", "--retry-codes", "", "--", task])
    assert result.code == 0 and picas.token_state(tdb.get("u-1")) == "error", result


@pytest.mark.parametrize("option, value, message", [
    ("--retry-codes", "300", "give exit codes from 1 to 255"),
    ("--retry-codes", "0", "give exit codes from 1 to 255"),
    ("--retry-codes", "75,x", "give exit codes from 1 to 255"),
    ("--retry-codes", "-1", "give exit codes from 1 to 255"),
    ("--max-time", "soon", "'soon' is not a number"),
    ("--max-time", "-5", "must be more than 0"),
    ("--black-hole", "-1", "must be at least 0"),
])
def test_bad_input_retry_codes_or_max_time(couch, tdb, option, value, message):
    make_tokens(tdb, ["x"])
    before = tdb.get("t-1")["_rev"]
    result = run_cli(couch, tdb, ["run", option, value, "--", "true"])
    assert result.code == picas.EXIT_USAGE, result
    assert message in result.err and "Traceback" not in result.err, result
    assert tdb.get("t-1")["_rev"] == before


# -- poison tokens ---------------------------------------------------------------

def test_a_token_killed_by_max_token_time_again_and_again_is_poison(couch, tdb, tmp_path):
    make_tokens(tdb, ["slow"])
    task = script(tmp_path / "task.sh", "exec sleep 30\n")
    result = run_cli(couch, tdb, ["run", "--max-token-time", "0.5", "--grace", "0.2",
                                  "--max-scrub", "5", "--poison-after", "2", "--", task])
    assert result.code == 0, result
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error" and doc.get("timeouts") == 2, (doc, result)
    assert doc["scrub_count"] == 1                       # one retry, then poison
    assert doc["poison"].startswith("killed by max_token_time") and \
        doc["error"][-1]["message"].startswith("poison: ")
    assert "failed_hosts" not in doc                     # a timeout never blames the host


def test_bad_input_poison_token(couch, tdb, tmp_path):
    make_tokens(tdb, ["oom"])
    pidfile = tmp_path / "task.pid"
    task = script(tmp_path / "task.sh", 'echo $$ > "%s"\nexec sleep 60\n' % pidfile)
    for attempt in (1, 2):
        if pidfile.exists():
            pidfile.unlink()
        pilot = Pilot(couch, tdb, ["run", "--heartbeat", "1", "--", task], cwd=str(tmp_path))
        assert wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20)
        os.kill(pilot.proc.pid, signal.SIGKILL)          # the node's OOM killer: pilot
        os.kill(int(pidfile.read_text()), signal.SIGKILL)  # and task
        pilot.wait()
        assert picas.token_state(tdb.get("t-1")) == "locked"
        time.sleep(2.5)                                  # a lease of 2 s (2 x the heartbeat)
        result = run_cli(couch, tdb, ["reset", "locked", "--stale", "--lease", "2",
                                           "--poison-after", "2", "--yes"])
        assert result.code == 0, result
        doc = tdb.get("t-1")
        assert doc["lost_pilots"] == attempt, doc
        if attempt == 1:
            assert picas.token_state(doc) == "todo" and "poison" not in doc
        else:
            assert picas.token_state(doc) == "error", doc
            assert "2 pilots died" in doc["poison"] and "poison" in result.out, result


# -- the recipes use the detection -----------------------------------------------

def recipe_folder(tmp_path):
    """A submission folder as a user makes it: picas.py, the task script, nothing else."""
    import shutil
    folder = tmp_path / "submit"
    folder.mkdir()
    shutil.copy(os.path.join(ROOT, "picas.py"), str(folder / "picas.py"))
    shutil.copy(os.path.join(ROOT, "examples", "process_task.sh"), str(folder))
    return folder


def test_the_slurm_recipe_takes_its_end_from_slurm(couch, tdb, tmp_path):
    ids = make_tokens(tdb, ['echo "this is token A"', 'echo "this is token B"'])
    folder = recipe_folder(tmp_path)
    env = couch.env(tdb.name)
    env.update(SLURM_JOB_ID="991", SLURM_ARRAY_JOB_ID="990", SLURM_ARRAY_TASK_ID="1",
               SLURM_JOB_END_TIME="%d" % (time.time() + 3600), SLURM_SUBMIT_DIR=str(folder))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm_example.sh")],
                          env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(from SLURM_JOB_END_TIME of SLURM job 991)" in proc.stderr, proc.stderr
    for tid in ids:
        doc = tdb.get(tid)
        assert picas.token_state(doc) == "done" and doc["slurm_job_id"] == "990_1", doc


def test_the_htcondor_recipe_puts_its_runtime_where_the_pilot_reads_it(couch, tdb, tmp_path):
    import re
    with open(os.path.join(ROOT, "examples", "htcondor_example.sub")) as fh:
        sub = fh.read()
    runtime = int(re.search(r"^\+MaxRuntime\s*=\s*(\d+)", sub, re.M).group(1))
    command = re.search(r"^arguments\s*=\s*\"-c '(.*)'\"", sub, re.M).group(1)
    ids = make_tokens(tdb, ['echo "this is token A"'])
    folder = recipe_folder(tmp_path)
    # What HTCondor writes into the job ad from the submit file (+Name = value).
    started = int(time.time())
    (folder / ".job.ad").write_text("ClusterId = 12\nProcId = 3\nJobCurrentStartDate = %d\n"
                                    "MaxRuntime = %d\n" % (started, runtime))
    env = couch.env(tdb.name)
    env["_CONDOR_JOB_AD"] = str(folder / ".job.ad")
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, cwd=str(folder),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "from the HTCondor job ad" in proc.stderr, proc.stderr
    end = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started + runtime))
    assert "this job ends at %s" % end in proc.stderr, proc.stderr
    doc = tdb.get(ids[0])
    assert picas.token_state(doc) == "done" and doc["htcondor_job_id"] == "12.3"
    assert (folder / "picas-journal").is_dir()           # transfer_output_files finds it
