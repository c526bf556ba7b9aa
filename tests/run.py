#!/usr/bin/env python3
"""Run the whole test suite on every CPython 3.6-3.13 this machine has, in lanes.

    python3 tests/run.py                 # every lane (below)
    python3 tests/run.py --python 3.6    # only some interpreters (by version prefix)
    python3 tests/run.py --lanes pouchdb # only some lanes: pouchdb, couchdb, cluster
    python3 tests/run.py -- -k claim -x  # arguments after -- go to pytest

Lanes:

- ``pouchdb``: the whole suite on every interpreter, each run against its own
  in-memory pouchdb-server (or ``PICAS_TEST_COUCHDB_URL``; see conftest.py);
- ``couchdb``: the whole suite on the newest interpreter against a real
  Apache CouchDB 3.4.3 single node (``PICAS_TEST_SERVER=couchdb``);
- ``cluster``: tests/test_real_cluster.py on the newest interpreter against a
  real 3-node CouchDB cluster (``PICAS_TEST_CLUSTER=1``, or the user's nodes
  from ``PICAS_TEST_CLUSTER_URLS``).

The two real lanes need the relocatable CouchDB build at
``../shared/couchdb/`` (or ``PICAS_COUCHDB_RELEASE``); without it they are
left out and the run says so. Every lane gets a throw-away virtual
environment with the newest pytest its interpreter supports (from PyPI).
Two lanes run at a time, the longest first. Any failing lane fails the run.
The summary has one line per lane (its server and seconds); the last lines
are the totals: ``N passed, N failed, N skipped`` and the wall time.
Without pyenv it runs on the interpreter that started it.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSIONS = ["3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
#: The newest pytest each old interpreter supports. Spelled out because old pips
#: (3.6 ships pip 18) may pick a wheel whose Requires-Python excludes them.
PYTEST = {"3.6": "pytest<7.1", "3.7": "pytest<7.5", "3.8": "pytest<8.4", "3.9": "pytest<9"}
OLD_PIP = {"3.6": "pip>=21,<22"}


def _version_key(path):
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def find_interpreters(wanted):
    """Map 'X.Y' to the newest pyenv CPython X.Y.* binary; fall back to sys.executable."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = {}
    for version in VERSIONS:
        if wanted and not any(version == w or version.startswith(w + ".") for w in wanted):
            continue
        paths = [p for p in glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python"))
                 if re.search(r"/%s\.\d+/bin/python$" % re.escape(version), p)]
        if paths:
            found[version] = sorted(paths, key=_version_key)[-1]
    if not found:
        found["%d.%d" % sys.version_info[:2]] = sys.executable
    return found


def summarize(output):
    """Pull (passed, failed, skipped, errors) out of pytest's closing line."""
    counts = dict.fromkeys(["passed", "failed", "skipped", "error", "xfailed", "xpassed"], 0)
    lines = [l for l in output.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    if lines:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)",
                                       lines[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] += int(number)
    return counts


class Lane(object):
    """One pytest run: an interpreter, a server, which tests."""

    def __init__(self, key, version, python, kind, env=None, tests=None):
        self.key, self.version, self.python, self.kind = key, version, python, kind
        self.env = env or {}                 # variables to set (None: remove)
        self.tests = tests or [os.path.join(ROOT, "tests")]
        self.ignore = []

    @property
    def label(self):
        return "Python %s %s" % (self.version, self.kind)


