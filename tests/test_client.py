"""The CouchDB client of picas.py against a live server: every operation, no mocks."""
import base64
import itertools
import logging
import math
import os
import re
import threading
import time
import uuid
from urllib.parse import quote

import pytest

import conftest
import picas
from faultserver import FaultServer

SENTINEL = conftest.SENTINEL_PASSWORD
#: The tests started the server (pouchdb-server or a CouchDB node): they may add admins to it.
OUR_SERVER = not os.environ.get("PICAS_TEST_COUCHDB_URL")


def unique_name():
    return "picas-test-%s" % uuid.uuid4().hex[:12]


@pytest.fixture
def dbname(couch):
    """A database name nobody uses; deleted afterwards if a test created it."""
    couch.ensure_alive()
    name = unique_name()
    yield name
    try:
        couch.server().delete_database(name)
    except picas.PicasError:
        pass


@pytest.fixture
def spy(monkeypatch):
    """Record (method, path, params) of every request a Server sends; still sends them."""
    def install(server):
        calls = []
        real = server.request

        def request(method, path, **kwargs):
            calls.append((method, path, dict(kwargs.get("params") or {})))
            return real(method, path, **kwargs)
        monkeypatch.setattr(server, "request", request)
        return calls
    return install


def assert_secret_free(secret, *texts):
    encoded = base64.b64encode(("admin:%s" % secret).encode()).decode()
    for text in texts:
        assert secret not in text
        assert encoded not in text


# Server ######################################################################

def test_server_info(couch):
    server = couch.server()
    before = server.request_count
    info = server.info()
    assert isinstance(info, dict)
    assert "version" in info
    assert server.request_count == before + 1


def test_create_and_delete_database(couch, dbname):
    server = couch.server()
    db = server.create_database(dbname)
    assert isinstance(db, picas.Database)
    assert db.name == dbname
    assert db.exists()
    assert dbname in server.all_databases()
    assert isinstance(db.info(), dict)
    server.delete_database(dbname)
    assert not db.exists()
    assert dbname not in server.all_databases()


def test_create_existing_database_raises_precondition_failed(couch, dbname):
    server = couch.server()
    server.create_database(dbname)
    with pytest.raises(picas.PreconditionFailed) as info:
        server.create_database(dbname)
    err = info.value
    assert err.status == 412
    assert err.method == "PUT"
    assert err.path == "/" + dbname
    assert err.ambiguous is False
    assert isinstance(err, picas.HTTPError)


def test_ensure_database_is_idempotent_and_keeps_documents(couch, dbname):
    server = couch.server()
    db = server.ensure_database(dbname)
    assert db.exists()
    db.save({"_id": "keep", "v": 1})
    again = server.ensure_database(dbname)
    assert again.name == dbname
    assert again.get("keep")["v"] == 1          # not recreated, not wiped
    assert server.all_databases().count(dbname) == 1


def test_database_name_with_special_characters(couch):
    server = couch.server()
    name = unique_name() + "_(x)+$-"
    db = server.create_database(name)
    try:
        assert db.exists()
        assert name in server.all_databases()
        db.save({"_id": "d", "v": 2})
        assert db.get("d")["v"] == 2
    finally:
        server.delete_database(name)
    assert not db.exists()


# Documents ###################################################################

def test_get_missing_document_returns_default(db):
    marker = object()
    assert db.get("missing") is None
    assert db.get("missing", marker) is marker
    assert db.get("missing", default=7) == 7
    assert "missing" not in db
    with pytest.raises(picas.NotFound) as info:
        db["missing"]
    assert info.value.status == 404


def test_get_in_missing_database_raises_not_found(couch):
    missing = couch.server().database(unique_name())
    with pytest.raises(picas.NotFound) as info:
        missing.get("x", default="not this")
    assert info.value.status == 404
    assert info.value.error == "not_found"
    assert missing.name in str(info.value)


def test_get_with_params(db):
    doc = {"_id": "p", "v": 1}
    _, rev1 = db.save(doc)
    doc["v"] = 2
    db.save(doc)
    assert db.get("p")["v"] == 2
    assert db.get("p", rev=rev1)["v"] == 1


