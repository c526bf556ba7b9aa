"""Scripts written for upstream picas run unchanged against picas.py.

Each script below is written the way upstream's examples and SURF's
documentation write them (current API and the older one); it runs in a
subprocess with only picas.py on the path, against the live server.
"""
import os
import subprocess
import sys
import textwrap

import pytest

import picas
from helpers import ROOT, ensure_views, make_tokens, states, view_ids

PRELUDE = """\
import os, sys
PICAS_HOST_URL = os.environ["PICAS_HOST_URL"]
PICAS_DATABASE = os.environ["PICAS_DATABASE"]
PICAS_USERNAME = os.environ["PICAS_USERNAME"]
PICAS_PASSWORD = os.environ["PICAS_PASSWORD"]
"""


def run_script(couch, db, tmp_path, body, name="script.py", args=()):
    path = tmp_path / name
    path.write_text(PRELUDE + textwrap.dedent(body))
    env = couch.env(db.name)
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, str(path)] + list(args), env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, "script failed:\n%s\n%s" % (out, err)
    return out, err


def test_current_api_names_resolve():
    from picas.clients import CouchDB
    from picas.iterators import TaskViewIterator, EndlessViewIterator, PrioritizedViewIterator
    from picas.actors import RunActor, AbstractRunActor
    from picas.modifiers import BasicTokenModifier
    from picas.documents import Document, Task
    from picas.executers import execute
    from picas.util import Timer
    from picas.jobid import add_job_id, remove_job_id
    from picas.picaslogger import picaslogger
    assert CouchDB is picas.CouchDB and RunActor is picas.RunActor
    assert issubclass(RunActor, AbstractRunActor) and Task is picas.Task
    assert TaskViewIterator and EndlessViewIterator and PrioritizedViewIterator
    assert BasicTokenModifier and Document and Timer and add_job_id and remove_job_id
    assert picaslogger.name == "picas"
    proc, code, out, err = execute(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, b"out\n", b"err\n") and proc.returncode == 3


