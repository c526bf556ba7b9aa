"""Faults between picas.py and CouchDB: drops, timeouts, 5xx, lost answers, bad bodies.

Uses faultserver.FaultServer, a scripted stdlib HTTP server on 127.0.0.1, alone
or as a pass-through proxy in front of the real test server.
"""
import base64
import http.client
import logging
import re
import socket
import time

import pytest

import conftest
import picas
from faultserver import FaultServer

SENTINEL = conftest.SENTINEL_PASSWORD


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.01)
    monkeypatch.setattr(picas, "RETRY_MAX_DELAY", 0.02)


@pytest.fixture
def fault():
    """fault(script, upstream=None, default=None) -> a started FaultServer, stopped afterwards."""
    servers = []

    def make(script=(), upstream=None, default=None):
        fs = FaultServer(script, upstream=upstream, default=default).start()
        servers.append(fs)
        return fs
    yield make
    for fs in servers:
        fs.stop()


def client(fs, **kwargs):
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("timeout", 0.5)
    return picas.Server(fs.url, **kwargs)


def secret_free(*texts):
    encoded = base64.b64encode(("admin:%s" % SENTINEL).encode()).decode()
    return all(SENTINEL not in t and encoded not in t for t in texts)


# Retries of safe requests ####################################################

@pytest.mark.parametrize("how", ["drop", "reset"])
def test_dropped_connection_on_get_is_retried(fault, how):
    fs = fault([(how,), ("json", 200, {"version": "fault"})])
    server = client(fs)
    assert server.info() == {"version": "fault"}
    assert fs.methods() == ["GET", "GET"]
    assert fs.connections == 2
    assert server.request_count == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_then_success_on_get(fault, status):
    fs = fault([("status", status), ("status", status), ("json", 200, {"ok": 1})])
    server = client(fs, retries=2)
    assert server.request("GET", "/db/doc")[2] == {"ok": 1}
    assert fs.methods() == ["GET"] * 3
    assert [r.path for r in fs.requests] == ["/db/doc"] * 3


def test_html_502_from_a_proxy_is_retried(fault):
    fs = fault([("raw", 502, b"<html><body>Bad Gateway</body></html>", {"Content-Type": "text/html"}),
                ("json", 200, {"ok": 2})])
    assert client(fs).info() == {"ok": 2}
    assert len(fs.requests) == 2


def test_retries_exhausted_on_5xx_raise_server_unreachable(fault):
    # Regression: the last attempt used to raise ServerError, leaving the
    # "the server kept failing" branch dead.
    fs = fault([("status", 503)] * 3, default=("json", 200, {"too": "late"}))
    server = client(fs, retries=2)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.info()
    assert len(fs.requests) == 3
    assert isinstance(info.value.cause, picas.ServerError)
    assert info.value.cause.status == 503
    assert "3 attempts" in str(info.value)
    assert "HTTP 503" in str(info.value)


def test_timeout_is_retried_then_succeeds(fault):
    fs = fault([("sleep", 1.0, ("json", 200, {"late": True})), ("json", 200, {"ok": 3})])
    server = client(fs, timeout=0.3)
    start = time.time()
    assert server.info() == {"ok": 3}
    assert 0.25 < time.time() - start < 1.0
    assert len(fs.requests) == 2


def test_timeouts_exhaust_retries(fault, caplog):
    caplog.set_level(logging.DEBUG, logger="picas")
    fs = fault([("sleep", 1.0, ("json", 200, {}))] * 3)
    url = "http://admin:%s@127.0.0.1:%d" % (SENTINEL, fs.port)
    server = picas.Server(url, retries=2, timeout=0.3)
    start = time.time()
    with pytest.raises(picas.ServerUnreachable) as info:
        server.request("GET", "/db/doc")
    elapsed = time.time() - start
    err = info.value
    assert 0.85 < elapsed < 2.5
    assert len(fs.requests) == 3
    assert "timed out" in str(err)
    assert "3 attempts" in str(err)
    assert "http://127.0.0.1:%d/db/doc" % fs.port in str(err)
    assert err.url == "http://127.0.0.1:%d/db/doc" % fs.port
    assert isinstance(err.cause, socket.timeout)
    assert secret_free(str(err), repr(err), caplog.text)
    # The credentials were sent on every attempt.
    auth = "Basic " + base64.b64encode(("admin:%s" % SENTINEL).encode()).decode()
    assert [r.headers.get("Authorization") for r in fs.requests] == [auth] * 3