def test_save_generates_id_and_writes_back(db):
    doc = {"type": "token", "n": 1}
    doc_id, rev = db.save(doc)
    assert re.match(r"^[0-9a-f]{32}$", doc_id)
    assert rev.startswith("1-")
    assert doc["_id"] == doc_id and doc["_rev"] == rev
    stored = db.get(doc_id)
    assert stored == {"_id": doc_id, "_rev": rev, "type": "token", "n": 1}
    assert doc_id in db
    assert db[doc_id]["n"] == 1


def test_save_update_with_current_rev(db):
    doc = {"_id": "u", "n": 1}
    _, rev1 = db.save(doc)
    doc["n"] = 2
    doc_id, rev2 = db.save(doc)
    assert doc_id == "u"
    assert rev2.startswith("2-") and rev2 != rev1
    assert doc["_rev"] == rev2
    assert db.get("u")["n"] == 2


def test_save_with_stale_rev_raises_conflict(db):
    doc = {"_id": "c", "n": 1}
    db.save(doc)
    stale = dict(doc)
    doc["n"] = 2
    db.save(doc)
    stale["n"] = 3
    with pytest.raises(picas.Conflict) as info:
        db.save(stale)
    err = info.value
    assert err.status == 409
    assert err.error == "conflict"
    assert err.method == "PUT"
    assert err.path == "/%s/c" % db.name
    assert err.ambiguous is False
    assert "409" in str(err)
    assert db.get("c")["n"] == 2
    assert stale["_rev"] != doc["_rev"]          # the failed save wrote nothing back


def test_save_existing_id_without_rev_raises_conflict(db):
    db.save({"_id": "dup", "n": 1})
    with pytest.raises(picas.Conflict):
        db.save({"_id": "dup", "n": 2})
    assert db.get("dup")["n"] == 1


def test_delete(db):
    doc = {"_id": "gone", "n": 1}
    db.save(doc)
    db.delete(doc)
    assert db.get("gone") is None
    assert "gone" not in db


def test_delete_with_stale_rev_raises_conflict(db):
    doc = {"_id": "d", "n": 1}
    db.save(doc)
    stale = dict(doc)
    db.save(doc)
    with pytest.raises(picas.Conflict) as info:
        db.delete(stale)
    err = info.value
    assert err.status == 409
    assert err.error == "conflict"
    assert err.method == "DELETE"
    assert err.path == "/%s/d" % db.name
    assert db.get("d")["_rev"] == doc["_rev"]


def test_delete_without_rev_is_refused(db):
    db.save({"_id": "norev"})
    with pytest.raises(picas.PicasError):
        db.delete({"_id": "norev"})
    assert "norev" in db


def test_bulk_update_with_conflict_in_the_middle(db):
    existing = {"_id": "b", "n": 0}
    db.save(existing)
    stale = dict(existing)
    db.save(existing)                      # now ``stale`` has an old _rev
    stale_rev = stale["_rev"]
    docs = [{"_id": "a", "n": 1}, stale, {"n": 3}]
    results = db.update(docs)
    assert len(results) == 3
    ok0, id0, rev0 = results[0]
    assert (ok0, id0) == (True, "a")
    assert rev0.startswith("1-") and docs[0]["_rev"] == rev0
    ok1, id1, err1 = results[1]
    assert (ok1, id1) == (False, "b")
    assert isinstance(err1, picas.Conflict)
    assert err1.status == 409 and err1.error == "conflict"
    assert stale["_rev"] == stale_rev        # not overwritten
    ok2, id2, rev2 = results[2]
    assert ok2 is True
    assert re.match(r"^[0-9a-f]{32}$", id2) and docs[2]["_id"] == id2
    assert docs[2]["_rev"] == rev2
    assert db.get("a")["n"] == 1
    assert db.get(id2)["n"] == 3
    assert db.get("b")["_rev"] == existing["_rev"]


def test_bulk_update_of_nothing(db):
    assert db.update([]) == []


