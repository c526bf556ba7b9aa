"""Exactly-once on a CouchDB cluster: only a 201 is a claim; split tokens are repaired.

A real cluster is not available here, so a proxy in front of the test server
answers 202 Accepted for chosen lock writes (what a cluster node says when the
write reached fewer copies than the quorum), and conflicting revisions are
planted with ``_bulk_docs`` and ``new_edits=false``, as a split leaves them.
"""
import time

import picas
from faultserver import FaultServer
from helpers import ensure_views, make_tokens, states


def accept_lock_writes_of(token_ids, seen):
    """A FaultServer action: forward every request; answer 202 to lock PUTs of ``token_ids``."""
    def action(fault, request):
        status, headers, body = fault.forward(request)
        doc_id = request.path.split("?")[0].rsplit("/", 1)[-1]
        if request.method == "PUT" and doc_id in token_ids and status == 201 \
                and b'"pilot_id"' in request.body:
            seen.append(doc_id)
            return ("raw", 202, body, dict(headers, **{"Content-Type": "application/json"}))
        return ("raw", status, body, headers)
    return action


def test_a_lock_answered_202_is_not_a_claim(couch, db):
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"])
    seen = []
    with FaultServer(upstream=couch.url, default=accept_lock_writes_of({"t-2"}, seen)) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        it = picas.TaskViewIterator(proxy_db, "todo")
        claimed = sorted(t["_id"] for t in it)
        puts_to_t2 = [r for r in proxy.requests if r.method == "PUT" and "/t-2" in r.path]
    assert seen == ["t-2"]
    assert claimed == ["t-1", "t-3"]                  # t-2 was never handed out
    assert it.stats.accepted == 1 and it.stats.claims == 2
    assert len(puts_to_t2) == 1                       # and never written to again
    # The 202 write did land (as on a cluster): the token is locked by nobody who runs it.
    assert states(db)["t-2"] == "locked"


def test_a_pilot_never_runs_a_token_it_got_202_for(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["a", "b"])
    seen = []
    log = tmp_path / "ran"
    with FaultServer(upstream=couch.url, default=accept_lock_writes_of({"t-1"}, seen)) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        actor = picas.CommandActor(proxy_db, ["sh", "-c", 'echo "$2" >> %s' % log, "sh"],
                                   heartbeat=0)
        actor.run()
    assert seen == ["t-1"]
    assert log.read_text().split() == ["t-2"]
    assert states(db) == {"t-1": "locked", "t-2": "done"}


def plant_split(db, token_id, leaves):
    """Give ``token_id`` several conflicting revisions (leaves), like a cluster split does."""
    base = dict(picas.TOKEN_DEFAULTS, _id=token_id, _rev="1-aaaa")
    docs = [base]
    for i, fields in enumerate(leaves):
        rev_hash = "b%03d" % i
        leaf = dict(base, **fields)
        leaf["_rev"] = "2-" + rev_hash
        leaf["_revisions"] = {"start": 2, "ids": [rev_hash, "aaaa"]}
        docs.append(leaf)
    db.update(docs, new_edits=False)


def stale_lock(pilot, age=10000):
    now = int(time.time())
    return {"lock": now - age, "heartbeat": now - age, "heartbeat_interval": 60,
            "pilot_id": pilot, "claim_id": pilot + "-claim"}


def test_status_reports_conflicted_tokens_and_stale_reset_repairs_them(couch, db, monkeypatch, capsys):
    monkeypatch.setenv("PICAS_HOST_URL", couch.url)
    monkeypatch.setenv("PICAS_DATABASE", db.name)
    monkeypatch.setenv("PICAS_USERNAME", couch.username)
    monkeypatch.setenv("PICAS_PASSWORD", couch.password)
    assert picas.main(["views"]) == 0
    # Three writers, all answered 202: nobody owns the token, it is locked and conflicted.
    plant_split(db, "split", [stale_lock("p1"), stale_lock("p2"), stale_lock("p3")])
    assert len(db.get("split", conflicts=True)["_conflicts"]) == 2
    capsys.readouterr()
    assert picas.main(["status"]) == 0
    assert "CONFLICTED 1" in capsys.readouterr().out
    assert picas.main(["reset", "locked", "--stale", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "reset 1 stale tokens" in out and "removed 2 conflicting revisions" in out
    doc = db.get("split", conflicts=True)
    assert picas.token_state(doc) == "todo" and "_conflicts" not in doc
    assert doc["scrub_count"] == 1 and "pilot_id" not in doc
    assert picas.main(["status"]) == 0
    assert "CONFLICTED" not in capsys.readouterr().out


def test_stale_reset_keeps_a_live_or_finished_leaf(couch, db):
    ensure_views(db)
    db.ensure_design(picas.CONFLICTS_DESIGN, picas.CONFLICTS_VIEWS)
    now = int(time.time())
    live = {"lock": now, "heartbeat": now, "heartbeat_interval": 60, "pilot_id": "live",
            "claim_id": "live-claim"}
    finished = {"lock": now - 50, "done": now, "exit_code": 0, "pilot_id": "fin",
                "claim_id": "fin-claim"}
    # Each split pairs a dead pilot's lock with a live lock or a result.
    plant_split(db, "live-split", [stale_lock("dead1"), live])
    plant_split(db, "done-split", [stale_lock("dead2"), finished])
    for doc_id in ("live-split", "done-split"):
        assert db.get(doc_id, conflicts=True).get("_conflicts")
    args = picas._build_parser().parse_args(["reset", "locked", "--stale", "--yes"])
    assert picas.cmd_reset(args, db) == 0
    live_doc = db.get("live-split", conflicts=True)
    done_doc = db.get("done-split", conflicts=True)
    assert live_doc["pilot_id"] == "live" and "_conflicts" not in live_doc
    assert picas.token_state(live_doc) == "locked"
    assert done_doc["pilot_id"] == "fin" and picas.token_state(done_doc) == "done"
    assert "_conflicts" not in done_doc


def test_two_claims_never_write_identical_revisions(couch, db):
    """Identical lock bodies give identical revisions on a cluster, hiding the conflict.

    Two claims of the same token by pilots with the same id, in the same
    second, must still send different bodies (claim_id), and only one wins.
    """
    ensure_views(db)
    make_tokens(db, ["a"])
    doc = db.get("t-1")
    with FaultServer(upstream=couch.url) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        first = picas._Claimer(proxy_db, "todo", pilot_id="same-pilot")
        second = picas._Claimer(proxy_db, "todo", pilot_id="same-pilot")
        a = first._lock(dict(doc))
        b = second._lock(dict(doc))
        bodies = [r.json() for r in proxy.requests if r.method == "PUT"]
    assert a is not None and b is None and second.stats.conflicts == 1
    assert len(bodies) == 2 and bodies[0]["_rev"] == bodies[1]["_rev"]
    assert bodies[0]["claim_id"] != bodies[1]["claim_id"]
    assert db.get("t-1")["claim_id"] == a["claim_id"]
