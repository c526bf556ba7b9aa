"""The DIRAC job of grid-sandbox/: a sandbox holding only what its JDL lists runs the pilot."""
import os
import re
import shutil
import signal
import subprocess
import time

from helpers import ROOT, ensure_views, make_tokens, states, wait_for

SANDBOX = os.path.join(ROOT, "grid-sandbox")


def input_sandbox():
    with open(os.path.join(SANDBOX, "grid-example.jdl")) as fh:
        jdl = fh.read()
    return re.findall(r'"([^"]+)"', re.search(r"InputSandbox\s*=\s*\{([^}]*)\}", jdl).group(1))


def make_sandbox(couch, db, path):
    """An empty worker-node directory with the JDL's input sandbox, as DIRAC would fill it."""
    path.mkdir()
    for name in input_sandbox():
        source = os.path.join(ROOT, "picas.py") if name == "picas.py" else \
            os.path.join(SANDBOX, name)
        if name == "picasconfig.py":                  # the user's own: not in the repository
            (path / name).write_text(
                "PICAS_HOST_URL = %r\nPICAS_DATABASE = %r\nPICAS_USERNAME = %r\n"
                "PICAS_PASSWORD = %r\n" % (couch.url, db.name, couch.username, couch.password))
        else:
            shutil.copy(source, str(path / name))
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("PICAS_"))
    env.update(DIRACJOBID="4242", PYTHONDONTWRITEBYTECODE="1")
    return env


def test_the_jdl_ships_only_picas_the_scripts_and_the_config():
    assert sorted(input_sandbox()) == ["picas.py", "picasconfig.py", "process_task.sh",
                                       "startpilot.sh"]


def test_startpilot_runs_the_quick_example_from_a_bare_sandbox(couch, db, tmp_path):
    ensure_views(db)
    with open(os.path.join(ROOT, "examples", "quickExample.txt")) as fh:
        ids = make_tokens(db, [line.strip() for line in fh if line.strip()] + ["exit 7"])
    work = tmp_path / "node"
    env = make_sandbox(couch, db, work)
    proc = subprocess.run(["/bin/sh", "startpilot.sh", "600"], cwd=str(work), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, out + err
    assert "=== pilot exited with status 0" in out
    assert "(from PICAS_END_TIME)" in err and "claiming stops 60 s before" in err, err
    assert states(db) == dict(zip(ids, ["done", "done", "done", "error"]))
    for tid, letter in zip(ids, "ABC"):
        doc = db.get(tid)
        assert doc["dirac_job_id"] == "4242" and doc["exit_code"] == 0
        log = db.get_attachment(tid, "logs_%s.out" % tid).decode()
        assert "this is token %s" % letter in log and "token:    %s" % tid in log
    assert db.get(ids[3])["exit_code"] == 7
    assert couch.password not in out + err
    # Every file the JDL's OutputSandbox names exists, the (empty) journal included.
    import re
    with open(os.path.join(ROOT, "grid-sandbox", "grid-example.jdl")) as fh:
        outputs = re.findall(r'"([^"]+)"', re.search(r"OutputSandbox = \{([^}]*)\}",
                                                   fh.read()).group(1))
    assert "picas-journal.tar" in outputs
    for name in outputs:
        if name not in ("pilot.out", "pilot.err"):     # DIRAC's own redirections
            assert (work / name).exists(), name
    import tarfile
    with tarfile.open(str(work / "picas-journal.tar")) as tar:
        assert [m.name for m in tar.getmembers()] == ["picas-journal"]


def test_startpilot_passes_sigterm_on_and_the_token_goes_back(couch, db, tmp_path):
    ensure_views(db)
    marker = tmp_path / "started"
    ids = make_tokens(db, ["touch %s; sleep 60" % marker])
    work = tmp_path / "node"
    env = make_sandbox(couch, db, work)
    proc = subprocess.Popen(["/bin/sh", "startpilot.sh", "600"], cwd=str(work), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(marker.exists, timeout=30)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)               # the batch system's stop
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert states(db) == {ids[0]: "todo"}
    assert db.get(ids[0])["scrub_count"] == 0