def test_all_docs(db):
    db.update([{"_id": i, "n": n} for n, i in enumerate(["c", "a", "e", "b", "d"])])
    rows = db.all_docs()["rows"]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    rows = db.all_docs(include_docs=True, limit=2)["rows"]
    assert [(r["id"], r["doc"]["n"]) for r in rows] == [("a", 1), ("b", 3)]
    rows = db.all_docs(startkey="b", endkey="d")["rows"]
    assert [r["key"] for r in rows] == ["b", "c", "d"]
    rows = db.all_docs(keys=["e", "zz", "a"])["rows"]
    assert [r["key"] for r in rows] == ["e", "zz", "a"]
    assert "error" in rows[1] and "error" not in rows[0]


# Document ids that need quoting ###############################################

ODD_IDS = ["a/b c?", "é ü/ñ", "日本語", "50% off&x=1#frag", "a+b;c=d", "_design/x y"]


@pytest.mark.parametrize("doc_id", ODD_IDS)
def test_odd_document_ids_round_trip(db, doc_id):
    doc = {"_id": doc_id, "v": 1}
    assert db.save(doc)[0] == doc_id
    assert db.get(doc_id)["_id"] == doc_id
    assert doc_id in db
    db.put_attachment(doc, "log.txt", b"x")
    assert db.get_attachment(doc_id, "log.txt") == b"x"
    assert [r["id"] for r in db.all_docs(key=doc_id)["rows"]] == [doc_id]
    doc = db.get(doc_id)
    db.delete(doc)
    assert db.get(doc_id) is None
    assert db.get("a") is None                   # nothing landed under a truncated id


# Views #######################################################################

SUM_REDUCE = "function(k, v, rr) { return sum(v); }"
KEYED_DOCS = [("i1", 1), ("i2", 2), ("i10", 10), ("sa", "a"), ("se", "é"), ("sj", "日本"),
              ("la1", ["a", 1]), ("la2", ["a", 2]), ("lb1", ["b", 1])]


@pytest.fixture
def viewdb(db):
    docs = [{"_id": doc_id, "k": key, "n": i + 1, "g": "even" if i % 2 == 0 else "odd"}
            for i, (doc_id, key) in enumerate(KEYED_DOCS)]
    db.update(docs)
    assert db.ensure_design("T", {
        "by_key": {"map": "function(doc) { if (doc.k !== undefined) emit(doc.k, doc.n); }",
                   "reduce": SUM_REDUCE},
        "by_group": {"map": "function(doc) { if (doc.g) emit(doc.g, doc.n); }",
                     "reduce": "_count"},
        "group_sum": {"map": "function(doc) { if (doc.g) emit(doc.g, doc.n); }",
                      "reduce": SUM_REDUCE},
        "plain": {"map": "function(doc) { if (doc.k !== undefined) emit(doc.k, null); }"},
    })
    return db


def ids(result):
    return [r["id"] for r in result["rows"]]


@pytest.mark.parametrize("key, expected", [
    (2, ["i2"]),
    (10, ["i10"]),
    ("a", ["sa"]),
    ("é", ["se"]),
    ("日本", ["sj"]),
    (["a", 1], ["la1"]),
    (["b", 1], ["lb1"]),
    ("2", []),                 # a string is not the number 2: keys are JSON
    (["a"], []),
])
def test_view_key_is_json_encoded(viewdb, key, expected):
    assert ids(viewdb.view("T/plain", key=key)) == expected


def test_view_startkey_endkey(viewdb):
    # Numbers collate numerically (2 before 10): the keys went out as JSON numbers.
    assert ids(viewdb.view("T/plain", startkey=1, endkey=10)) == ["i1", "i2", "i10"]
    assert ids(viewdb.view("T/plain", startkey=["a"], endkey=["a", {}])) == ["la1", "la2"]
    assert ids(viewdb.view("T/plain", startkey=["a", 2])) == ["la2", "lb1"]
    assert ids(viewdb.view("T/plain", startkey=10, endkey="a", inclusive_end=False)) == ["i10"]
    assert ids(viewdb.view("T/plain", descending=True, limit=2)) == ["lb1", "la2"]


