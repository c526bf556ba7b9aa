"""Upstream picasclient's own unit tests, run against picas.py.

The 39 tests live in ../shared/upstream-tests (or $PICAS_UPSTREAM_TESTS); they
are never copied into this repository. They are copied to a temporary folder
next to a stub ``couchdb/http.py`` (which exports picas.py's error classes
under python-couchdb's names) and run by pytest in a subprocess, with
picas.py importable as ``picas``. They use upstream's own in-memory test
double (``MockDB``), never a server.

Every failure must be one of EXPECTED_FAILURES: deliberate differences, each
listed in the README's "Coming from picas" section.
"""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

from helpers import ROOT

#: Upstream tests that fail on purpose, and why (the README says the same).
EXPECTED_FAILURES = {
    "test_document.py::TestTask::test_error":
        "Task.error() keeps the lock and done times, sets a non-zero exit code (upstream: 99/99)",
    "test_modifiers.py::TestModifier::test_seterror":
        "BasicTokenModifier.set_error() does what Task.error() does (upstream: 99/99)",
    "test_actors.py::TestHandler::test_signal_handling":
        "a stop signal ends the pilot with exit status 128 + N (upstream: 0)",
}
UPSTREAM_TOTAL = 39

#: What upstream's tests import from python-couchdb.
STUB_COUCHDB_HTTP = '''\
"""Stub of python-couchdb's couchdb.http for upstream's tests: picas.py's errors."""
from picas import (HTTPError, PreconditionFailed, ResourceConflict, ResourceNotFound,
                   ServerError, Unauthorized)
'''

#: Batch-system variables: upstream's test_jobid sets them itself.
JOB_VARIABLES = ("DIRACJOBID", "GLITE_WMS_JOBID", "CREAM_JOBID", "PBS_JOBID", "SLURM_JOB_ID",
                 "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "_CONDOR_JOB_AD")


def upstream_tests_folder():
    """The folder holding upstream's test_*.py files, or None when it is not there."""
    base = os.environ.get("PICAS_UPSTREAM_TESTS") or os.path.join(
        os.path.dirname(ROOT), "shared", "upstream-tests")
    for folder in (os.path.join(base, "tests"), base):
        if os.path.isfile(os.path.join(folder, "test_mock.py")):
            return folder
    return None


def run_upstream_suite(work):
    """Run upstream's tests from a copy in ``work``; return {test id: outcome} and the output."""
    source = upstream_tests_folder()
    tests = os.path.join(str(work), "tests")
    shutil.copytree(source, tests)
    stub = os.path.join(str(work), "couchdb")
    os.makedirs(stub)
    with open(os.path.join(stub, "__init__.py"), "w") as fh:
        fh.write('"""Stub of python-couchdb for upstream\'s tests."""\n')
    with open(os.path.join(stub, "http.py"), "w") as fh:
        fh.write(STUB_COUCHDB_HTTP)
    with open(os.path.join(tests, "pytest.ini"), "w") as fh:
        fh.write("[pytest]\n")             # the copy is its own rootdir: none of our settings
    report = os.path.join(str(work), "report.xml")
    env = dict((k, v) for k, v in os.environ.items()
               if k not in JOB_VARIABLES and not k.startswith("PICAS_"))
    env["PYTHONPATH"] = os.pathsep.join([str(work), ROOT])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
         "--junitxml", report, "."],
        cwd=tests, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    output = proc.stdout.decode("utf-8", "replace")
    assert os.path.exists(report), "upstream's suite did not run:\n" + output
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        test_id = "%s.py::%s::%s" % (module.replace(".", "/"), cls, case.get("name"))
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[test_id] = "failed"
        elif case.find("skipped") is not None:
            outcomes[test_id] = "skipped"
        else:
            outcomes[test_id] = "passed"
    return outcomes, output


@pytest.fixture(scope="module")
def upstream_results(tmp_path_factory):
    if upstream_tests_folder() is None:
        pytest.skip("upstream's tests are not there (../shared/upstream-tests or "
                    "$PICAS_UPSTREAM_TESTS)")
    return run_upstream_suite(tmp_path_factory.mktemp("upstream"))


def test_upstream_suite_passes_but_for_the_documented_differences(upstream_results):
    outcomes, output = upstream_results
    failed = sorted(t for t, outcome in outcomes.items() if outcome == "failed")
    passed = [t for t, outcome in outcomes.items() if outcome == "passed"]
    summary = output[-6000:]
    assert len(outcomes) == UPSTREAM_TOTAL, summary
    assert failed == sorted(EXPECTED_FAILURES), summary
    assert len(passed) == UPSTREAM_TOTAL - len(EXPECTED_FAILURES) >= 36, summary


def test_every_expected_failure_is_a_difference_the_readme_lists():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = re.search(r"^## Coming from picas\n(.*?)^## ", readme, re.S | re.M).group(1)
    for test_id in EXPECTED_FAILURES:
        assert "`%s`" % test_id in section, test_id


def test_upstream_tests_are_not_copied_into_the_repository():
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", "node_modules")]
        names.update(files)
    assert not names & {"test_mock.py", "test_actors.py", "test_iterators.py", "test_jobid.py"}