def test_429_with_retry_after_is_honoured(fault, monkeypatch):
    monkeypatch.setattr(picas, "RETRY_MAX_DELAY", 5.0)
    fs = fault([("json", 429, {"error": "too_many_requests", "reason": "slow down"},
                 {"Retry-After": "1"}),
                ("json", 200, {"ok": 4})])
    server = client(fs)
    assert server.info() == {"ok": 4}
    assert len(fs.requests) == 2
    assert fs.requests[1].time - fs.requests[0].time >= 0.95


def test_429_retry_after_is_capped(fault, monkeypatch):
    monkeypatch.setattr(picas, "RETRY_MAX_DELAY", 0.1)
    fs = fault([("json", 429, {"error": "too_many_requests"}, {"Retry-After": "3600"}),
                ("json", 200, {"ok": 5})])
    start = time.time()
    assert client(fs).info() == {"ok": 5}
    assert time.time() - start < 1.0


def test_429_without_retry_after_on_a_write_with_retry(fault):
    fs = fault([("json", 429, {"error": "too_many_requests"}),
                ("json", 201, {"ok": True, "id": "x", "rev": "1-a"})])
    server = client(fs)
    status, _, body = server.request("PUT", "/db/x", body={"a": 1}, retry=True)
    assert status == 201 and body["rev"] == "1-a"
    assert fs.methods() == ["PUT", "PUT"]
    assert fs.requests[0].json() == fs.requests[1].json() == {"a": 1}


# Errors that are never retried ###############################################

def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap(fault, monkeypatch):
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.5)
    monkeypatch.setattr(picas, "RETRY_MAX_DELAY", 3.0)
    slept, bounds = [], []
    monkeypatch.setattr(picas.time, "sleep", slept.append)
    import random
    real_uniform = random.uniform

    def uniform(a, b):
        bounds.append((a, b))
        return real_uniform(a, b)
    monkeypatch.setattr(random, "uniform", uniform)
    fs = fault([("status", 503)] * 6 + [("json", 200, {"version": "fault"})])
    assert client(fs, retries=6).info() == {"version": "fault"}
    assert bounds == [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (1.5, 3.0), (1.5, 3.0), (1.5, 3.0)]
    assert all(a <= d <= b for d, (a, b) in zip(slept, bounds)) and len(slept) == 6
    assert len(set(slept)) > 1                       # jittered, not fixed


def test_non_json_body_raises_bad_response(fault):
    fs = fault([("raw", 200, b"<html>I am not CouchDB</html>")])
    with pytest.raises(picas.BadResponse) as info:
        client(fs).info()
    assert "not JSON" in str(info.value)
    assert "I am not CouchDB" in str(info.value)
    assert len(fs.requests) == 1