def test_view_keys_are_posted(viewdb, spy):
    calls = spy(viewdb.server)
    result = viewdb.view("T/plain", keys=[10, "é", ["b", 1], "missing", "日本"])
    assert ids(result) == ["i10", "se", "lb1", "sj"]
    assert [c[0] for c in calls] == ["POST"]
    assert "keys" not in calls[0][2]


def test_view_include_docs_and_limit(viewdb):
    rows = viewdb.view("T/plain", include_docs=True, limit=3)["rows"]
    assert len(rows) == 3
    for row in rows:
        assert row["doc"]["_id"] == row["id"]
        assert row["doc"]["k"] == row["key"]
    assert [r["id"] for r in rows] == ["i1", "i2", "i10"]
    assert "doc" not in viewdb.view("T/plain", limit=1)["rows"][0]


def test_view_reduce(viewdb):
    total = sum(range(1, len(KEYED_DOCS) + 1))
    rows = viewdb.view("T/by_key")["rows"]
    assert len(rows) == 1 and rows[0]["value"] == total
    rows = viewdb.view("T/by_key", reduce=False)["rows"]
    assert len(rows) == len(KEYED_DOCS)
    assert sum(r["value"] for r in rows) == total
    rows = viewdb.view("T/by_key", key="é")["rows"]
    assert [r["value"] for r in rows] == [5]


def test_view_group_with_js_sum_and_count(viewdb):
    even = [i + 1 for i in range(len(KEYED_DOCS)) if i % 2 == 0]
    odd = [i + 1 for i in range(len(KEYED_DOCS)) if i % 2 == 1]
    rows = viewdb.view("T/group_sum", group=True)["rows"]
    assert {r["key"]: r["value"] for r in rows} == {"even": sum(even), "odd": sum(odd)}
    rows = viewdb.view("T/by_group", group=True)["rows"]
    assert {r["key"]: r["value"] for r in rows} == {"even": len(even), "odd": len(odd)}
    rows = viewdb.view("T/by_group")["rows"]
    assert [r["value"] for r in rows] == [len(KEYED_DOCS)]
    rows = viewdb.view("T/by_group", group=True, keys=["odd"])["rows"]
    assert rows == [{"key": "odd", "value": len(odd)}]


def test_view_missing_design_document_says_create_views(db):
    with pytest.raises(picas.NotFound) as info:
        db.view("Monitor/todo")
    assert info.value.status == 404
    assert "picas.py views" in str(info.value)
    assert "Monitor/todo" in str(info.value)


def test_view_missing_view_in_existing_design(viewdb):
    with pytest.raises(picas.NotFound) as info:
        viewdb.view("T/nosuchview")
    assert "picas.py views" in str(info.value)


def test_view_in_missing_database(couch):
    with pytest.raises(picas.NotFound) as info:
        couch.server().database(unique_name()).view("Monitor/todo")
    assert "does not exist" in str(info.value)
    assert "picas.py views" not in str(info.value)


def test_view_not_found_error_names_the_real_request(db):
    # Regression: the re-raised NotFound had path '/_design/...' without the
    # database and method GET even for keys= POSTs.
    with pytest.raises(picas.NotFound) as info:
        db.view("Monitor/todo", keys=["a"])
    assert info.value.path == "/%s/_design/Monitor/_view/todo" % db.name
    assert info.value.method == "POST"


def test_view_name_needs_design_and_view(db):
    with pytest.raises(picas.PicasError):
        db.view("todo")


# iterview ####################################################################

@pytest.fixture
def numbered(db):
    """57 documents n000..n056, view T/num emits i (distinct keys), T/dup emits i // 7."""
    db.update([{"_id": "n%03d" % i, "i": i} for i in range(57)])
    db.ensure_design("T", {
        "num": {"map": "function(doc) { if (doc.i !== undefined) emit(doc.i, doc.i * 10); }"},
        "dup": {"map": "function(doc) { if (doc.i !== undefined) emit(Math.floor(doc.i / 7), null); }"},
        "sum": {"map": "function(doc) { if (doc.i !== undefined) emit(doc.i, 1); }",
                "reduce": SUM_REDUCE},
    })
    return db


