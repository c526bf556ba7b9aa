"""Small helpers shared by the tests: tokens, pilot subprocesses, process checks."""
import json
import os
import subprocess
import sys
import time

import picas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICAS = os.path.join(ROOT, "picas.py")


def make_tokens(db, inputs, prefix="t"):
    """Create todo tokens with the given inputs; return their ids."""
    report = picas.push_tokens(db, lines=list(inputs), id_prefix=prefix)
    assert report["failed"] == 0, report
    return ["%s-%d" % (prefix, i) for i in range(1, len(inputs) + 1)]


def ensure_views(db):
    db.ensure_design("Monitor", picas.standard_views())


def states(db):
    """Map token id -> state, from the documents themselves."""
    rows = db.all_docs(include_docs=True)["rows"]
    return dict((r["id"], picas.token_state(r["doc"])) for r in rows
                if not r["id"].startswith("_design/"))


def view_ids(db, view):
    return sorted(r["id"] for r in db.view("Monitor/" + view)["rows"])


def pilot_cmd(*args):
    return [sys.executable, PICAS] + list(args)


def start_pilot(couch, db, args, cwd=None, **kwargs):
    """Start ``python picas.py ARGS`` against ``db`` as a subprocess."""
    return subprocess.Popen(pilot_cmd(*args), env=couch.env(db.name), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def run_pilot(couch, db, args, cwd=None, timeout=120):
    proc = subprocess.run(pilot_cmd(*args), env=couch.env(db.name), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def proc_state(pid):
    """The /proc state letter of ``pid``, or None when it is gone (zombies count as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else state


def alive(pid):
    return proc_state(pid) is not None


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def read_pids(path):
    try:
        with open(path) as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def executions(path):
    """Lines of an execution log written by tasks (one token id per run)."""
    try:
        with open(path) as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError:
        return []


def load_json(path):
    with open(path) as fh:
        return json.load(fh)
