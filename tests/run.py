#!/usr/bin/env python3
"""Run the whole test suite on every CPython 3.6-3.13 this machine has.

    python3 tests/run.py                 # every interpreter pyenv has (3.6 ... 3.13)
    python3 tests/run.py --python 3.6    # only some (by version prefix)
    python3 tests/run.py -- -k claim -x  # arguments after -- go to pytest

For each interpreter it creates a throw-away virtual environment, installs the
newest pytest that interpreter supports from PyPI, and runs ``pytest tests``
there (each run starts its own in-memory pouchdb-server; see conftest.py). Two
interpreters run at a time. The last line is the total: ``N passed, N failed``.
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
    counts = dict.fromkeys(["passed", "failed", "skipped", "error"], 0)
    lines = [l for l in output.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    if lines:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] += int(number)
    return counts


def run_one(version, python, pytest_args, workdir, results):
    venv = os.path.join(workdir, "venv-" + version)
    log_path = os.path.join(workdir, "pytest-%s.log" % version)
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
            code = step([vpy, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs",
                         "--durations=5", os.path.join(ROOT, "tests")] + pytest_args,
                        cwd=ROOT, env=env)
    with open(log_path) as fh:
        output = fh.read()
    counts = summarize(output)
    results[version] = (code, counts, output, time.time() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[],
                        help="only this version (3.6, 3.13 ...); repeatable")
    parser.add_argument("--jobs", type=int, default=2, help="interpreters run at once (2)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    interpreters = find_interpreters([v for vs in args.python for v in vs.split(",")])
    print("testing picas.py on: %s" % ", ".join(
        "%s (%s)" % (v, p) for v, p in interpreters.items()), flush=True)

    # Install the test server once, before parallel runs need it.
    sys.path.insert(0, os.path.join(HERE, "server"))
    if not os.environ.get("PICAS_TEST_COUCHDB_URL"):
        import pouchdb
        pouchdb.install()

    workdir = tempfile.mkdtemp(prefix="picas-tests-")
    results = {}
    pending = list(interpreters.items())
    running = []
    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                version, python = pending.pop(0)
                thread = threading.Thread(target=run_one, args=(
                    version, python, args.pytest_args, workdir, results))
                thread.start()
                running.append((version, thread))
            for version, thread in list(running):
                if not thread.is_alive():
                    running.remove((version, thread))
                    report(version, results[version])
            time.sleep(0.2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    total = dict.fromkeys(["passed", "failed", "skipped", "error"], 0)
    bad = []
    for version in interpreters:
        code, counts, _, _ = results[version]
        for key in total:
            total[key] += counts[key]
        if code != 0 or counts["passed"] == 0:
            bad.append(version)
    print()
    print("interpreters: %d, failing: %s" % (len(interpreters), ", ".join(bad) or "none"))
    failed = total["failed"] + total["error"] + (len(bad) if not total["failed"] + total["error"] else 0)
    print("%d passed, %d failed, %d skipped" % (total["passed"], failed, total["skipped"]))
    return 1 if bad else 0


def report(version, result):
    code, counts, output, seconds = result
    status = "ok" if code == 0 and counts["passed"] else "FAILED (exit %d)" % code
    server = [l for l in output.splitlines() if l.startswith("CouchDB for tests:")]
    print("Python %-5s %-16s %4d passed, %d failed, %d errors, %d skipped in %.0f s%s"
          % (version, status, counts["passed"], counts["failed"], counts["error"],
             counts["skipped"], seconds, "  [%s]" % server[0][19:] if server else ""),
          flush=True)
    if status != "ok":
        print("---- output of Python %s " % version + "-" * 50)
        print(output[-20000:])
        print("-" * 72, flush=True)


if __name__ == "__main__":
    sys.exit(main())