EXPECTED = ["n%03d" % i for i in range(57)]


@pytest.mark.parametrize("batch", [1, 10, 56, 57, 58, 1000])
def test_iterview_pages_without_skip(numbered, spy, batch):
    calls = spy(numbered.server)
    rows = list(numbered.iterview("T/num", batch=batch))
    assert [r["id"] for r in rows] == EXPECTED
    assert [r["value"] for r in rows] == [i * 10 for i in range(57)]
    assert len(calls) == max(1, int(math.ceil(57.0 / batch)))
    for _, path, params in calls:
        assert path.endswith("/_design/T/_view/num")
        assert "skip" not in params
        assert params["limit"] == batch + 1


def test_iterview_limit(numbered, spy):
    calls = spy(numbered.server)
    rows = list(numbered.iterview("T/num", batch=10, limit=25))
    assert [r["id"] for r in rows] == EXPECTED[:25]
    assert len(calls) == 3
    assert [c[2]["limit"] for c in calls] == [11, 11, 6]
    assert list(numbered.iterview("T/num", batch=10, limit=0)) == []
    assert [r["id"] for r in numbered.iterview("T/num", batch=10, limit=500)] == EXPECTED


def test_iterview_key_range_include_docs_and_reduce_view(numbered):
    rows = list(numbered.iterview("T/num", batch=7, startkey=10, endkey=29, include_docs=True))
    assert [r["key"] for r in rows] == list(range(10, 30))
    assert all(r["doc"]["i"] == r["key"] for r in rows)
    rows = list(numbered.iterview("T/num", batch=4, descending=True, limit=9))
    assert [r["key"] for r in rows] == list(range(56, 47, -1))
    # A view with a reduce is paged over its map rows.
    rows = list(numbered.iterview("T/sum", batch=10))
    assert [r["id"] for r in rows] == EXPECTED


def test_iterview_empty_view_and_bad_arguments(numbered):
    assert list(numbered.iterview("T/num", startkey=1000)) == []
    with pytest.raises(ValueError):
        list(numbered.iterview("T/num", batch=0))
    with pytest.raises(ValueError):
        list(numbered.iterview("T/num", keys=[1, 2]))


