"""What a claim costs the server, and that the cheap paths never cost correctness (issue 17).

The claim path asks CouchDB for the view index as it stands (``update=lazy``),
reads far windows as ids and then documents, and reads the next window while a
claimed token waits, so that each result can carry the next lock. These tests
count the requests through tests/faultserver.py and check what the cheap paths
must never do: conclude "empty" from a stale index, or leave the token they
hold locked when the pilot is stopped during the read made ahead.
"""
import signal
import time

import pytest

import picas
from helpers import ensure_views, make_tokens, states, wait_for
from test_faults import Pilot, proxy  # noqa: F401


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


def no_autoupdate(db):
    """Keep CouchDB's background indexer (ken) off the Monitor views, so that the index is
    brought up to date only by the reads of the test: a stale index stays stale."""
    design = db.get("_design/Monitor")
    design["autoupdate"] = False
    db.save(design)


@pytest.fixture(autouse=True)
def _no_pilot_left():
    yield
    while Pilot.started:
        Pilot.started.pop().kill()


def token_requests(fs):
    return [r for r in fs.requests if "/_local/" not in r.path]


def claim_all(claimer):
    """Claim until the claimer finds the view empty; the tokens it got, in order."""
    got = []
    token = claimer.claim()
    while token is not None:
        got.append(token)
        token = claimer.claim()
    return got


def test_one_pilot_makes_at_most_1_2_requests_per_token(couch, tdb, proxy, tmp_path):
    """`run` over 40 tokens: one write per token, plus the first read, the first lock, the
    read ahead that finds the view empty, the last result alone and the final look."""
    make_tokens(tdb, ["x%d" % i for i in range(40)])
    fs = proxy()
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", "true"], url=fs.url,
                  cwd=tmp_path)
    assert pilot.wait() == 0, pilot.err
    assert set(states(tdb).values()) == {"done"}
    made = token_requests(fs)
    kinds = [(r.method, r.path.split("?")[0].rsplit("/", 1)[-1]) for r in made]
    assert ("HEAD", tdb.name) not in kinds                  # the first read checks the database
    assert len(made) <= 1.2 * 40, kinds
    assert sum(1 for r in made if r.method == "POST" and r.path.endswith("/_bulk_docs")) == 39


def test_a_token_missing_from_a_stale_index_is_still_found(couch, tdb):
    """Tokens written after the index was last brought up to date are not in a lazy read;
    the claimer must not take that for an empty view."""
    no_autoupdate(tdb)
    make_tokens(tdb, ["first"])
    claimer = picas._Claimer(tdb, "todo")
    assert claimer.claim() is not None          # a first read is up to date: 1 token
    tdb.view("Monitor/todo")                    # no index update left running
    ids = make_tokens(tdb, ["x%d" % i for i in range(20)], prefix="late")
    if couch.kind != "pouchdb-server":
        # CouchDB: the index has not taken them in (pouchdb-server ignores update=false).
        stale = tdb.view("Monitor/todo", update="false")["rows"]
        assert not [r for r in stale if r["id"] in ids], "index up to date: proves nothing"
    claimer._fresh_next = False               # as after a read that found candidates: lazy next
    assert sorted(t["_id"] for t in claim_all(claimer)) == sorted(ids)


def test_rows_of_a_stale_index_are_passed_over_not_locked(couch, tdb):
    """A lazy read shows tokens another pilot has taken since: they are checked on the
    returned document and passed over, never locked again."""
    no_autoupdate(tdb)
    make_tokens(tdb, ["a", "b", "c", "d"])
    tdb.view("Monitor/todo")                                 # index up to date: 4 todo
    rival = picas.TaskViewIterator(tdb, "todo")
    taken = [next(rival)["_id"] for _ in range(3)]           # lone locks: no lazy read yet
    if couch.kind != "pouchdb-server":
        stale = tdb.view("Monitor/todo", update="false")["rows"]
        assert len(stale) == 4, "the index already left the taken tokens out: proves nothing"
    claimer = picas._Claimer(tdb, "todo")
    claimer._fresh_next = False                              # a lazy first read
    token = claimer.claim()
    assert token is not None and token["_id"] not in taken
    assert claimer.claim() is None
    assert claimer.stats.conflicts == 0
    if couch.kind != "pouchdb-server":
        assert claimer.stats.skipped >= 3                    # the stale rows, passed over
    for tid in taken:
        assert tdb.get(tid)["pilot_id"] == rival.pilot_id


