"""Exactly-once on a real CouchDB cluster: racing pilots, real splits, a degraded cluster.

Three nodes of Apache CouchDB 3.4.3 (n=3 copies of every document, q=2
shards, write quorum 2), from the ``cluster`` fixture (conftest.py): started
from the shared build with ``PICAS_TEST_CLUSTER=1``, or the user's nodes from
``PICAS_TEST_CLUSTER_URLS``; skipped otherwise. tests/run.py runs this file
in a lane of its own. Nothing here is simulated: 202 answers come from writes
that really missed their quorum (racing writers, stopped nodes), conflicts
from real races through different nodes (and, to be sure to have some, from
``_bulk_docs`` with ``new_edits=false`` sent through the nodes).

A read served by a copy that has not caught up yet may show an older
revision, so every assertion on the database's state reads again for a few
seconds before it fails (:func:`eventually`).
"""
import collections
import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest

import picas
from helpers import executions, pilot_cmd

#: Seconds an assertion on the cluster's state is retried before it fails.
SETTLE = 20.0
#: Heartbeat interval of the pilots here, and the lease that declares their locks dead.
HEARTBEAT, LEASE = 2, 5


def eventually(check, timeout=SETTLE, interval=0.25):
    """Call ``check()`` until it stops raising AssertionError; return its value.

    After ``timeout`` seconds the last AssertionError is raised.
    """
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > deadline:
                raise
        time.sleep(interval)


def task_script(path, log):
    """A task that appends ``<token id> <pilot pid>`` to ``log`` (one line per execution)."""
    path.write_text('#!/bin/sh\necho "$2 $PPID" >> %s\n' % log)
    path.chmod(0o755)
    return str(path)


def ran(log):
    """Token ids in the execution log, one per execution."""
    return [line.split()[0] for line in executions(str(log))]


def cli(cluster, node, dbname, *args, **kwargs):
    """Run ``python picas.py ARGS`` through ``node``; return (status, stdout, stderr)."""
    proc = subprocess.run(pilot_cmd(*args), env=cluster.env(node, dbname),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=kwargs.get("timeout", 120))
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


