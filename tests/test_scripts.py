"""The helper scripts in scripts/, run as users run them, against the live server."""
import os
import subprocess
import sys
import time

import pytest

import picas
from helpers import ROOT, ensure_views, make_tokens, states

SCRIPTS = os.path.join(ROOT, "scripts")


def run_script(couch, db, name, *args, **kwargs):
    env = couch.env(db.name)
    env.update(kwargs.pop("env", {}))
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, name)] + list(args),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=120, **kwargs)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def test_create_views_is_idempotent_and_makes_the_autopilot_layout(couch, db):
    code, out, err = run_script(couch, db, "create_views.py")
    assert code == 0, err
    first = db.get("_design/Monitor")
    assert set(first["views"]) == {"todo", "locked", "done", "error", "overview_total"}
    assert run_script(couch, db, "create_views.py")[0] == 0
    assert db.get("_design/Monitor")["_rev"] == first["_rev"]          # not rewritten
    code, out, err = run_script(couch, db, "create_views.py", "autopilot")
    assert code == 0, err
    assert "doc.cores == 1" in db.get("_design/SingleCore")["views"]["todo"]["map"]
    assert "doc.cores == 4" in db.get("_design/MultiCore")["views"]["todo"]["map"]


def test_push_tokens_from_a_file_twice_creates_them_once(couch, db, tmp_path):
    ensure_views(db)
    path = tmp_path / "work.txt"
    path.write_text("echo one\necho two\n\necho three\n")
    code, out, err = run_script(couch, db, "push_tokens.py", str(path))
    assert code == 0 and "created 3 tokens" in out, (out, err)
    code, out, err = run_script(couch, db, "push_tokens.py", str(path))
    assert code == 0 and "created 0 tokens, 3 already existed" in out, (out, err)
    inputs = sorted(db.get(t)["input"] for t in states(db))
    assert inputs == ["echo one", "echo three", "echo two"]


def test_push_tokens_takes_global_options_after_its_arguments(couch, db, tmp_path):
    other = couch.server().create_database(db.name + "-other")
    try:
        path = tmp_path / "x.txt"
        path.write_text("a\n")
        code, out, err = run_script(couch, db, "push_tokens.py", str(path), "--db", other.name)
        assert code == 0, err
        assert len(states(other)) == 1 and states(db) == {}
    finally:
        couch.server().delete_database(other.name)


def _lock(db, tid, hours_ago=0.0, heartbeat_interval=None, heartbeat_age=None):
    doc = db.get(tid)
    doc["lock"] = int(time.time() - hours_ago * 3600)
    if heartbeat_interval is not None:
        doc["heartbeat_interval"] = heartbeat_interval
        doc["heartbeat"] = time.time() - heartbeat_age
    db.save(doc)


def test_reset_tokens_upstream_hours_form_and_stale_with_a_lease(couch, db):
    ensure_views(db)
    make_tokens(db, ["old", "new", "dead", "alive"])
    _lock(db, "t-1", hours_ago=30)
    _lock(db, "t-2", hours_ago=1)
    code, out, err = run_script(couch, db, "reset_tokens.py", "Monitor/locked", "24", "--yes")
    assert code == 0, err
    assert states(db) == {"t-1": "todo", "t-2": "locked", "t-3": "todo", "t-4": "todo"}
    assert db.get("t-1")["scrub_count"] == 1 and db.get("t-2")["scrub_count"] == 0
    # --lease takes a value; it is not upstream's HOURS.
    _lock(db, "t-3", heartbeat_interval=10, heartbeat_age=500)
    _lock(db, "t-4", heartbeat_interval=10, heartbeat_age=5)
    code, out, err = run_script(couch, db, "reset_tokens.py", "locked", "--stale", "--lease",
                                "100", "--yes")
    assert code == 0, err
    # t-2, locked an hour ago without heartbeats, is judged by its lock time.
    assert states(db) == {"t-1": "todo", "t-2": "todo", "t-3": "todo", "t-4": "locked"}


def test_reset_tokens_asks_without_yes_and_changes_nothing(couch, db):
    ensure_views(db)
    make_tokens(db, ["a"])
    _lock(db, "t-1", hours_ago=2)
    code, out, err = run_script(couch, db, "reset_tokens.py", "locked")
    assert code == picas.EXIT_USAGE and "--yes" in err
    assert states(db) == {"t-1": "locked"}


def test_delete_tokens_deletes_only_the_view(couch, db):
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"])
    doc = db.get("t-2")
    doc.update(lock=1, done=2, exit_code=1)
    db.save(doc)
    code, out, err = run_script(couch, db, "delete_tokens.py", "error", "--yes")
    assert code == 0, err
    assert states(db) == {"t-1": "todo", "t-3": "todo"}


@pytest.mark.parametrize("name", ["create_views.py", "push_tokens.py", "reset_tokens.py",
                                  "delete_tokens.py"])
def test_scripts_work_next_to_a_copy_of_picas(couch, db, tmp_path, name):
    import shutil
    shutil.copy(os.path.join(ROOT, "picas.py"), str(tmp_path))
    shutil.copy(os.path.join(SCRIPTS, name), str(tmp_path))
    env = couch.env(db.name)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / name), "--help"],
                          cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert b"usage:" in proc.stdout