def test_a_far_window_is_read_as_ids_then_documents(couch, tdb, proxy):
    """Past ``far_skip`` the window comes from a view read without documents and one
    ``_all_docs`` read: every candidate is the current document, a deleted one is passed over."""
    ids = make_tokens(tdb, ["x%d" % i for i in range(60)])
    fs = proxy()
    db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    tdb.view("Monitor/todo")                                 # index up to date: 60 todo
    gone = tdb.get(ids[30])
    tdb.delete(gone)                                         # a lazy read may still show it
    claimer = picas._Claimer(db, "todo")
    claimer.far_skip = 1
    claimer._total = 60
    claimer._fresh_next = False
    got = claim_all(claimer)
    for token in got:
        stored = tdb.get(token["_id"])
        assert stored["pilot_id"] == claimer.pilot_id and stored["_rev"] == token["_rev"]
    assert sorted(t["_id"] for t in got) == sorted(i for i in ids if i != ids[30])
    reads = [r.path for r in fs.requests if r.method == "POST" and "/_all_docs" in r.path]
    assert reads, [r.path for r in fs.requests]
    assert any("include_docs=false" in r.path for r in fs.requests if "/_view/" in r.path)


def test_a_server_refusing_update_lazy_is_read_the_usual_way(couch, tdb, proxy):
    """CouchDB 1.x answers update=lazy with 400: the claimer stops asking and claims on."""
    make_tokens(tdb, ["x%d" % i for i in range(70)])         # more than the first 64 rows

    def no_lazy(fs, request):
        if "update=lazy" in request.path:
            return ("json", 400, {"error": "query_parse_error",
                                  "reason": "Invalid value for `update`."})
        return ("proxy",)
    fs = proxy(default=no_lazy)
    db = picas.Server(fs.url, couch.username, couch.password).database(tdb.name)
    actor = picas.CommandActor(db, ["true"], heartbeat=0)
    actor.run()
    assert actor.tasks_processed == 70
    lazy = [r for r in fs.requests if "update=lazy" in r.path]
    assert len(lazy) == 1                                   # asked once, then never again


@pytest.mark.faults
def test_a_stop_during_the_read_ahead_gives_the_held_token_back(couch, tdb, proxy, tmp_path):
    """The read ahead runs while a claimed token waits; the server hangs it and the pilot
    gets SIGTERM: the token it holds goes back to todo, it is not left locked."""
    make_tokens(tdb, ["a"])
    reads = []

    def hang_read_ahead(fs, request):
        if "/_view/" in request.path:
            reads.append(request.path)
            if len(reads) == 2:                             # the first read, then the one ahead
                return ("sleep", 30, ("proxy",))
        return ("proxy",)
    fs = proxy(default=hang_read_ahead)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "0", "--", "true"], url=fs.url,
                  cwd=tmp_path)
    assert wait_for(lambda: len(reads) >= 2, 30), pilot.err
    assert picas.token_state(tdb.get("t-1")) == "locked"
    pilot.send(signal.SIGTERM)
    started = time.time()
    code = pilot.wait(60)
    assert time.time() - started < picas.STOP_BUDGET + 5
    doc = tdb.get("t-1")
    # Never left locked. Normally the stop comes during the read (1.5 s): back to todo; on a
    # machine so slow that the read had already timed out, the token ran and is done.
    assert picas.token_state(doc) in ("todo", "done"), doc
    if picas.token_state(doc) == "todo":
        assert code == 128 + signal.SIGTERM, pilot.err
