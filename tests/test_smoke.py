import picas


def test_server_info_and_roundtrip(db):
    assert "version" in db.server.info()
    doc = {"_id": "x", "n": 1}
    db.save(doc)
    assert db.get("x")["n"] == 1
