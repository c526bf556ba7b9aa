"""Exactly-once on a CouchDB cluster: only a 201 is a claim; split tokens are repaired.

Simulated here, on any server (tests/test_real_cluster.py has the real 3-node
cluster): a proxy in front of the test server answers 202 Accepted for chosen
lock writes (what a cluster node says when the write reached fewer copies than
the quorum), and conflicting revisions are planted with ``_bulk_docs`` and
``new_edits=false``, as a race or a split leaves them.
"""
import json
import time

import picas
from faultserver import FaultServer
from helpers import ensure_views, make_tokens, states


def lock_ids(request):
    """Ids of the tokens a request writes a lock for: a lone PUT, or inside a _bulk_docs POST."""
    if request.method == "PUT":
        docs = [request.json()] if request.body.startswith(b"{") else []
    elif request.method == "POST" and request.path.split("?")[0].endswith("/_bulk_docs"):
        docs = request.json()["docs"]
    else:
        return []
    return [d["_id"] for d in docs if d.get("pilot_id") and d.get("lock") and not d.get("done")]


def writes_to(requests, token_id):
    """Requests that wrote to ``token_id``."""
    out = []
    for r in requests:
        if r.method == "PUT" and r.path.split("?")[0].endswith("/" + token_id):
            out.append(r)
        elif r.method == "POST" and "_bulk_docs" in r.path and \
                token_id in [d.get("_id") for d in r.json()["docs"]]:
            out.append(r)
    return out


def accept_lock_writes_of(token_ids, seen, db=None):
    """A FaultServer action: forward every request; answer 202 to lock writes of ``token_ids``.

    That is what a cluster node answers when the write reached fewer copies
    than its quorum; for _bulk_docs, when any of its writes did. With ``db``,
    a rival pilot's lock is planted next to each such write, as the race that
    makes a healthy cluster answer 202 leaves it (one 201 writer, one 202).
    """
    def action(fault, request):
        status, headers, body = fault.forward(request)
        hit = [i for i in lock_ids(request) if i in token_ids]
        if hit and status == 201:
            seen.extend(hit)
            if db is not None:
                docs = [request.json()] if request.method == "PUT" else request.json()["docs"]
                for doc in docs:
                    if doc["_id"] in hit:
                        plant_rival_leaf(db, doc["_id"], doc["_rev"])
            return ("raw", 202, body, dict(headers, **{"Content-Type": "application/json"}))
        return ("raw", status, body, headers)
    return action


def test_a_lock_answered_202_is_not_a_claim(couch, db):
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"])
    seen = []
    with FaultServer(upstream=couch.url,
                     default=accept_lock_writes_of({"t-2"}, seen, db)) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        it = picas.TaskViewIterator(proxy_db, "todo")
        claimed = sorted(t["_id"] for t in it)
        puts_to_t2 = writes_to(proxy.requests, "t-2")
    assert seen == ["t-2"]
    assert claimed == ["t-1", "t-3"]                  # t-2 was never handed out
    assert it.stats.accepted == 1 and it.stats.claims == 2
    assert len(puts_to_t2) == 1                       # and never written to again
    # The 202 write did land (as on a cluster): the token is locked by nobody who runs it.
    assert states(db)["t-2"] == "locked"


def test_a_pilot_never_runs_a_token_it_got_202_for(couch, db, tmp_path):
    # Whether the lock goes alone or with the previous token's result (one
    # _bulk_docs request), a 202 is not a claim; the result in it is kept.
    ensure_views(db)
    make_tokens(db, ["a", "b", "c", "d", "e"])
    for victim in ("t-1", "t-4"):
        seen = []
        log = tmp_path / ("ran-" + victim)
        with FaultServer(upstream=couch.url,
                         default=accept_lock_writes_of({victim}, seen, db)) as proxy:
            proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
            actor = picas.CommandActor(proxy_db, ["sh", "-c", 'echo "$2" >> %s' % log, "sh"],
                                       heartbeat=0)
            actor.run()
            to_victim = writes_to(proxy.requests, victim)
            bulk_locks = [r for r in proxy.requests if "_bulk_docs" in r.path and lock_ids(r)]
        assert seen == [victim]
        assert len(to_victim) == 1                    # never written to after the 202
        ran = log.read_text().split()
        assert victim not in ran and len(ran) == len(set(ran))
        assert bulk_locks                             # claims rode on result writes
        assert states(db)[victim] == "locked"
        # Everything else ran once and was saved, the result next to the 202'd lock too.
        assert all(states(db)[t] == "done" for t in ran)
        for doc_id, state in states(db).items():       # fresh tokens for the next round
            if doc_id != victim:
                doc = db.get(doc_id)
                db.save(picas.scrub_token(doc))
    assert set(states(db).values()) == {"todo", "locked"}


