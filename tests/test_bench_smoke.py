"""bench/bench.py must keep working: run it with tiny numbers and without upstream.

The real benchmark (minutes, with upstream picas from PyPI) is described in
docs/performance.md; this only makes sure the script runs end to end, prints
its table, writes its JSON, and that picas.py ran every token exactly once.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")


def test_bench_quick_runs_and_prints_the_table(tmp_path):
    out_json = str(tmp_path / "bench.json")
    # The suite's lane on a real CouchDB benchmarks on one too (a node of its own).
    on_couchdb = os.environ.get("PICAS_TEST_SERVER", "").lower() == "couchdb"
    started = time.time()
    # A session of its own, so that a timeout can stop the server and pilots it started too.
    proc = subprocess.Popen(
        [sys.executable, BENCH, "--quick", "--no-upstream", "--json", out_json]
        + (["--couchdb"] if on_couchdb else []),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("bench.py --quick took too long:\n%s\n%s" % (stdout, stderr))
    elapsed = time.time() - started
    assert proc.returncode == 0, "bench.py failed:\n%s\n%s" % (stdout, stderr)
    for text in ("(1) one pilot", "(6) ceiling", "(2) 4 concurrent pilots", "(3) start-up",
                 "(4)+(5) idle endless pilot", "targets",
                 "upstream picas was NOT measured (--no-upstream)"):
        assert text in stdout, "%r missing from the output:\n%s" % (text, stdout)
    with open(out_json) as fh:
        results = json.load(fh)
    for part in ("meta", "ceiling", "single", "concurrent", "startup", "idle"):
        assert part in results
    assert results["meta"]["server"] == ("CouchDB" if on_couchdb else "pouchdb-server")
    single = results["single"]["picas.py"]
    assert single["direct"]["states"].get("done") == single["direct"]["tokens"]
    assert single["proxied"]["per_token"] > 0
    for pilots, entry in results["concurrent"].items():
        run = entry["picas.py"]
        assert run["max_executions"] == 1, (pilots, run)
        assert run["tokens_run_more_than_once"] == 0 and run["tokens_never_run"] == 0, run
        assert run["failed_pilots"] == 0, run
    assert "upstream" not in results["single"]
    assert elapsed < 60 or os.getloadavg()[0] > 2 * (os.cpu_count() or 1), \
        "bench.py --quick took %.0f s (limit 60)" % elapsed


def test_the_token_cost_probe_measures_both_workloads(couch, tmp_path):
    """bench/probes/token_cost.py (docs/performance.md, issue 17) runs end to end: bare PUTs and
    picas.py pilots over the same number of tokens, server CPU read from /proc, no password out."""
    if not couch.ours:
        pytest.skip("the probe reads the server's CPU from /proc: a server the tests started")
    secret = tmp_path / "password"
    secret.write_text(couch.password)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "probes", "token_cost.py"), "--url",
         couch.url, "--user", couch.username, "--password-file", str(secret),
         "--tokens", "24", "--pilots", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)        # its writers and pilots too
        stdout, stderr = proc.communicate()
        raise AssertionError("token_cost.py took too long:\n%s\n%s" % (stdout, stderr))
    assert proc.returncode == 0, stdout + stderr
    assert couch.password not in stdout + stderr
    out = json.loads(stdout)
    assert out["tokens"] == 24 and out["pilots"] == 2 and "idle_reached" in out
    for part in ("bare_put", "picas_token"):
        assert out[part]["per_s"] > 0 and out[part]["wall_ms"] > 0, out
        assert out[part]["server_cpu_during_ms"] > 0 and out[part]["server_busy"] > 0, out
    assert out["picas_token"]["pilot_and_task_cpu_ms"] > 0 and out["start_true_ms"] > 0, out