def make_lanes(interpreters, wanted, release, environ):
    """The lanes to run, longest first (the real CouchDB lane takes the longest)."""
    lanes = []
    newest = sorted(interpreters, key=lambda v: tuple(int(x) for x in v.split(".")))[-1]
    cluster_urls = environ.get("PICAS_TEST_CLUSTER_URLS", "").strip()
    if "couchdb" in wanted and release:
        lanes.append(Lane("couchdb", newest, interpreters[newest], "couchdb", env={
            "PICAS_TEST_SERVER": "couchdb", "PICAS_TEST_COUCHDB_URL": None,
            "PICAS_TEST_CLUSTER": None, "PICAS_TEST_CLUSTER_URLS": None}))
    if "pouchdb" in wanted:
        # The base lanes keep the user's choice of server (PICAS_TEST_COUCHDB_URL or
        # PICAS_TEST_SERVER); without one they run on pouchdb-server.
        if environ.get("PICAS_TEST_COUCHDB_URL"):
            kind = "external"
        elif environ.get("PICAS_TEST_SERVER", "").strip().lower() == "couchdb":
            kind = "couchdb"
            lanes = [lane for lane in lanes if lane.key != "couchdb"]    # the same again
        else:
            kind = "pouchdb"
        for version, python in interpreters.items():
            lanes.append(Lane("pouchdb", version, python, kind, env={
                "PICAS_TEST_CLUSTER": None, "PICAS_TEST_CLUSTER_URLS": None}))
    if "cluster" in wanted and (release or cluster_urls):
        for lane in lanes:       # the cluster lane runs those; elsewhere they would be skipped
            lane.ignore = [os.path.join(HERE, "test_real_cluster.py")]
        lanes.insert(1 if lanes and lanes[0].key == "couchdb" else 0, Lane(
            "cluster", newest, interpreters[newest], "cluster",
            env={"PICAS_TEST_SERVER": None, "PICAS_TEST_CLUSTER": None if cluster_urls else "1"},
            tests=[os.path.join(HERE, "test_real_cluster.py")]))
    return lanes


