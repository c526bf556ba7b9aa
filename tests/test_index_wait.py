"""`status` and `run` say when they wait for CouchDB to build a view index (issue 17).

The first query of a view on a large pool makes CouchDB index every token before
it answers: minutes of silence on 100,000 tokens. A proxy that delays view reads
stands in for that on any server; on real CouchDB a fresh index of a big pool
shows its progress from ``_active_tasks``.
"""
import logging

import pytest

import picas
from faultserver import FaultServer
from helpers import ensure_views, make_tokens


def test_status_says_it_waits_for_a_slow_view(couch, db, monkeypatch, capsys):
    ensure_views(db)
    make_tokens(db, ["a"])

    def slow_views(fs, request):
        return ("sleep", 3.0, ("proxy",)) if "/_view/" in request.path else ("proxy",)
    with FaultServer(upstream=couch.url, default=slow_views) as fs:
        for name, value in (("PICAS_HOST_URL", fs.url), ("PICAS_DATABASE", db.name),
                            ("PICAS_USERNAME", couch.username),
                            ("PICAS_PASSWORD", couch.password)):
            monkeypatch.setenv(name, value)
        assert picas.main(["status"]) == 0
    captured = capsys.readouterr()
    assert "waiting for CouchDB to build the index of _design/Monitor" in captured.err
    assert "todo 1" in captured.out


def test_a_fresh_index_of_a_large_pool_shows_its_progress_on_couchdb(couch, db, caplog):
    if couch.kind == "pouchdb-server":
        pytest.skip("pouchdb-server has no _active_tasks indexer progress")
    picas.push_tokens(db, lines=["input %d" % i for i in range(15000)], id_prefix="big",
                      batch=5000)
    ensure_views(db)                                 # a fresh design: nothing indexed yet
    caplog.set_level(logging.INFO, logger="picas")
    with picas._IndexWatch(db, "Monitor", quiet=0.2, every=0.3):
        counts = picas.count_states(db)
    assert counts["todo"] == 15000
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for CouchDB to build the index" in m for m in messages), messages
    assert any(m.startswith("indexing _design/Monitor: ") for m in messages), messages