@pytest.mark.parametrize("batch", [1, 3, 5, 7, 10, 60])
def test_iterview_duplicate_keys_each_row_once(numbered, spy, batch):
    # Nine keys, seven rows each (the last has one): pages split runs of equal keys.
    # Regression: pouchdb-server ignores startkey_docid; iterview used to yield
    # the same rows forever there (islice bounds the damage if it comes back).
    calls = spy(numbered.server)
    rows = list(itertools.islice(numbered.iterview("T/dup", batch=batch), 3 * 57))
    assert [r["id"] for r in rows] == EXPECTED
    assert [r["key"] for r in rows] == [i // 7 for i in range(57)]
    assert all("skip" not in params for _, _, params in calls)
    assert len(calls) <= int(math.ceil(57.0 / batch)) + 1


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_iterview_document_emitting_a_key_twice(db, batch):
    db.update([{"_id": "n%02d" % i, "i": i} for i in range(10)])
    db.ensure_design("T", {"twice": {"map": "function(doc) { if (doc.i !== undefined) { "
                                            "emit(doc.i % 3, 'a'); emit(doc.i % 3, 'b'); } }"}})
    full = [(r["key"], r["id"], r["value"]) for r in db.view("T/twice")["rows"]]
    assert len(full) == 20
    rows = list(itertools.islice(db.iterview("T/twice", batch=batch), 60))
    assert [(r["key"], r["id"], r["value"]) for r in rows] == full


# Design documents ############################################################

def test_ensure_design(db):
    v1 = {"a": {"map": "function(doc) { emit(doc._id, 1); }"}}
    assert db.ensure_design("D", v1) is True
    design = db.get("_design/D")
    assert design["views"] == v1
    assert design["language"] == "javascript"
    rev = design["_rev"]

    assert db.ensure_design("D", v1) is False
    assert db.get("_design/D")["_rev"] == rev

    v2 = {"a": {"map": "function(doc) { emit(doc._id, 2); }", "reduce": "_count"}}
    assert db.ensure_design("D", v2) is True
    design = db.get("_design/D")
    assert design["_rev"] != rev
    assert design["views"] == v2
    rev = design["_rev"]

    # Adding a view keeps the views already there; giving a subset changes nothing.
    assert db.ensure_design("D", {"b": {"map": "function(doc) { emit(1, 1); }"}}) is True
    design = db.get("_design/D")
    assert sorted(design["views"]) == ["a", "b"]
    assert design["views"]["a"] == v2["a"]
    rev = design["_rev"]
    assert db.ensure_design("D", v2) is False
    assert db.get("_design/D")["_rev"] == rev


def test_ensure_design_keeps_other_fields_and_views_work(db):
    db.save({"_id": "_design/E", "views": {"old": {"map": "function(doc) { emit(null, 1); }"}},
             "comment": "hand made"})
    db.save({"_id": "x"})
    assert db.ensure_design("E", {"new": {"map": "function(doc) { emit(doc._id, null); }"}})
    design = db.get("_design/E")
    assert design["comment"] == "hand made"
    assert sorted(design["views"]) == ["new", "old"]
    assert ids(db.view("E/new")) == ["x"]
    assert ids(db.view("E/old")) == ["x"]


# Attachments #################################################################

def test_inline_attachments(db):
    binary = bytes(range(256))
    doc = {"_id": "att", "n": 1}
    picas.inline_attachment(doc, "log.txt", "héllo\n")
    picas.inline_attachment(doc, "data.bin", binary, "application/octet-stream")
    db.save(doc)
    assert db.get_attachment(doc, "log.txt") == "héllo\n".encode("utf-8")
    assert db.get_attachment("att", "data.bin") == binary
    stored = db.get("att")
    assert stored["_attachments"]["log.txt"]["content_type"] == "text/plain"
    assert stored["_attachments"]["data.bin"]["length"] == 256
    # Saving the document read back (with stubs) keeps the attachments.
    stored["n"] = 2
    db.save(stored)
    assert db.get_attachment("att", "data.bin") == binary
    assert db.get("att")["n"] == 2


def test_put_and_get_attachment(db):
    doc = {"_id": "p", "n": 1}
    db.save(doc)
    rev1 = doc["_rev"]
    rev2 = db.put_attachment(doc, "out.bin", b"\x00\x01\xff")
    assert rev2.startswith("2-") and doc["_rev"] == rev2 != rev1
    rev3 = db.put_attachment(doc, "log é.txt", "ünïcode text")
    assert doc["_rev"] == rev3 and rev3.startswith("3-")
    assert db.get_attachment(doc, "out.bin") == b"\x00\x01\xff"
    assert db.get_attachment("p", "log é.txt") == "ünïcode text".encode("utf-8")
    stored = db.get("p")
    assert stored["n"] == 1
    assert stored["_attachments"]["log é.txt"]["content_type"].startswith("text/plain")
    assert stored["_attachments"]["out.bin"]["content_type"] == "application/octet-stream"


def test_put_attachment_creates_document_and_stale_rev_conflicts(db):
    doc = {"_id": "new"}
    rev = db.put_attachment(doc, "a.txt", b"abc", content_type="text/csv")
    assert rev.startswith("1-") and doc["_rev"] == rev
    assert db.get("new")["_attachments"]["a.txt"]["content_type"] == "text/csv"
    stale = {"_id": "new", "_rev": rev}
    db.put_attachment(doc, "b.txt", b"b")
    with pytest.raises(picas.Conflict):
        db.put_attachment(stale, "c.txt", b"c")
    assert db.get_attachment("new", "c.txt") is None


def test_get_attachment_default(db):
    db.save({"_id": "plain"})
    assert db.get_attachment("plain", "nope") is None
    assert db.get_attachment("plain", "nope", default=b"") == b""
    assert db.get_attachment("nodoc", "nope", default="dflt") == "dflt"


# Keep-alive ##################################################################

@pytest.fixture
def proxy(couch):
    """A pass-through FaultServer in front of the test server: counts connections."""
    couch.ensure_alive()
    fs = FaultServer(upstream=couch.url).start()
    yield fs
    fs.stop()


def test_requests_reuse_one_connection(couch, db, proxy):
    client = picas.Server(proxy.url, couch.username, couch.password, retries=0)
    cdb = client.database(db.name)
    for i in range(10):
        cdb.save({"_id": "k%d" % i, "i": i})
    for i in range(10):
        assert cdb.get("k%d" % i)["i"] == i
    assert cdb.get("missing") is None            # error answers keep the connection too
    cdb.update([{"_id": "bulk%d" % i} for i in range(5)])
    assert len(cdb.all_docs()["rows"]) == 15
    client.info()
    # 10 saves, 10 gets, the missing get (GET + HEAD), update, all_docs, info
    assert len(proxy.requests) == 25
    assert client.request_count == 25
    assert proxy.connections == 1
    client.close()
    client.info()
    assert proxy.connections == 2


def test_the_upstream_clients_close_their_connections(couch, db, proxy):
    """CouchDB and CouchClient (upstream's two client classes) have close() and ``with``."""
    for make in (picas.CouchDB, picas.CouchClient):
        before = proxy.connections
        with make(proxy.url, db.name, couch.username, couch.password) as client:
            client.db.save({"_id": "%s-1" % make.__name__})
            assert proxy.connections == before + 1
        client.db.save({"_id": "%s-2" % make.__name__})    # the with block closed the first
        assert proxy.connections == before + 2
        client.close()
        assert client.db.get("%s-1" % make.__name__) is not None
        assert proxy.connections == before + 3


def test_each_thread_has_its_own_connection(couch, proxy):
    client = picas.Server(proxy.url, couch.username, couch.password, retries=0)
    client.info()
    errors = []

    def work():
        try:
            for _ in range(5):
                client.info()
        except Exception as exc:                # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    client.info()
    assert len(proxy.requests) == 12
    assert proxy.connections == 3


# Credentials #################################################################

def url_with(couch, user, password, host=None):
    host = host or couch.url.split("://", 1)[1]
    return "http://%s:%s@%s" % (quote(user, safe=""), quote(password, safe=""), host)


def test_credentials_in_url_are_used_and_hidden(couch, db):
    server = picas.Server(url_with(couch, couch.username, couch.password))
    assert server.username == couch.username
    assert server.url == couch.url
    sdb = server.database(db.name)
    sdb.save({"_id": "x"})
    assert_secret_free(couch.password, repr(server), server.url, repr(sdb), str(sdb))
    with pytest.raises(picas.Conflict) as info:
        sdb.save({"_id": "x"})
    err = info.value
    assert_secret_free(couch.password, str(err), repr(err), err.path)
    with pytest.raises(picas.NotFound) as info:
        server.database(unique_name()).get("x")
    assert_secret_free(couch.password, str(info.value), repr(info.value))
    # A wrong password in the URL is really sent: the URL's credentials are used.
    with pytest.raises(picas.Unauthorized):
        picas.Server(url_with(couch, couch.username, "wrong-" + SENTINEL), retries=0).info()


@pytest.mark.skipif(not OUR_SERVER, reason="adds an admin user: only on our own test server")
def test_percent_encoded_credentials_in_url(couch):
    admin = couch.server()
    password = "p@ss:w/rd#?%" + SENTINEL
    # CouchDB 3 keeps its configuration per node; pouchdb-server at /_config.
    config = "/_node/_local/_config" if couch.couchdb else "/_config"
    admin.request("PUT", config + "/admins/urluser", body=password)
    try:
        server = picas.Server(url_with(couch, "urluser", password), retries=0)
        # CouchDB hashes a new admin's password after answering the PUT; until then
        # the login fails.
        deadline = time.time() + 10
        while couch.couchdb and time.time() < deadline:
            try:
                server.info()
                server.all_databases()
                break
            except picas.Unauthorized:
                time.sleep(0.1)
        assert server.username == "urluser"
        assert isinstance(server.all_databases(), list)
        assert_secret_free(SENTINEL, repr(server), server.url)
    finally:
        admin.request("DELETE", config + "/admins/urluser")


def test_unreachable_error_hides_credentials(caplog):
    caplog.set_level(logging.DEBUG, logger="picas")
    port = conftest.free_port()
    server = picas.Server("http://admin:%s@127.0.0.1:%d/" % (SENTINEL, port),
                          retries=1, timeout=1)
    with pytest.raises(picas.ServerUnreachable) as info:
        server.info()
    err = info.value
    assert err.url == "http://127.0.0.1:%d/" % port
    assert "http://127.0.0.1:%d/" % port in str(err)
    assert_secret_free(SENTINEL, str(err), repr(err), err.url, str(err.cause), repr(server),
                       caplog.text)


@pytest.mark.parametrize("url", [
    "https://admin:%s@couch.example.org:6984/db" % SENTINEL,
    "http://admin:%s@[::1]:5984" % SENTINEL,
    "http://admin:%s@localhost" % SENTINEL,
    "admin:%s@couch.example.org:5984" % SENTINEL,
    "http://admin:%s@couch.example.org/prefix/" % SENTINEL,
])
def test_server_repr_hides_credentials(url):
    server = picas.Server(url)
    assert server.username == "admin"
    assert_secret_free(SENTINEL, repr(server), server.url,
                       repr(server.database("db")))


def test_schemeless_url_error_hides_credentials():
    # Regression: redact_url() left schemeless URLs unchanged.
    with pytest.raises(picas.PicasError) as info:
        picas.Server("admin:%s@" % SENTINEL)
    assert_secret_free(SENTINEL, str(info.value))


@pytest.mark.parametrize("sep", ["#", "/", "?", "@", ":"])
def test_unencoded_password_characters_never_leak(sep):
    # Regression: urlsplit() took part of such a password for the port, and
    # Server() raised ValueError("Port could not be cast ... as '<password>'").
    url = "http://admin:%s%sx@couch.example.org:5984" % (SENTINEL, sep)
    try:
        server = picas.Server(url)
    except picas.PicasError as exc:
        assert_secret_free(SENTINEL, str(exc))
    else:
        assert_secret_free(SENTINEL, repr(server), server.url)


def test_wrong_password_raises_unauthorized(couch, db):
    server = picas.Server(couch.url, couch.username, "wrong-" + SENTINEL, retries=3)
    with pytest.raises(picas.Unauthorized) as info:
        server.info()
    err = info.value
    assert err.status in (401, 403)
    assert err.method == "GET"
    assert server.request_count == 1             # never retried
    with pytest.raises(picas.Unauthorized) as info:
        server.database(db.name).get("anything", default="must not be returned")
    assert info.value.status in (401, 403)
    assert_secret_free(SENTINEL, str(err), repr(err))


@pytest.mark.parametrize("url, expected", [
    ("https://alice:s3cret@couch.example.org:6984/db", "https://couch.example.org:6984/db"),
    ("http://alice@couch.example.org/db", "http://couch.example.org/db"),
    ("http://couch.example.org:5984", "http://couch.example.org:5984"),
    ("http://alice:s3cret@[::1]:5984/x", "http://[::1]:5984/x"),
    ("https://alice:s%40cret@host/db?x=1#f", "https://host/db?x=1#f"),
    ("http://alice:s3@cret@host/", "http://host/"),
    ("https://host/path/", "https://host/path/"),
])
def test_redact_url(url, expected):
    assert picas.redact_url(url) == expected


def test_redact_url_schemeless():
    assert "s3cret" not in picas.redact_url("alice:s3cret@couch.example.org:5984/db")


def test_the_test_server_is_restarted_when_a_request_killed_it(couch):
    if couch.proc is None:
        pytest.skip("an external CouchDB is not ours to restart")
    couch.proc.kill()
    couch.proc.wait()
    assert not couch.alive()
    couch.ensure_alive()
    assert couch.alive()
    assert couch.server().create_database("picas-test-after-restart").exists()
    couch.server().delete_database("picas-test-after-restart")