def test_non_json_error_body_still_gives_the_error_class(fault):
    fs = fault([("raw", 404, b"<html>Not Found</html>")])
    with pytest.raises(picas.NotFound) as info:
        client(fs).request("GET", "/db/x")
    assert info.value.status == 404
    assert info.value.error is None
    assert "Not Found" in info.value.reason
    assert len(fs.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_is_not_retried(fault, status):
    fs = fault([("json", status, {"error": "unauthorized", "reason": "no"})] * 3)
    server = client(fs, retries=5)
    with pytest.raises(picas.Unauthorized) as info:
        server.info()
    assert info.value.status == status
    assert info.value.error == "unauthorized"
    assert len(fs.requests) == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_write_without_retry_flag_is_not_retried_on_503(fault, method):
    fs = fault([("status", 503)] * 3, default=("json", 201, {"ok": True}))
    server = client(fs, retries=3)
    with pytest.raises(picas.ServerError) as info:
        server.request(method, "/db/_something", body={"x": 1})
    assert info.value.status == 503
    assert info.value.method == method
    assert info.value.ambiguous is False
    assert len(fs.requests) == 1


def test_write_without_retry_flag_is_not_retried_on_a_drop(fault):
    fs = fault([("drop",)], default=("json", 201, {"ok": True}))
    server = client(fs, retries=3)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.request("POST", "/db/_something", body={"x": 1})
    assert "closed the connection without answering" in str(info.value)
    assert re.search(r"\b1 attempts?\b", str(info.value))
    assert len(fs.requests) == 1


def test_put_attachment_to_new_document_is_not_retried(fault):
    fs = fault([("status", 503)], default=("json", 201, {"ok": True, "rev": "1-x"}))
    db = client(fs, retries=3).database("db")
    with pytest.raises(picas.ServerError):
        db.put_attachment({"_id": "new"}, "a.txt", b"data")
    assert fs.methods() == ["PUT"]


def test_headers_and_path_prefix(fault):
    fs = fault([("json", 200, {"ok": True})])
    server = picas.Server(fs.url + "/couch/", retries=0)
    server.request("GET", "/db/doc", params={"key": "x", "include_docs": True, "skip": None})
    req = fs.requests[0]
    assert req.path == '/couch/db/doc?include_docs=true&key=%22x%22'
    assert req.headers["Accept"] == "application/json"
    assert "Authorization" not in req.headers


# Lost answers of writes: the server applied it, the client never heard ######

def lost_answer_script(reused):
    """Forward the write but drop its answer; proxy everything else."""
    script = [("proxy",)] if reused else []
    return script + [("proxy_then_drop",)]


@pytest.mark.parametrize("reused", [False, True], ids=["fresh-connection", "reused-connection"])
def test_save_whose_answer_was_lost_still_succeeds(couch, db, fault, reused):
    fs = fault(lost_answer_script(reused), upstream=couch.url)
    server = client(fs, username=couch.username, password=couch.password, timeout=5)
    pdb = server.database(db.name)
    if reused:
        assert "version" in server.info()          # the connection is now in use
        del fs.requests[:]
    doc = {"_id": "lost", "payload": [1, "é"]}
    doc_id, rev = pdb.save(doc)
    stored = db.get("lost")
    assert (doc_id, rev) == ("lost", stored["_rev"])
    assert doc["_rev"] == rev
    assert rev.startswith("1-")                     # written exactly once
    assert stored["payload"] == [1, "é"]
    assert fs.methods() == ["PUT", "PUT", "GET"]


def test_update_whose_answer_was_lost_still_succeeds(couch, db, fault):
    doc = {"_id": "upd", "n": 1}
    db.save(doc)
    fs = fault([("proxy_then_drop",)], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    doc["n"] = 2
    _, rev = pdb.save(doc)
    assert rev.startswith("2-")
    assert db.get("upd") == {"_id": "upd", "_rev": rev, "n": 2}
    assert fs.methods() == ["PUT", "PUT", "GET"]


def test_bulk_update_whose_answer_was_lost_reports_the_writes(couch, db, fault):
    db.save({"_id": "old", "n": 1})
    taken = db.get("old")
    db.save(dict(taken, n=2))                       # makes `taken` outdated: a real conflict
    fs = fault([("proxy_then_drop",)], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    docs = [{"_id": "a", "n": 1}, {"_id": "b", "n": 2}, dict(taken, n=3)]
    results = pdb.update(docs)
    assert [ok for ok, _, _ in results] == [True, True, False]
    assert isinstance(results[2][2], picas.Conflict)
    for doc in docs[:2]:
        stored = db.get(doc["_id"])
        assert doc["_rev"] == stored["_rev"] and stored["_rev"].startswith("1-")
    assert db.get("old")["n"] == 2
    assert fs.methods()[:2] == ["POST", "POST"]


def test_bulk_update_checks_the_number_of_results(fault):
    fs = fault([("json", 201, [{"ok": True, "id": "a", "rev": "1-x"}])])
    pdb = client(fs).database("db")
    with pytest.raises(picas.BadResponse):
        pdb.update([{"_id": "a"}, {"_id": "b"}])


def test_attachment_put_whose_answer_was_lost_still_succeeds(couch, db, fault):
    doc = {"_id": "att"}
    db.save(doc)
    fs = fault([("proxy_then_drop",)], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    rev = pdb.put_attachment(doc, "x.txt", b"abc", "text/plain")
    stored = db.get("att")
    assert rev == doc["_rev"] == stored["_rev"] and rev.startswith("2-")
    assert db.get_attachment("att", "x.txt") == b"abc"
    assert fs.methods()[:2] == ["PUT", "PUT"]


def test_lost_attachment_answer_and_another_writer_raises_conflict(couch, db, fault):
    doc = {"_id": "att2"}
    db.save(doc)

    def forward_then_other_writer_then_drop(fs, request):
        fs.forward(request)
        other = db.get("att2")
        db.put_attachment(other, "x.txt", b"someone else's")
        return ("drop",)
    fs = fault([forward_then_other_writer_then_drop], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    with pytest.raises(picas.Conflict):
        pdb.put_attachment(doc, "x.txt", b"abc", "text/plain")


def test_lost_answer_and_someone_else_wrote_raises_conflict(couch, db, fault):
    doc = {"_id": "race", "n": 1}
    db.save(doc)

    def forward_then_other_writer_then_drop(fs, request):
        fs.forward(request)
        other = db.get("race")
        other["n"] = 99
        db.save(other)
        return ("drop",)
    fs = fault([forward_then_other_writer_then_drop], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    mine = dict(doc, n=2)
    with pytest.raises(picas.Conflict) as info:
        pdb.save(mine)
    assert info.value.ambiguous is True
    assert db.get("race")["n"] == 99
    assert mine["_rev"] == doc["_rev"]


def test_delete_whose_answer_was_lost_still_succeeds(couch, db, fault):
    doc = {"_id": "del", "n": 1}
    db.save(doc)
    fs = fault([("proxy_then_drop",)], upstream=couch.url)
    pdb = client(fs, username=couch.username, password=couch.password, timeout=5).database(db.name)
    pdb.delete(doc)
    assert db.get("del") is None
    assert fs.methods()[:2] == ["DELETE", "DELETE"]


def test_create_database_whose_answer_was_lost_still_succeeds(couch, fault):
    name = "picas-test-lost-%d" % int(time.time() * 1000)
    fs = fault([("proxy_then_drop",)], upstream=couch.url)
    server = client(fs, username=couch.username, password=couch.password, timeout=5)
    try:
        created = server.create_database(name)
        assert created.name == name
        assert couch.server().database(name).exists()
        assert fs.methods() == ["PUT", "PUT"]
    finally:
        couch.server().delete_database(name)


# Keep-alive ##################################################################

def test_keep_alive_connection_is_reused(fault):
    fs = fault([("json", 200, {"n": i}) for i in range(5)])
    server = client(fs, retries=0)
    assert [server.info()["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert fs.connections == 1


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_idle_connection_closed_by_server_is_reopened(fault, method):
    fs = fault([("close_after_response", ("json", 200, {"n": 1})), ("json", 200, {"n": 2})])
    server = client(fs, retries=0)              # no retries: the reopening is not a retry
    assert server.request(method, "/x", body={})[2] == {"n": 1}
    time.sleep(0.2)                             # the server has closed the idle socket
    assert server.request(method, "/x", body={})[2] == {"n": 2}
    assert fs.connections == 2
    assert len(fs.requests) == 2
    assert server.request_count == 2


def test_connection_close_header_is_honoured(fault):
    fs = fault([("json", 200, {"n": 1}, {"Connection": "close"}), ("json", 200, {"n": 2})])
    server = client(fs, retries=0)
    assert server.info() == {"n": 1}
    assert server.info() == {"n": 2}
    assert fs.connections == 2


# Unreachable servers #########################################################

def test_connection_refused(caplog):
    caplog.set_level(logging.DEBUG, logger="picas")
    port = conftest.free_port()
    server = picas.Server("http://admin:%s@127.0.0.1:%d" % (SENTINEL, port),
                          retries=2, timeout=0.5)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.request("GET", "/db")
    err = info.value
    assert "connection refused" in str(err)
    assert "3 attempts" in str(err)
    assert err.url == "http://127.0.0.1:%d/db" % port
    assert isinstance(err.cause, ConnectionRefusedError)
    assert secret_free(str(err), repr(err), caplog.text)


def test_connection_refused_on_a_write_is_tried_once():
    port = conftest.free_port()
    server = picas.Server("http://127.0.0.1:%d" % port, retries=2, timeout=0.5)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.request("POST", "/db/_bulk_docs", body={"docs": []})
    assert re.search(r"\b1 attempts?\b", str(info.value))
    assert "connection refused" in str(info.value)


def test_unknown_host_name():
    server = picas.Server("http://admin:%s@nonexistent.invalid:5984" % SENTINEL,
                          retries=1, timeout=2)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.info()
    err = info.value
    assert "host name not found" in str(err)
    assert "nonexistent.invalid" in str(err)
    assert err.url == "http://nonexistent.invalid:5984/"
    assert isinstance(err.cause, socket.gaierror)
    assert secret_free(str(err), repr(err))


def test_server_unreachable_is_a_picas_error_not_http_error():
    server = picas.Server("http://127.0.0.1:%d" % conftest.free_port(), retries=0)
    with pytest.raises(picas.PicasError) as info:
        server.info()
    assert isinstance(info.value, picas.ServerUnreachable)
    assert not isinstance(info.value, picas.HTTPError)
    assert not isinstance(info.value, (OSError, http.client.HTTPException))