def test_a_lock_answered_202_that_a_whole_cluster_shows_as_the_only_leaf_is_a_claim(couch, db):
    """A 202 whose write, once a probe write is answered 201, is the token's only revision:
    nobody else can hold the token, so it is this pilot's (a lost race leaves a rival leaf)."""
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"])
    seen = []
    with FaultServer(upstream=couch.url, default=accept_lock_writes_of({"t-2"}, seen)) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        it = picas.TaskViewIterator(proxy_db, "todo")
        claimed = sorted(t["_id"] for t in it)
        probes = [r for r in proxy.requests if "/_local/picas-pilot-" in r.path
                  and r.method == "PUT"]
    assert seen == ["t-2"] and claimed == ["t-1", "t-2", "t-3"]
    assert it.stats.claims == 3 and it.stats.accepted == 0
    assert probes and probes[0].json()["uncertain"] == "t-2"      # status could see it
    assert probes[-1].json()["uncertain"] is None                 # and the note is cleared
    assert len(db.live_leaves("t-2")) == 1


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
    assert picas.main(["status", "--json"]) == 0
    out, err = capsys.readouterr()
    assert sorted(json.loads(out)) == ["done", "error", "locked", "todo"]
    assert "1 tokens have conflicting revisions" in err
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


def plant_rival_leaf(db, doc_id, based_on_rev):
    """A rival pilot's lock on the same revision, as a leaf next to ours (a cluster split)."""
    base = db.get(doc_id, rev=based_on_rev)
    number, rev_hash = based_on_rev.split("-", 1)
    # The lowest hash: the rival's revision loses CouchDB's choice of the
    # winner, so a plain read shows ours; only the list of leaves tells.
    leaf = dict(base, lock=int(time.time()), pilot_id="rival", claim_id="rival-claim",
                _rev="%d-0000" % (int(number) + 1))
    leaf["_revisions"] = {"start": int(number) + 1, "ids": ["0000", rev_hash]}
    db.update([leaf], new_edits=False)


def lose_answer_and_split(db, kinds):
    """A FaultServer action: the first write with a lock of a token is applied, a rival
    leaf is planted next to it, and the answer is lost (the 201 or 202 nobody heard)."""
    done = []

    def action(fault, request):
        ids = lock_ids(request)
        if ids and not done and request.method in kinds:
            locks = [d for d in ([request.json()] if request.method == "PUT"
                                 else request.json()["docs"]) if d["_id"] in ids]
            fault.forward(request)
            for lock in locks:
                plant_rival_leaf(db, lock["_id"], lock["_rev"])
            done.extend(ids)
            return ("drop",)
        return ("proxy",)
    return action, done


def test_a_lock_whose_answer_was_lost_next_to_a_rival_leaf_is_not_a_claim(couch, db):
    ensure_views(db)
    make_tokens(db, ["a"])
    action, split = lose_answer_and_split(db, ("PUT",))
    with FaultServer(upstream=couch.url, default=action) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        it = picas.TaskViewIterator(proxy_db, "todo")
        claimed = [t["_id"] for t in it]
        puts = [r for r in proxy.requests if r.method == "PUT" and "/t-1" in r.path]
    assert split == ["t-1"] and claimed == []
    assert it.stats.claims == 0 and it.stats.accepted == 1
    assert len(puts) == 2                      # the lost one and its retry; nothing after
    leaves = db.live_leaves("t-1")
    assert sorted(l["pilot_id"] for l in leaves) == ["rival", it.pilot_id]


def test_a_lock_sent_with_a_result_whose_answer_was_lost_next_to_a_rival_is_not_run(
        couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["a", "b"])
    log = tmp_path / "ran"
    action, split = lose_answer_and_split(db, ("POST",))
    with FaultServer(upstream=couch.url, default=action) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        actor = picas.CommandActor(proxy_db, ["sh", "-c", 'echo "$2" >> %s' % log, "sh"],
                                   heartbeat=0)
        actor.run()
    first = log.read_text().split()
    assert len(split) == 1 and first == [t for t in ("t-1", "t-2") if t not in split]
    assert states(db)[first[0]] == "done"      # the result in that request was kept
    assert sorted(l["pilot_id"] for l in db.live_leaves(split[0])) == ["rival", actor.pilot_id]


def test_a_pilot_writes_its_result_on_the_revision_of_its_own_201(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"])
    with FaultServer(upstream=couch.url) as proxy:
        proxy_db = picas.Server(proxy.url, couch.username, couch.password).database(db.name)
        picas.CommandActor(proxy_db, ["true"], heartbeat=0).run()
        requests = list(proxy.requests)
    granted = {}                     # token -> the revision the 201 to its lock write gave
    for r in requests:
        if not lock_ids(r) or r.upstream_status != 201:
            continue
        answer = json.loads(r.upstream_body.decode("utf-8"))
        for result in (answer if isinstance(answer, list) else [answer]):
            if result.get("id") in lock_ids(r):
                granted[result["id"]] = result["rev"]
    assert sorted(granted) == ["t-1", "t-2", "t-3"]
    for r in requests:
        docs = [r.json()] if r.method == "PUT" and r.body.startswith(b"{") else (
            r.json()["docs"] if "_bulk_docs" in r.path else [])
        for doc in docs:
            if doc.get("done"):
                assert doc["_rev"] == granted[doc["_id"]], doc["_id"]
    assert set(states(db).values()) == {"done"}


def test_status_says_when_it_cannot_check_for_conflicts(couch, db, monkeypatch, capsys):
    ensure_views(db)                       # Monitor only, as upstream's create_views makes it
    for name, value in (("PICAS_HOST_URL", couch.url), ("PICAS_DATABASE", db.name),
                        ("PICAS_USERNAME", couch.username), ("PICAS_PASSWORD", couch.password)):
        monkeypatch.setenv(name, value)
    assert picas.main(["status"]) == 0
    assert "conflicting revisions not checked" in capsys.readouterr().err