class Pilot(object):
    """A ``python picas.py run`` process through one node; its output goes to files
    (a pilot that logs a lot must never block on a full pipe)."""

    def __init__(self, cluster, node, dbname, task, *options):
        self.out = os.path.join(os.path.dirname(task), "pilot-%s.log" % uuid.uuid4().hex[:8])
        with open(self.out, "wb") as fh:
            self.proc = subprocess.Popen(
                pilot_cmd("run", "--heartbeat", str(HEARTBEAT), *options) + ["--", task],
                env=cluster.env(node, dbname), stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.pid = self.proc.pid

    def output(self):
        with open(self.out, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


start_pilot = Pilot


def finish(pilots, timeout=300):
    """Wait for pilots; return [(status, output)]. Kills them all on a timeout."""
    deadline = time.time() + timeout
    try:
        for pilot in pilots:
            pilot.proc.wait(max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for pilot in pilots:
            pilot.kill()
        raise AssertionError("pilots still running after %d s" % timeout)
    return [(pilot.proc.returncode, pilot.output()) for pilot in pilots]


def tokens(db, ids=None):
    """id -> token document (the winning revision), read through ``db``'s node."""
    rows = db.all_docs(include_docs=True, conflicts=True)["rows"]
    docs = dict((r["id"], r["doc"]) for r in rows if r.get("doc") and r["doc"].get("type") == "token")
    return docs if ids is None else dict((i, docs.get(i)) for i in ids)


def states(db, ids):
    return dict((i, picas.token_state(d) if d else None) for i, d in tokens(db, ids).items())


def all_done(db, ids):
    def check():
        found = states(db, ids)
        assert set(found.values()) == {"done"}, collections.Counter(found.values())
        return found
    return eventually(check)


def make_database(cluster):
    """A new token database on the cluster with picas.py's views; visible on every node."""
    name = "picas-cluster-%s" % uuid.uuid4().hex[:12]
    cluster.servers[0].create_database(name)
    for server in cluster.servers:
        eventually(lambda: assert_exists(server.database(name)))
    status, _, err = cli(cluster, 0, name, "views")
    assert status == 0, err
    return name


def assert_exists(db):
    assert db.exists()


def push(cluster, dbname, count, prefix="t"):
    db = cluster.servers[0].database(dbname)
    report = picas.push_tokens(db, lines=["input %d" % i for i in range(count)], id_prefix=prefix)
    assert report["failed"] == 0, report
    ids = ["%s-%d" % (prefix, i) for i in range(1, count + 1)]
    for server in cluster.servers:       # every node's copies have them before pilots start
        node_db = server.database(dbname)
        eventually(lambda: _assert_todo(node_db, ids))
    return ids


def _assert_todo(db, ids):
    assert set(states(db, ids).values()) == {"todo"}


@pytest.fixture
def cdb(cluster):
    """The name of a fresh token database on the cluster (deleted afterwards)."""
    name = make_database(cluster)
    yield name
    try:
        cluster.servers[0].delete_database(name)
    except picas.PicasError:
        pass


def test_the_cluster_is_three_nodes_with_three_copies(cluster, cdb):
    assert len(cluster) == 3
    info = cluster.servers[0].database(cdb).info()
    assert info["cluster"]["n"] == 3 and info["cluster"]["q"] == 2, info["cluster"]
    for server in cluster.servers:
        members = server.request("GET", "/_membership")[2]
        assert len(members["cluster_nodes"]) == 3 and len(members["all_nodes"]) == 3, members


# (a) Racing pilots on three nodes ############################################

def test_racing_pilots_on_three_nodes_run_every_token_exactly_once(cluster, cdb, tmp_path):
    ids = push(cluster, cdb, 60)
    log = tmp_path / "ran"
    task = task_script(tmp_path / "task.sh", log)
    pilots = [start_pilot(cluster, i % 3, cdb, task) for i in range(6)]     # 2 per node
    results = finish(pilots)
    accepted = sum(err.count("not 201: not a claim") for _, err in results)
    for status, err in results:
        assert status in (picas.EXIT_OK, picas.EXIT_NO_WORK), err[-3000:]
    first = collections.Counter(ran(log))
    assert max(first.values()) == 1, [i for i, n in first.items() if n > 1]
    # Every writer of a three-way race answered 202 leaves a token nobody
    # runs, locked: it must be one nobody ran, and `reset --stale` frees it.
    orphans = sorted(set(ids) - set(first))
    print("lock writes answered 202: %d; tokens nobody ran: %s" % (accepted, orphans or "none"))
    if orphans:
        db = cluster.servers[1].database(cdb)
        assert set(states(db, orphans).values()) == {"locked"}, (orphans, accepted)
        time.sleep(LEASE + 1)
        status, out, err = cli(cluster, 1, cdb, "reset", "locked", "--stale", "--lease",
                               str(LEASE), "--yes")
        assert status == 0, err
        assert finish([start_pilot(cluster, 2, cdb, task)])[0][0] == picas.EXIT_OK
    runs = collections.Counter(ran(log))
    assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}, (runs, accepted)
    for server in cluster.servers:
        all_done(server.database(cdb), ids)


# (b) Split tokens from real races: reported and repaired #######################

def stale_lock_body(doc, racer):
    """A lock of ``doc`` by a pilot that died long ago, unique to ``racer``."""
    then = int(time.time()) - 10000
    return dict(doc, lock=then, heartbeat=then, heartbeat_interval=60,
                pilot_id="racer-%s" % racer, claim_id=uuid.uuid4().hex)


def race(cluster, dbname, doc_id):
    """Three writers lock ``doc_id`` on the same revision at once, one through each node.

    Returns the HTTP statuses (201, 202, or 409 for a lost compare-and-set).
    """
    dbs = [cluster.server(i, retries=0).database(dbname) for i in range(3)]
    doc = dbs[0].get(doc_id)
    barrier = threading.Barrier(3)
    statuses = [None] * 3

    def write(i):
        body = stale_lock_body(doc, i)
        barrier.wait()
        try:
            statuses[i] = dbs[i].request("PUT", "/" + doc_id, body=body)[0]
        except picas.Conflict:
            statuses[i] = 409
    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def plant_split(cluster, dbname, doc_id, leaves=3):
    """Give ``doc_id`` ``leaves`` stale locks as conflicting revisions, each sent through
    another node with ``new_edits=false`` (what a split leaves behind)."""
    base = cluster.servers[0].database(dbname).get(doc_id)
    number, rev_hash = base["_rev"].split("-", 1)
    for i in range(leaves):
        leaf = stale_lock_body(base, "planted-%d" % i)
        leaf_hash = uuid.uuid4().hex
        leaf["_rev"] = "%d-%s" % (int(number) + 1, leaf_hash)
        leaf["_revisions"] = {"start": int(number) + 1, "ids": [leaf_hash, rev_hash]}
        cluster.servers[i % 3].database(dbname).update([leaf], new_edits=False)


def test_split_tokens_from_real_races_are_reported_and_repaired(cluster, cdb, tmp_path):
    ids = push(cluster, cdb, 30)
    db = cluster.servers[0].database(cdb)
    outcomes = {}
    for doc_id in ids[:-2]:
        outcomes[doc_id] = race(cluster, cdb, doc_id)
        if sum(1 for s in outcomes.values() if s.count(409) < 2) >= 4:
            break                      # enough splits (201 + 202, or three 202s)
    raced = sorted(outcomes)
    planted = ids[-2:]
    for doc_id in planted:
        plant_split(cluster, cdb, doc_id)
    # A 202 next to a 201 (or three 202s) is a real split: two live revisions.
    expected_leaves = dict((i, 3 - s.count(409)) for i, s in outcomes.items())
    expected_leaves.update((i, 3) for i in planted)
    split = sorted(i for i, n in expected_leaves.items() if n > 1)
    assert set(split) - set(planted), "no race split a token: %r" % outcomes

    def leaves_are_there():
        found = dict((i, len(db.live_leaves(i))) for i in expected_leaves)
        assert found == expected_leaves, (found, outcomes)
    eventually(leaves_are_there)

    def reported():
        status, out, err = cli(cluster, 2, cdb, "status")
        assert status == 0, err
        assert "CONFLICTED %d " % len(split) in out, (out, split)
        return out
    out = eventually(reported)
    assert "locked %d " % len(expected_leaves) in out, out

    status, out, err = cli(cluster, 1, cdb, "reset", "locked", "--stale", "--yes")
    assert status == 0, err
    removed = sum(expected_leaves.values()) - len(expected_leaves)
    assert "reset %d stale tokens to todo" % len(expected_leaves) in out, (out, expected_leaves)
    assert "removed %d conflicting revisions" % removed in out, (out, expected_leaves)

    def repaired():
        for doc_id in expected_leaves:
            leaves = db.live_leaves(doc_id)
            assert len(leaves) == 1, (doc_id, leaves)
            doc = db.get(doc_id, conflicts=True)
            assert picas.token_state(doc) == "todo" and "_conflicts" not in doc, doc
            assert doc["scrub_count"] == 1 and "pilot_id" not in doc, doc
    eventually(repaired)
    status, out, err = eventually(lambda: _no_conflicts_reported(cluster, cdb))
    # The repaired tokens run like the others: each exactly once.
    log = tmp_path / "ran"
    task = task_script(tmp_path / "task.sh", log)
    results = finish([start_pilot(cluster, i, cdb, task) for i in range(3)])
    assert all(code in (picas.EXIT_OK, picas.EXIT_NO_WORK) for code, _ in results), results
    runs = collections.Counter(ran(log))
    assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}, runs
    all_done(db, ids)


def _no_conflicts_reported(cluster, dbname):
    status, out, err = cli(cluster, 0, dbname, "status")
    assert status == 0 and "CONFLICTED" not in out and "todo " in out, (out, err)
    return status, out, err


# (c) A degraded cluster: two of three nodes down ##############################

#: Seconds the cluster stays degraded while the pilot runs.
OUTAGE = 20.0
#: Seconds the pilot started during the outage gets, after the healing, to finish by itself.
AFTER_HEALING = 150.0


class Degraded(object):
    """What happened in :func:`degraded`: one run of the scenario, checked by several tests."""


@pytest.fixture(scope="module")
def degraded(cluster, tmp_path_factory):
    """Stop two nodes, start a pilot through the third, heal the cluster, finish the work.

    1. 10 tokens; nodes 2 and 3 stopped: every write is answered 202.
    2. A pilot (``picas.py run``) through node 1 for OUTAGE s; the tokens it
       locked and ran are sampled all along.
    3. The nodes start again; the pilot gets AFTER_HEALING s to end by itself.
    4. If tokens stay locked (a pilot that took its 202 locks for nothing
       leaves them so), ``reset locked --stale --lease S`` frees them, and
       two pilots (nodes 2 and 3) run what is left.
    """
    if not cluster.can_stop:
        pytest.skip("an external cluster's nodes are not ours to stop")
    tmp = tmp_path_factory.mktemp("degraded")
    name = make_database(cluster)
    d = Degraded()
    d.ids = push(cluster, name, 10)
    d.log = tmp / "ran"
    task = task_script(tmp / "task.sh", d.log)
    db = cluster.server(0, retries=0).database(name)
    try:
        cluster.stop(1)
        cluster.stop(2)
        d.direct_put = db.request("PUT", "/not-a-token", body={"probe": 1})[0]
        d.direct_bulk = db.request("POST", "/_bulk_docs",
                                   body={"docs": [{"_id": "not-a-token-either"}]})[0]
        pilot = start_pilot(cluster, 0, name, task)
        d.pilot_pid = pilot.pid
        d.locked_samples = []
        d.ran_during_outage = []
        end = time.time() + OUTAGE
        while time.time() < end:
            docs = tokens(db, d.ids)
            mine = sorted(i for i, doc in docs.items() if doc and picas.token_state(doc) == "locked"
                          and str(doc.get("pilot_id", "")).split(":")[1:2] == [str(pilot.pid)])
            d.locked_samples.append(mine)
            time.sleep(0.5)
        d.ran_during_outage = ran(d.log)
        d.pilot_ended_during_outage = pilot.proc.poll()
    finally:
        cluster.heal()
    healed = time.time()
    try:
        pilot.proc.wait(AFTER_HEALING)
        d.pilot_status = pilot.proc.returncode
    except subprocess.TimeoutExpired:
        pilot.proc.terminate()            # a pilot stopped by SIGTERM gives its token back
        try:
            pilot.proc.wait(60)
        finally:
            pilot.kill()
        d.pilot_status = "still running %d s after the healing: stopped" % AFTER_HEALING
    d.pilot_output = pilot.output()
    d.pilot_ran = ran(d.log)
    d.pilot_done_after = time.time() - healed
    # Repair what the pilot left locked, then finish the work.
    d.resets = []
    node = cluster.servers[1].database(name)
    if any(s == "locked" for s in states(node, d.ids).values()):
        time.sleep(LEASE + 1)
        for _ in range(5):
            status, out, err = cli(cluster, 1, name, "reset", "locked", "--stale", "--lease",
                                   str(LEASE), "--yes")
            d.resets.append((status, out, err))
            if not any(s == "locked" for s in states(node, d.ids).values()):
                break
            time.sleep(2)
    d.second = finish([start_pilot(cluster, i, name, task) for i in (1, 2)])
    d.runs = collections.Counter(ran(d.log))
    d.db = cluster.servers[2].database(name)
    pilot.kill()
    yield d
    try:
        cluster.servers[0].delete_database(name)
    except picas.PicasError:
        pass


def test_a_degraded_cluster_answers_every_write_202(degraded):
    assert degraded.direct_put == 202
    assert degraded.direct_bulk == 202


def test_a_pilot_on_a_degraded_cluster_runs_nothing_twice_and_loses_nothing(degraded):
    d = degraded
    why = ("pilot: %s; locked by it during the outage: %s; resets: %r; second pilots: %r"
           % (d.pilot_status, d.locked_samples[-1:], [r[1] for r in d.resets],
              [c for c, _ in d.second]))
    # No write was answered 201 during the outage, so nothing was claimed: nothing ran.
    assert d.ran_during_outage == [], why
    assert max(d.runs.values() or [1]) == 1, (d.runs, why)
    assert sorted(d.runs) == sorted(d.ids), (d.runs, why)
    for status, err in d.second:
        assert status in (picas.EXIT_OK, picas.EXIT_NO_WORK), err[-3000:]
    all_done(d.db, d.ids)
    for status, out, err in d.resets:
        assert status == 0, err


def test_a_pilot_on_a_degraded_cluster_holds_at_most_one_lock(degraded):
    """After a 202 the pilot claims nothing more and backs off as in an outage.

    It holds at most one uncertain lock (the one answered 202), and resolves
    it once writes are answered 201 again: its revision the only live leaf,
    it runs the token; otherwise it leaves it to ``reset --stale``.
    """
    most = max(len(sample) for sample in degraded.locked_samples)
    assert most <= 1, "the pilot held %d locks during the outage: %s" % (
        most, max(degraded.locked_samples, key=len))