def run_one(lane, pytest_args, workdir, results):
    version, python = lane.version, lane.python
    venv = os.path.join(workdir, "venv-%s-%s" % (version, lane.key))
    log_path = os.path.join(workdir, "pytest-%s-%s.log" % (version, lane.key))
    start = time.time()
    with open(log_path, "w") as log:
        def step(cmd, **kw):
            log.write("$ %s\n" % " ".join(cmd))
            log.flush()
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)

        rc = step([python, "-m", "venv", venv])
        vpy = os.path.join(venv, "bin", "python")
        if rc == 0 and version in OLD_PIP:
            # pip 18 (Python 3.6) ignores Requires-Python of dependencies.
            rc = step([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                       OLD_PIP[version]])
        if rc == 0:
            rc = step([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                       PYTEST.get(version, "pytest")])
        if rc != 0:
            log.write("\nsetting up the virtual environment failed\n")
            code = rc
        else:
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            for name, value in lane.env.items():
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = value
            code = step([vpy, "-m", "pytest", "-p", "no:cacheprovider", "-rfEsx",
                         "--durations=5"] + ["--ignore=" + p for p in lane.ignore]
                        + lane.tests + pytest_args,
                        cwd=ROOT, env=env)
    with open(log_path) as fh:
        output = fh.read()
    counts = summarize(output)
    results[lane] = (code, counts, output, time.time() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[],
                        help="only this version (3.6, 3.13 ...); repeatable")
    parser.add_argument("--lanes", default="pouchdb,couchdb,cluster",
                        help="comma-separated lanes to run (default: pouchdb,couchdb,cluster)")
    parser.add_argument("--jobs", type=int, default=2, help="lanes run at once (2)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    wanted = set(w.strip() for w in args.lanes.split(",") if w.strip())
    unknown = wanted - {"pouchdb", "couchdb", "cluster"}
    if unknown:
        parser.error("unknown lanes: %s (pouchdb, couchdb, cluster)" % ", ".join(sorted(unknown)))
    started = time.time()
    interpreters = find_interpreters([v for vs in args.python for v in vs.split(",")])
    print("testing picas.py on: %s" % ", ".join(
        "%s (%s)" % (v, p) for v, p in interpreters.items()), flush=True)

    sys.path.insert(0, os.path.join(HERE, "server"))
    import couchdb as couchdb_server       # tests/server/couchdb.py
    try:
        release = couchdb_server.find_release()
    except couchdb_server.SetupError as exc:
        print("error: %s" % exc)
        return 2
    if release:
        print("CouchDB build: %s" % release)
    else:
        print("CouchDB build: none found (looked for %s; PICAS_COUCHDB_RELEASE names another): "
              "no real CouchDB lanes, pouchdb-server only" % couchdb_server.DEFAULT_RELEASE)
    lanes = make_lanes(interpreters, wanted, release, os.environ)
    if not lanes:
        print("no lanes to run")
        return 2
    print("lanes: %s" % ", ".join(lane.label for lane in lanes), flush=True)

    # Install the test server once, before parallel runs need it.
    if any(lane.kind == "pouchdb" for lane in lanes):
        import pouchdb
        pouchdb.install()

    workdir = tempfile.mkdtemp(prefix="picas-tests-")
    results = {}
    pending = list(lanes)
    running = []
    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                lane = pending.pop(0)
                thread = threading.Thread(target=run_one, args=(
                    lane, args.pytest_args, workdir, results))
                thread.start()
                running.append((lane, thread))
            for lane, thread in list(running):
                if not thread.is_alive():
                    running.remove((lane, thread))
                    report(lane, results[lane], args.pytest_args)
            time.sleep(0.2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    total = dict.fromkeys(["passed", "failed", "skipped", "error", "xfailed", "xpassed"], 0)
    bad = []
    print()
    print("summary:")
    for lane in lanes:
        code, counts, output, seconds = results[lane]
        for key in total:
            total[key] += counts[key]
        ok = lane_ok(code, counts, args.pytest_args)
        if not ok:
            bad.append(lane.label)
        print("  %-22s %-6s %4d passed, %d failed, %d skipped%s in %4.0f s  [%s]"
              % (lane.label, "ok" if ok else "FAILED", counts["passed"],
                 counts["failed"] + counts["error"], counts["skipped"], expected(counts),
                 seconds, server_of(lane, output)))
    print("lanes: %d, failing: %s" % (len(lanes), ", ".join(bad) or "none"))
    failed = total["failed"] + total["error"] + (len(bad) if not total["failed"] + total["error"] else 0)
    print("%d passed, %d failed, %d skipped%s" % (total["passed"], failed, total["skipped"],
                                                  expected(total)))
    print("total time: %.0f s" % (time.time() - started))
    return 1 if bad else 0


def expected(counts):
    """", N xfailed, N xpassed" when there are tests marked as known failures."""
    return "".join(", %d %s" % (counts[k], k) for k in ("xfailed", "xpassed") if counts[k])


def lane_ok(code, counts, pytest_args):
    """A lane passes when pytest succeeded and ran something (or, with -k and
    the like, selected nothing in that lane: exit status 5)."""
    if code == 5 and pytest_args:
        return True
    return code == 0 and counts["passed"] > 0


def server_of(lane, output):
    """The server a lane ran against, from the report header conftest.py prints."""
    prefix = "CouchDB cluster for tests:" if lane.key == "cluster" else "CouchDB for tests:"
    for line in output.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return "?"


def report(lane, result, pytest_args):
    code, counts, output, seconds = result
    status = "ok" if lane_ok(code, counts, pytest_args) else "FAILED (exit %d)" % code
    print("%-22s %-16s %4d passed, %d failed, %d errors, %d skipped%s in %.0f s  [%s]"
          % (lane.label, status, counts["passed"], counts["failed"], counts["error"],
             counts["skipped"], expected(counts), seconds, server_of(lane, output)), flush=True)
    if status != "ok":
        print("---- output of %s " % lane.label + "-" * 50)
        print(output[-20000:])
        print("-" * 72, flush=True)


if __name__ == "__main__":
    sys.exit(main())