def test_submodule_names_resolve_when_picas_runs_as_a_script(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from picas.clients import CouchDB\nfrom picas.actors import RunActor\n"
                     "import picas\nassert picas.CouchDB is CouchDB\n"
                     "print(CouchDB.__module__, RunActor.__name__)\n")
    code = ("import runpy, sys; sys.argv = ['picas.py', '--version'];\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "exec(open(%r).read())\n" % (os.path.join(ROOT, "picas.py"), str(probe)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "RunActor" in proc.stdout.decode()


def test_push_tokens_with_save_documents_and_create_views_with_add_view(couch, db, tmp_path):
    out, err = run_script(couch, db, tmp_path, """
        from picas.clients import CouchDB
        from picas.documents import Task

        def create_views(db):
            generalMapDoneCode = '''
        function(doc) {
           if(doc.type == "token") {
            if(%s) {
              emit(doc._id, doc._id);
            }
          }
        }
        '''
            conditions = {"todo": "doc.lock == 0 && doc.done == 0",
                          "locked": "doc.lock > 0 && doc.done == 0",
                          "done": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) == 0",
                          "error": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) != 0"}
            for view, cond in conditions.items():
                db.add_view(view, generalMapDoneCode % cond)
            db.add_view("overview_total",
                        'function(doc){ if(doc.type == "token") { if(doc.lock == 0 && doc.done == 0) emit("todo", 1); } }',
                        'function (key, values, rereduce) { return sum(values); }')

        client = CouchDB(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                         password=PICAS_PASSWORD)
        create_views(client)
        offset = client.doc_count()
        tokens = [Task({"_id": "token_%d" % (offset + i), "type": "token", "input": "echo %d" % i})
                  for i in range(5)]
        print(client.save_documents(tokens))
        print(client.is_view_nonempty("todo"))
        """)
    assert "[True, True, True, True, True]" in out and "True" in out.splitlines()[-1]
    assert view_ids(db, "todo") == ["token_%d" % i for i in range(1, 6)]


def test_current_api_pilot_with_execute_and_attachments(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["echo hello", "exit 4"], prefix="token")
    (tmp_path / "process_task.sh").write_text('#!/bin/bash\necho "token $2"\nbash -c "$1"\n')
    (tmp_path / "process_task.sh").chmod(0o755)
    run_script(couch, db, tmp_path, """
        import argparse
        from picas.actors import RunActor
        from picas.clients import CouchDB
        from picas.executers import execute
        from picas.iterators import TaskViewIterator
        from picas.modifiers import BasicTokenModifier
        from picas.util import Timer

        class ExampleActor(RunActor):
            def __init__(self, db, modifier, view="todo", **viewargs):
                super(ExampleActor, self).__init__(db, view=view, **viewargs)
                self.timer = Timer()
                self.iterator = TaskViewIterator(db, view, **viewargs)
                self.modifier = modifier
                self.db = db

            def process_task(self, token):
                command = ["./process_task.sh", token["input"], token["_id"]]
                out = execute(command)
                self.subprocess = out[0]
                logsout = "logs_" + str(token["_id"]) + ".out"
                logserr = "logs_" + str(token["_id"]) + ".err"
                token["exit_code"] = out[1]
                token = self.modifier.close(token)
                token.put_attachment(logsout, out[2])
                token.put_attachment(logserr, out[3])

        client = CouchDB(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                         password=PICAS_PASSWORD)
        modifier = BasicTokenModifier()
        actor = ExampleActor(client, modifier, view="todo", design_doc="Monitor")
        actor.run(max_token_time=1800, max_total_time=3600, max_tasks=10, max_scrub=2)
        """)
    assert states(db) == {"token-1": "done", "token-2": "error"}
    assert db.get("token-2")["scrub_count"] == 2           # retried twice
    assert db.get_attachment("token-1", "logs_token-1.out") == b"token token-1\nhello\n"


def test_reset_and_delete_through_the_view_helpers(couch, db, tmp_path):
    ensure_views(db)
    db.update([dict(picas.TOKEN_DEFAULTS, _id="e%d" % i, lock=5, done=6, exit_code=1)
               for i in range(3)] + [dict(picas.TOKEN_DEFAULTS, _id="d1", lock=5, done=6,
                                          exit_code=0)])
    run_script(couch, db, tmp_path, """
        from picas.clients import CouchDB
        client = CouchDB(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                         password=PICAS_PASSWORD)
        to_reset = []
        for doc in client.get_from_view("error"):
            doc["lock"] = 0
            doc["done"] = 0
            doc["scrub_count"] += 1
            doc["hostname"] = ""
            doc["exit_code"] = ""
            to_reset.append(doc)
        assert client.save_documents(to_reset) == [True, True, True]
        assert client.delete_from_view("done") == [True]
        """)
    assert states(db) == {"e0": "todo", "e1": "todo", "e2": "todo"}
    assert db.get("d1") is None


def test_old_api_pilot_runs_unchanged(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["echo one", "echo two", "exit 9"], prefix="token")
    (tmp_path / "process_task.sh").write_text('#!/bin/bash\nbash -c "$1"\n')
    (tmp_path / "process_task.sh").chmod(0o755)
    out, err = run_script(couch, db, tmp_path, """
        import time
        from picas.actors import RunActor
        from picas.clients import CouchClient
        from picas.iterators import BasicViewIterator
        from picas.modifiers import BasicTokenModifier
        from picas.executers import execute

        class ExampleActor(RunActor):
            def __init__(self, iterator, modifier):
                self.iterator = iterator
                self.modifier = modifier
                self.client = iterator.client

            def process_token(self, key, token):
                print("-----------------------")
                print("Working on token: " + token["_id"])
                for k, v in token.items():
                    print(k, v)
                command = "./process_task.sh " + repr(token["input"]) + " " + token["_id"]
                out = execute(command, shell=True)
                token = self.modifier.close(token)
                token["exit_code"] = out[0]
                token["output"] = out[1].decode()
                self.client.db[token["_id"]] = token
                self.client.db.put_attachment(token, out[1], "logs_%s.out" % token["_id"])

        client = CouchClient(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                             password=PICAS_PASSWORD)
        modifier = BasicTokenModifier()
        iterator = BasicViewIterator(client, "Monitor/todo", modifier)
        actor = ExampleActor(iterator, modifier)
        actor.run()
        """)
    assert out.count("Working on token") == 3
    assert states(db) == {"token-1": "done", "token-2": "done", "token-3": "error"}
    assert db.get("token-1")["output"] == "one\n" and db.get("token-3")["exit_code"] == 9
    assert db.get_attachment("token-2", "logs_token-2.out") == b"two\n"


def test_old_api_pilot_whose_code_raises_leaves_the_token_in_error(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["x"], prefix="token")
    run_script(couch, db, tmp_path, """
        from picas.actors import RunActor
        from picas.clients import CouchClient
        from picas.iterators import BasicViewIterator
        from picas.modifiers import BasicTokenModifier

        class Broken(RunActor):
            def __init__(self, iterator, modifier):
                self.iterator, self.modifier, self.client = iterator, modifier, iterator.client
            def process_token(self, key, token):
                raise RuntimeError("disk full")

        client = CouchClient(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                             password=PICAS_PASSWORD)
        Broken(BasicViewIterator(client, "Monitor/todo", BasicTokenModifier()),
               BasicTokenModifier()).run()
        """)
    doc = db.get("token-1")
    assert picas.token_state(doc) == "error" and "disk full" in doc["error"][-1]["message"]


def test_couchdb_wrapper_errors_like_upstream(couch, db):
    client = picas.CouchDB(couch.url, db.name, couch.username, couch.password)
    with pytest.raises(ValueError):
        client.get("missing")
    with pytest.raises(picas.ResourceNotFound):
        picas.CouchDB(couch.url, "no-such-db", couch.username, couch.password)
    doc = client.save(picas.Document({"_id": "a", "x": 1}))
    stale = dict(doc, _rev="1-0000")
    with pytest.raises(picas.ResourceConflict):
        client.save(stale)
    assert client.get("a")["x"] == 1 and client["a"]["_rev"] == doc.rev
    assert repr(client).find(couch.password) == -1


def test_couchdb_client_methods_as_upstream_scripts_use_them(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["a", "b", "c"], prefix="token")
    fresh = db.name + "-created"
    # CouchDB 3 gives a new database members.roles ["_admin"]; pouchdb-server nothing.
    before = db.request("GET", "/_security")[2] or {}
    default_roles = (before.get("members") or {}).get("roles", [])
    out, err = run_script(couch, db, tmp_path, """
        from picas.clients import CouchDB
        from picas.documents import Task
        client = CouchDB(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                         password=PICAS_PASSWORD, ssl_verification=False)
        other = client.copy()
        assert other.get("token-1")["input"] == "a"
        token = client.get_single_from_view("todo", window_size=3)
        assert token["_id"] in ("token-1", "token-2", "token-3")
        for key, value in token.doc.items():         # upstream's examples loop like this
            assert token[key] == value
        token.put_attachment("note.txt", "hello")
        client.save(token)
        again = client.get(token["_id"])
        info = again.get_attachment("note.txt", retrieve_from_database=client)
        assert info["data"] == b"hello", info
        client.delete(client.get("token-3") if token["_id"] != "token-3" else client.get("token-2"))
        left = [d["_id"] for d in client.get_from_view("todo")]
        assert client.delete_documents([client.get(i) for i in left[:1]]) == [True]
        client.set_users(admins=["boss"], members=["worker"], member_roles=["pilots"])
        created = CouchDB(url=PICAS_HOST_URL, db=%r, username=PICAS_USERNAME,
                          password=PICAS_PASSWORD, create=True)
        assert created.doc_count() == 0
        print("remaining", sorted(d["_id"] for d in client.get_from_view("todo")))
        """ % fresh)
    remaining = [doc_id for doc_id in ("token-1", "token-2", "token-3") if db.get(doc_id)]
    assert len(remaining) == 1 and "remaining %r" % remaining in out
    security = db.request("GET", "/_security")[2]
    assert security["admins"]["names"] == ["boss"]
    # set_users adds to what is there, as upstream's does.
    assert security["members"] == {"names": ["worker"], "roles": default_roles + ["pilots"]}
    assert couch.server().database(fresh).exists()
    couch.server().delete_database(fresh)


def test_old_couchclient_helpers(couch, db, tmp_path):
    ensure_views(db)
    make_tokens(db, ["a", "b"], prefix="token")
    run_script(couch, db, tmp_path, """
        from picas.clients import CouchClient
        client = CouchClient(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                             password=PICAS_PASSWORD)
        rows = client.get_all("Monitor/todo")
        assert sorted(r["id"] for r in rows) == ["token-1", "token-2"]
        token = client.db["token-1"]
        token["note"] = "changed"
        client.modify_token(token)
        docs = [client.db["token-2"]]
        docs[0]["note"] = "bulk"
        assert [ok for ok, _, _ in client.update_all(docs)] == [True]
        """)
    assert db.get("token-1")["note"] == "changed" and db.get("token-2")["note"] == "bulk"


def test_old_api_process_token_gets_the_rows_value_and_run_maxtime_by_position(
        couch, db, tmp_path):
    ensure_views(db)
    db.ensure_design("Custom", {"todo": {"map": 'function(doc) { if (doc.type == "token" && '
                                                'doc.lock == 0 && doc.done == 0) '
                                                'emit(doc.input, "ref-" + doc._id); }'}})
    make_tokens(db, ["a", "b"], prefix="token")
    out, err = run_script(couch, db, tmp_path, """
        import time
        from picas.actors import RunActor
        from picas.clients import CouchClient
        from picas.iterators import BasicViewIterator
        from picas.modifiers import BasicTokenModifier

        class Actor(RunActor):
            def __init__(self, iterator, modifier):
                self.iterator, self.modifier, self.client = iterator, modifier, iterator.client
            def process_token(self, ref, token):
                print("ref", ref)
                time.sleep(1.5)
                token = self.modifier.close(token)
                token["exit_code"] = 0
                self.client.db[token["_id"]] = token

        client = CouchClient(url=PICAS_HOST_URL, db=PICAS_DATABASE, username=PICAS_USERNAME,
                             password=PICAS_PASSWORD)
        modifier = BasicTokenModifier()
        Actor(BasicViewIterator(client, "Custom/todo", modifier), modifier).run(1)
        """)
    refs = [line.split()[1] for line in out.splitlines() if line.startswith("ref ")]
    # run(1): one second for the whole pilot, so one token, not killed after 1 s.
    assert len(refs) == 1 and refs[0] in ("ref-token-1", "ref-token-2"), out
    ran = refs[0][len("ref-"):]
    assert states(db)[ran] == "done"
