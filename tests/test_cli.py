"""The command line against the live server: every subcommand, settings, bad inputs.

Most commands run in-process through ``picas.main([...])`` (connection settings
in the environment, output through capsys); the quick example, the Python
example and the pilots that must really own their process run as
subprocesses. Every test also checks, at teardown, that the server's admin
password shows up in no output it captured and in no document or attachment
of the databases it used.
"""
import base64
import collections
import io
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import quote

import pytest

import picas
from conftest import SENTINEL_PASSWORD, free_port
from helpers import (PICAS, ROOT, ensure_views, executions, make_tokens, states, view_ids,
                     wait_for)

EXAMPLES = os.path.join(ROOT, "examples")
SETTINGS = ("PICAS_HOST_URL", "PICAS_DATABASE", "PICAS_USERNAME", "PICAS_PASSWORD")

Result = collections.namedtuple("Result", "code out err")


def text(result):
    return result.out + result.err


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No PICAS_* settings or picasconfig.py from the outside; picas' logger restored."""
    for name in SETTINGS + ("PYTHONPATH",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(str(tmp_path))
    logger = logging.getLogger("picas")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


class Cli(object):
    """Runs picas.py commands against one database and keeps everything they printed."""

    def __init__(self, couch, db, capsys, monkeypatch, tmp_path):
        self.couch = couch
        self.db = db
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.tmp_path = tmp_path
        self.transcript = []
        self.databases = [db]
        self.check_secrets_at_teardown = True
        self.use_env()

    def use_env(self, **overrides):
        """Put the connection settings (for self.db, or overridden) into the environment."""
        values = dict(PICAS_HOST_URL=self.couch.url, PICAS_DATABASE=self.db.name,
                      PICAS_USERNAME=self.couch.username, PICAS_PASSWORD=self.couch.password)
        values.update(overrides)
        for name, value in values.items():
            if value is None:
                self.monkeypatch.delenv(name, raising=False)
            else:
                self.monkeypatch.setenv(name, value)

    def clear_env(self):
        self.use_env(**dict.fromkeys(SETTINGS))

    def __call__(self, *argv, **kwargs):
        """``picas.main(argv)``; ``stdin`` (bytes) replaces standard input."""
        stdin = kwargs.pop("stdin", None)
        assert not kwargs
        self.capsys.readouterr()
        if stdin is not None:
            if isinstance(stdin, bytes):
                stdin = io.TextIOWrapper(io.BytesIO(stdin))
            self.monkeypatch.setattr(sys, "stdin", stdin)
        try:
            code = picas.main([str(a) for a in argv])
        except SystemExit as exc:            # argparse errors, --version
            code = exc.code
        out, err = self.capsys.readouterr()
        self.transcript += [out, err]
        return Result(code, out, err)

    def sub(self, argv, cwd=None, env=None, timeout=120):
        """Run ``argv`` (a list) as a subprocess with the settings of self.db."""
        env = env if env is not None else self.couch.env(self.db.name)
        proc = subprocess.run([str(a) for a in argv], cwd=str(cwd or self.tmp_path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        result = Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                        proc.stderr.decode("utf-8", "replace"))
        self.transcript += [result.out, result.err]
        return result

    def picas(self, *args, **kwargs):
        return self.sub([sys.executable, PICAS] + list(args), **kwargs)

    def secrets(self):
        pw = self.couch.password
        forms = set([SENTINEL_PASSWORD, pw, quote(pw, safe="")])
        for user in (self.couch.username, "admin"):
            forms.add(base64.b64encode(("%s:%s" % (user, pw)).encode("utf-8")).decode("ascii"))
        return [f for f in forms if f]

    def assert_secret_free(self, *extra):
        """The password is in no captured output and in no document or attachment."""
        secrets = self.secrets()
        for chunk in self.transcript + list(extra):
            for secret in secrets:
                assert secret not in chunk
        server = self.couch.server()
        for db in self.databases:
            db = server.database(db.name)
            if not db.exists():
                continue
            rows = db.all_docs(include_docs=True, attachments=True)["rows"]
            dump = json.dumps(rows, ensure_ascii=False)
            for secret in secrets:
                assert secret not in dump, "password stored in %s" % db.name
            for row in rows:
                for name, info in (row["doc"].get("_attachments") or {}).items():
                    data = base64.b64decode(info["data"])
                    for secret in secrets:
                        assert secret.encode("utf-8") not in data, \
                            "password in attachment %s of %s" % (name, row["id"])


@pytest.fixture
def cli(couch, db, capsys, monkeypatch, tmp_path):
    runner = Cli(couch, db, capsys, monkeypatch, tmp_path)
    yield runner
    if runner.check_secrets_at_teardown:
        runner.assert_secret_free()


@pytest.fixture
def tdb(db):
    """The test database, with the standard views."""
    ensure_views(db)
    return db


@pytest.fixture
def make_db(couch, cli):
    """Create more databases for a test; deleted afterwards."""
    names = []

    def make(create=True):
        name = "picas-test-%s" % uuid.uuid4().hex[:12]
        names.append(name)
        database = couch.server().database(name)
        if create:
            couch.server().create_database(name)
            ensure_views(database)
        cli.databases.append(database)
        return database
    yield make
    for name in names:
        try:
            couch.server().delete_database(name)
        except picas.PicasError:
            pass


@pytest.fixture
def fast_retries(monkeypatch):
    """Shrink the retry back-off so unreachable servers fail in well under a second.

    With the real back-off, 8 retries of a refused connection take about 40 s
    (``python picas.py --url http://127.0.0.1:1 --db x --timeout 2 status``
    measured 40.1 s); the CLI has no option to shorten that.
    """
    monkeypatch.setattr(picas, "RETRY_BASE_DELAY", 0.001)


# -- helpers -------------------------------------------------------------------

def token(doc_id, **fields):
    doc = dict(picas.TOKEN_DEFAULTS, _id=doc_id)
    doc["error"] = []
    doc.update(fields)
    return doc


def revisions(db):
    """id -> _rev of every document (design documents included)."""
    return dict((r["id"], r["value"]["rev"]) for r in db.all_docs()["rows"])


def token_docs(db):
    return [r["doc"] for r in db.all_docs(include_docs=True)["rows"]
            if not r["id"].startswith("_design/")]


def write(path, content, mode=None):
    path = str(path)
    if not isinstance(content, bytes):
        content = content.encode("utf-8")
    with open(path, "wb") as fh:
        fh.write(content)
    if mode is not None:
        os.chmod(path, mode)
    return path


def script(path, body, mode=0o755):
    """An executable script; ``{python}`` in ``body`` is this interpreter."""
    return write(path, textwrap.dedent(body).lstrip().replace("{python}", sys.executable), mode)


def write_config(path, mode=0o600, **values):
    lines = "".join("%s = %r\n" % (name, value) for name, value in sorted(values.items()))
    return write(path, "# test settings\n" + lines, mode)


def attachment(db, doc_id, ext="out"):
    return db.get_attachment(doc_id, "logs_%s.%s" % (doc_id, ext))


def sh(code):
    """A task command: ``sh -c CODE`` with $1 = input and $2 = token id."""
    return ["--", "sh", "-c", code, "sh"]


# -- views ---------------------------------------------------------------------

def test_views_creates_the_monitor_views_once(cli, db):
    result = cli("views")
    assert result.code == 0, result
    assert "created or updated" in result.err
    design = db.get("_design/Monitor")
    assert set(design["views"]) == {"todo", "locked", "done", "error", "overview_total"}
    assert design["views"] == picas.standard_views()
    again = cli("views")
    assert again.code == 0 and "already up to date" in again.err
    assert db.get("_design/Monitor")["_rev"] == design["_rev"]
    # The views work: tokens show up in them.
    make_tokens(db, ["a", "b"])
    assert view_ids(db, "todo") == ["t-1", "t-2"]


def test_views_with_a_filter_in_their_own_design_document(cli, db):
    assert cli("views").code == 0
    result = cli("--design-doc", "SingleCore", "views", "--filter", "doc.cores == 1")
    assert result.code == 0, result
    assert "SingleCore" in result.err
    db.update([token("one", cores=1, input="1"), token("four", cores=4, input="4"),
               token("none", input="none")])
    single = db.view("SingleCore/todo")["rows"]
    assert [r["id"] for r in single] == ["one"]
    counts = json.loads(cli("--design-doc", "SingleCore", "status", "--json").out)
    assert counts == {"todo": 1, "locked": 0, "done": 0, "error": 0}
    assert json.loads(cli("status", "--json").out)["todo"] == 3
    # A pilot on the SingleCore views runs only the one-core token.
    result = cli("--design-doc", "SingleCore", "run", "--heartbeat", "0", *sh("exit 0"))
    assert result.code == 0, result
    assert states(db) == {"one": "done", "four": "todo", "none": "todo"}
    # Running it again leaves the design document alone.
    rev = db.get("_design/SingleCore")["_rev"]
    assert cli("--design-doc", "SingleCore", "views", "--filter", "doc.cores == 1").code == 0
    assert db.get("_design/SingleCore")["_rev"] == rev


@pytest.mark.parametrize("condition", ["x) || (true", "(doc.cores == 1", "doc.name == 'a",
                                       "  "])
def test_views_refuse_a_filter_that_is_not_one_condition(cli, db, condition):
    result = cli("--design-doc", "Broken", "views", "--filter", condition)
    assert result.code == picas.EXIT_USAGE and "balanced brackets" in result.err, result
    assert db.get("_design/Broken") is None


def test_views_create_db_creates_a_missing_database(cli, make_db):
    new = make_db(create=False)
    result = cli("--db", new.name, "views")
    assert result.code == 2
    assert "does not exist" in result.err and "--create-db" in result.err
    assert not new.exists()
    result = cli("--db", new.name, "views", "--create-db")
    assert result.code == 0, result
    assert new.exists()
    assert set(new.get("_design/Monitor")["views"]) >= {"todo", "locked", "done", "error"}
    assert cli("--db", new.name, "views", "--create-db").code == 0      # exists now: fine


# -- push ----------------------------------------------------------------------

def test_push_one_token_per_line_and_never_twice(cli, tdb, tmp_path):
    write(tmp_path / "work.txt", "alpha\n\n   \nbeta gamma\r\n  spaced  \n\n")
    result = cli("push", "work.txt")
    assert result.code == 0, result
    assert "created 3 tokens" in result.out
    docs = sorted(token_docs(tdb), key=lambda d: d["_id"])
    assert [d["input"] for d in docs] == ["alpha", "beta gamma", "  spaced  "]
    prefix = docs[0]["_id"].rsplit("-", 1)[0]
    assert prefix.startswith("work-") and len(prefix) == len("work-") + 8
    assert [d["_id"] for d in docs] == ["%s-%d" % (prefix, n) for n in (1, 2, 3)]
    for doc in docs:
        assert doc["type"] == "token" and doc["lock"] == 0 and doc["done"] == 0
        assert doc["scrub_count"] == 0 and doc["exit_code"] == "" and doc["error"] == []
    before = revisions(tdb)
    # The same file again: nothing new, nothing overwritten.
    again = cli("push", "work.txt")
    assert again.code == 0, again
    assert "created 0 tokens" in again.out and "3 already existed" in again.out
    assert revisions(tdb) == before
    # Another file with the same lines is another batch of work.
    shutil.copy(str(tmp_path / "work.txt"), str(tmp_path / "rerun.txt"))
    other = cli("push", "rerun.txt")
    assert other.code == 0 and "created 3 tokens" in other.out
    # The same name with other content is new work too.
    write(tmp_path / "work.txt", "alpha\nbeta gamma\n  spaced  \ndelta\n")
    changed = cli("push", "work.txt")
    assert changed.code == 0 and "created 4 tokens" in changed.out
    assert len(token_docs(tdb)) == 10
    assert json.loads(cli("status", "--json").out)["todo"] == 10


def test_push_with_id_prefix(cli, tdb, tmp_path):
    write(tmp_path / "in.txt", "a\nb\n")
    result = cli("push", "--id-prefix", "run7", "in.txt")
    assert result.code == 0 and "created 2 tokens" in result.out
    assert sorted(d["_id"] for d in token_docs(tdb)) == ["run7-1", "run7-2"]
    assert tdb.get("run7-2")["input"] == "b"
    again = cli("push", "--id-prefix", "run7", "in.txt")
    assert "created 0 tokens, 2 already existed" in again.out


JSON_TOKENS = [
    {"input": "plain", "cores": 4, "params": {"n": [1, 2]}},
    {"input": {"a": 1}},
    {"_id": "custom-id", "input": "c", "type": "token", "scrub_count": 0},
    {"note": "no input at all"},
]


@pytest.mark.parametrize("layout", ["array", "lines", "pretty-array"])
def test_push_json_fills_in_the_standard_fields_and_keeps_the_rest(cli, tdb, tmp_path, layout):
    if layout == "array":
        content = json.dumps(JSON_TOKENS)
    elif layout == "pretty-array":
        content = json.dumps(JSON_TOKENS, indent=2)
    else:
        content = "\n".join(json.dumps(t) for t in JSON_TOKENS) + "\n\n"
    write(tmp_path / "tokens.json", content)
    result = cli("push", "--json", "--id-prefix", "j", "tokens.json")
    assert result.code == 0, result
    assert "created 4 tokens" in result.out
    docs = dict((d["_id"], d) for d in token_docs(tdb))
    assert sorted(docs) == ["custom-id", "j-1", "j-2", "j-4"]
    for doc in docs.values():
        for field, value in picas.TOKEN_DEFAULTS.items():
            if field != "input":
                assert doc[field] == value, (doc["_id"], field)
    assert docs["j-1"]["cores"] == 4 and docs["j-1"]["params"] == {"n": [1, 2]}
    assert docs["j-2"]["input"] == {"a": 1}
    assert docs["custom-id"]["input"] == "c"
    assert docs["j-4"]["note"] == "no input at all" and docs["j-4"]["input"] == ""
    assert view_ids(tdb, "todo") == sorted(docs)


@pytest.mark.parametrize("content, complaint", [
    ('[{"input": "a"}, {"input": "b"', "not a JSON array or JSON lines"),
    ('{"input": "a"}\n{"input": "b",}\n', "not a JSON array or JSON lines"),
    ('{"input": "a"}\n{\n  "input": "b"\n}\n', "not a JSON array or JSON lines"),
    ('[{"input": "a"}, "b"]', "token 2 is not a JSON object"),
    ('{"input": "a"}\n42\n', "token 2 is not a JSON object"),
    ('[[{"input": "a"}]]', "token 1 is not a JSON object"),
    ("just some text\n", "not a JSON array or JSON lines"),
])
def test_push_malformed_json_creates_nothing(cli, tdb, tmp_path, content, complaint):
    write(tmp_path / "bad.json", content)
    before = revisions(tdb)
    result = cli("push", "--json", "bad.json")
    assert result.code == 2, result
    assert result.err.startswith("picas.py: ") and "bad.json" in result.err
    assert complaint in result.err
    assert "Traceback" not in result.err
    assert revisions(tdb) == before


def test_push_json_token_with_an_illegal_id_fails_clearly(cli, tdb, tmp_path):
    write(tmp_path / "ids.json", json.dumps([{"_id": "_reserved", "input": "x"}]))
    result = cli("push", "--json", "ids.json")
    assert result.code == 1, result
    assert "picas.py: " in result.err and "Traceback" not in result.err
    assert "_reserved" in result.err or "underscore" in result.err or "illegal" in result.err
    assert token_docs(tdb) == []


@pytest.mark.parametrize("args, content, complaint", [
    (["push", "missing.txt"], None, "cannot read missing.txt"),
    (["push", "latin1.txt"], b"caf\xe9\n", "not UTF-8"),
    (["push", "--json", "latin1.txt"], b'{"input": "caf\xe9"}\n', "not UTF-8"),
])
def test_push_unreadable_input_creates_nothing(cli, tdb, tmp_path, args, content, complaint):
    if content is not None:
        write(tmp_path / "latin1.txt", content)
    result = cli(*args)
    assert result.code == 2 and complaint in result.err, result
    assert token_docs(tdb) == []


def test_push_reads_standard_input(cli, tdb):
    result = cli("push", "-", stdin=b"one\n\ntwo\n")
    assert result.code == 0 and "created 2 tokens" in result.out, result
    docs = sorted(token_docs(tdb), key=lambda d: d["_id"])
    assert [d["input"] for d in docs] == ["one", "two"]
    assert all(d["_id"].startswith("stdin-") for d in docs)
    again = cli("push", "-", stdin=b"one\n\ntwo\n")
    assert "created 0 tokens, 2 already existed" in again.out
    result = cli("push", "--json", "--id-prefix", "js", "-", stdin=b'[{"input": [1, 2]}]')
    assert result.code == 0 and "created 1 tokens" in result.out
    assert tdb.get("js-1")["input"] == [1, 2]


def test_push_empty_file_creates_nothing(cli, tdb, tmp_path):
    write(tmp_path / "empty.txt", "\n\n")
    result = cli("push", "empty.txt")
    assert result.code == 0 and "created 0 tokens" in result.out
    write(tmp_path / "empty.json", "  \n")
    assert cli("push", "--json", "empty.json").code == 0
    assert token_docs(tdb) == []


# -- status --------------------------------------------------------------------

def _mixed_tokens(db, now=None):
    now = now or int(time.time())
    db.update([token("todo1"), token("todo2"), token("todo3"),
               token("locked1", lock=now),
               token("done1", lock=now, done=now, exit_code=0),
               token("done2", lock=now, done=now, exit_code="0"),
               token("error1", lock=now, done=now, exit_code=5),
               {"_id": "not-a-token", "lock": 0, "done": 0}])


def test_status_counts_every_state(cli, tdb):
    _mixed_tokens(tdb)
    result = cli("status")
    assert result.code == 0, result
    assert result.out.strip() == "todo 3  locked 1  done 2  error 1  (7 tokens)"
    result = cli("status", "--json")
    assert result.code == 0
    assert json.loads(result.out) == {"todo": 3, "locked": 1, "done": 2, "error": 1}


def test_status_of_an_empty_database(cli, tdb):
    assert json.loads(cli("status", "--json").out) == {"todo": 0, "locked": 0, "done": 0,
                                                       "error": 0}
    assert cli("status").out.strip() == "todo 0  locked 0  done 0  error 0  (0 tokens)"


def test_status_watch_refreshes_until_interrupted(cli, tdb):
    _mixed_tokens(tdb)
    # Ctrl-C as on a terminal: a runner started in the background (nohup, `cmd &` in a
    # script) hands its children SIGINT ignored, and Python then never raises
    # KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, PICAS, "status", "--watch", "0.2"],
                            env=cli.couch.env(tdb.name), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)
    doc = tdb.get("todo1")
    doc.update(lock=int(time.time()), done=int(time.time()), exit_code=0)
    tdb.save(doc)                                  # progress while it watches
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    out, err = out.decode(), err.decode()
    cli.transcript += [out, err]
    assert proc.returncode == 128 + signal.SIGINT
    lines = out.splitlines()
    assert len(lines) >= 4                  # not a terminal: one line per refresh
    assert lines[0].startswith("todo 3  locked 1  done 2  error 1  (7 tokens)  "
                               "finished 3 of 7 (43%)")
    assert lines[-1].startswith("todo 2  locked 1  done 3  error 1  (7 tokens)  "
                                "finished 4 of 7 (57%)")
    assert re.search(r"  \d+\.\d\d tokens/s, ETA \d+ (s|min)$", lines[-1]), lines[-1]
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["run", "--max-token-time", "-1"], ["run", "--max-token-time", "0"],
    ["run", "--max-time", "nan"], ["run", "--heartbeat", "-5"], ["run", "--grace", "-1"],
    ["run", "--max-scrub", "-1"], ["run", "--max-tasks", "0"], ["run", "--max-tasks", "1.5"],
    ["run", "--log-limit", "-1"], ["run", "--endless", "--sleep", "0"],
    ["status", "--watch", "-1"], ["status", "--watch", "nan"], ["--timeout", "0", "status"],
    ["--timeout", "-1", "status"], ["reset", "locked", "--stale", "--lease", "inf"],
    ["reset", "locked", "--older-than", "-2"]], ids=lambda a: " ".join(a))
def test_bad_numbers_are_usage_errors_that_touch_nothing(cli, tdb, args):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    argv = args + (["--", "true"] if args[0] == "run" else []) + (
        ["--yes"] if args[0] == "reset" else [])
    result = cli(*argv)
    assert result.code == picas.EXIT_USAGE, result
    assert re.search(r"must be (at least|more than)|is not a (whole )?number", result.err), result
    assert "Traceback" not in result.err
    assert revisions(tdb) == before


def test_run_max_time_stops_claiming_in_time(cli, tdb):
    make_tokens(tdb, ["a", "b", "c", "d", "e", "f"])
    started = time.time()
    result = cli("run", "--heartbeat", "0", "--max-time", "1.5", "--max-token-time", "0.9",
                 *sh("sleep 0.4"))
    assert result.code == 0, result
    assert time.time() - started < 3.5
    finished = [t for t, s in states(tdb).items() if s == "done"]
    assert 1 <= len(finished) <= 2, states(tdb)   # 0.6 s must remain to start one more
    assert set(states(tdb).values()) == {"done", "todo"}


def test_run_endless_waits_for_new_tokens_until_max_time(cli, tdb):
    proc = subprocess.Popen([sys.executable, PICAS, "run", "--endless", "--sleep", "0.3",
                             "--heartbeat", "0", "--max-time", "6", "--", "true"],
                            env=cli.couch.env(tdb.name), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(1.0)
    assert proc.poll() is None                      # an empty view: it waits
    make_tokens(tdb, ["late"])
    assert wait_for(lambda: states(tdb) == {"t-1": "done"}, timeout=5)
    out, err = proc.communicate(timeout=20)
    cli.transcript += [out.decode(), err.decode()]
    assert proc.returncode == 0, err


def test_quiet_hides_the_per_token_lines(cli, tdb):
    make_tokens(tdb, ["a"])
    result = cli("-q", "run", "--heartbeat", "0", "--", "true")
    assert result.code == 0 and states(tdb) == {"t-1": "done"}
    assert "exit code" not in result.err and "pilot finished" not in result.err, result
    make_tokens(tdb, ["b"], prefix="u")
    result = cli("run", "--heartbeat", "0", "--", "true")
    assert "exit code 0" in result.err and "pilot finished" in result.err, result


def test_push_with_a_reused_prefix_and_other_input_fails_clearly(cli, tdb, tmp_path):
    write(tmp_path / "a.txt", "one\ntwo\n")
    write(tmp_path / "b.txt", "one\nsomething else\nthree\n")
    assert cli("push", "--id-prefix", "run9", "a.txt").code == 0
    result = cli("push", "--id-prefix", "run9", "b.txt")
    assert result.code == picas.EXIT_ERROR, result
    assert "created 1 tokens, 1 already existed (pushed before), 1 FAILED" in result.out
    assert "run9-2: this id already holds a different token" in result.err
    assert sorted(tdb.get(t)["input"] for t in states(tdb)) == ["one", "three", "two"]


# -- reset and delete ----------------------------------------------------------

def test_reset_error_tokens_go_back_to_todo_with_their_logs(cli, tdb):
    make_tokens(tdb, ["a", "b", "ok"])
    result = cli("run", "--heartbeat", "0",
                 *sh('echo "out of $1"; echo "err of $1" >&2; [ "$1" = ok ]'))
    assert result.code == 0, result
    assert states(tdb) == {"t-1": "error", "t-2": "error", "t-3": "done"}
    done_rev = tdb.get("t-3")["_rev"]
    result = cli("reset", "error", "--yes")
    assert result.code == 0, result
    assert "reset 2 tokens to todo" in result.out
    assert states(tdb) == {"t-1": "todo", "t-2": "todo", "t-3": "done"}
    assert tdb.get("t-3")["_rev"] == done_rev
    for tid, value in (("t-1", "a"), ("t-2", "b")):
        doc = tdb.get(tid)
        assert doc["scrub_count"] == 1 and doc["lock"] == 0 and doc["done"] == 0
        assert doc["exit_code"] == 1                   # the last attempt, for the record
        assert not set(doc) & {"pilot_id", "claim_id", "heartbeat"}
        assert attachment(tdb, tid) == ("out of %s\n" % value).encode()
        assert attachment(tdb, tid, "err") == ("err of %s\n" % value).encode()
    # They run again, and finish this time.
    assert cli("run", "--heartbeat", "0", *sh("exit 0")).code == 0
    assert set(states(tdb).values()) == {"done"}
    assert tdb.get("t-1")["scrub_count"] == 1


def test_reset_locked_stale_frees_only_tokens_whose_heartbeat_stopped(cli, tdb):
    now = int(time.time())
    old = now - 3600
    tdb.update([
        # heartbeat older than 3 x interval + 60 s: stale
        token("stale", lock=old, heartbeat=now - 200, heartbeat_interval=10,
              pilot_id="p1", claim_id="c1"),
        token("stale-boundary", lock=old, heartbeat=now - 380, heartbeat_interval=100),
        # no heartbeat field at all: the lock time counts
        token("stale-no-beat", lock=now - 500, heartbeat_interval=10),
        # recent heartbeats: alive
        token("fresh", lock=old, heartbeat=now - 30, heartbeat_interval=10),
        token("fresh-boundary", lock=old, heartbeat=now - 340, heartbeat_interval=100),
        # no heartbeat_interval (upstream pilot) or heartbeats off: never stale
        token("upstream", lock=now - 100000, heartbeat=now - 100000),
        token("beats-off", lock=now - 100000, heartbeat=now - 100000, heartbeat_interval=0),
        # not locked
        token("error-old", lock=old, done=old, exit_code=1, heartbeat=old,
              heartbeat_interval=10),
        token("todo"),
    ])
    before = dict((d["_id"], d) for d in token_docs(tdb))
    refused = cli("reset", "locked", "--stale")
    assert refused.code == 2 and "--yes" in refused.err
    result = cli("reset", "locked", "--stale", "--yes")
    assert result.code == 0, result
    assert "reset 3 stale tokens to todo" in result.out
    after = dict((d["_id"], d) for d in token_docs(tdb))
    reset = sorted(i for i in after if after[i]["_rev"] != before[i]["_rev"])
    assert reset == ["stale", "stale-boundary", "stale-no-beat"]
    for tid in reset:
        doc = after[tid]
        assert picas.token_state(doc) == "todo" and doc["scrub_count"] == 1
        assert not set(doc) & {"pilot_id", "claim_id", "heartbeat"}
    assert states(tdb)["fresh"] == "locked" and states(tdb)["upstream"] == "locked"
    assert states(tdb)["error-old"] == "error"
    nothing = cli("reset", "locked", "--stale", "--yes")
    assert nothing.code == 0 and "no stale tokens in locked" in nothing.out


def test_reset_locked_stale_with_a_lease(cli, tdb):
    now = int(time.time())
    tdb.update([
        token("gone", lock=now - 9000, heartbeat=now - 150, heartbeat_interval=10),
        token("alive", lock=now - 9000, heartbeat=now - 50, heartbeat_interval=10),
        # a lease shorter than twice the interval is stretched to 2 x 100 s
        token("slow-beats", lock=now - 9000, heartbeat=now - 150, heartbeat_interval=100),
        token("upstream", lock=now - 9000),
        token("upstream-recent", lock=now - 50),
    ])
    # Without a lease, tokens of pilots without heartbeats are never stale.
    result = cli("reset", "locked", "--stale", "--yes")
    assert result.code == 0, result
    assert states(tdb) == {"gone": "todo", "alive": "locked", "slow-beats": "locked",
                           "upstream": "locked", "upstream-recent": "locked"}
    tdb.save(token("gone2", lock=now - 9000, heartbeat=now - 150, heartbeat_interval=10))
    result = cli("reset", "locked", "--stale", "--lease", "100", "--yes")
    assert result.code == 0, result
    # With one, their lock time counts.
    assert states(tdb) == {"gone": "todo", "gone2": "todo", "alive": "locked",
                           "slow-beats": "locked", "upstream": "todo",
                           "upstream-recent": "locked"}


def test_reset_locked_older_than_hours(cli, tdb):
    now = int(time.time())
    tdb.update([token("5h", lock=now - 5 * 3600), token("2h", lock=now - 2 * 3600),
                token("30min", lock=now - 1800), token("todo"),
                token("done-5h", lock=now - 5 * 3600, done=now, exit_code=0)])
    result = cli("reset", "locked", "--older-than", "1", "--yes")
    assert result.code == 0 and "reset 2 tokens" in result.out, result
    assert states(tdb) == {"5h": "todo", "2h": "todo", "30min": "locked", "todo": "todo",
                           "done-5h": "done"}
    assert tdb.get("30min")["scrub_count"] == 0 and tdb.get("2h")["scrub_count"] == 1
    result = cli("reset", "locked", "--older-than", "0.25", "--yes")
    assert result.code == 0 and "reset 1 tokens" in result.out
    assert set(states(tdb).values()) == {"todo", "done"}


def test_reset_options_stale_and_older_than_exclude_each_other(cli, tdb):
    result = cli("reset", "locked", "--stale", "--older-than", "1", "--yes")
    assert result.code == 2 and "not allowed with" in result.err


def test_delete_removes_the_tokens_of_one_view(cli, tdb):
    _mixed_tokens(tdb)
    result = cli("delete", "done", "--yes")
    assert result.code == 0 and "deleted 2 tokens" in result.out, result
    assert tdb.get("done1") is None and tdb.get("done2") is None
    assert sorted(states(tdb)) == ["error1", "locked1", "not-a-token", "todo1", "todo2",
                                   "todo3"]
    assert tdb.get("_design/Monitor") is not None
    assert cli("delete", "done", "--yes").out.strip() == "no tokens to delete in done"


@pytest.mark.parametrize("args", [
    ["reset", "error"], ["reset", "locked", "--stale"], ["reset", "locked", "--older-than", "1"],
    ["delete", "error"], ["delete", "todo"],
])
def test_reset_and_delete_refuse_without_yes_when_not_on_a_terminal(cli, tdb, args):
    now = int(time.time())
    tdb.update([token("todo1"), token("error1", lock=now - 7200, done=now, exit_code=3),
                token("locked1", lock=now - 7200, heartbeat=now - 7200, heartbeat_interval=10)])
    before = revisions(tdb)
    result = cli(*args, stdin=io.StringIO(""))
    assert result.code == 2, result
    assert "not on a terminal" in result.err and "--yes" in result.err
    assert revisions(tdb) == before


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("answer, changed", [("y\n", True), ("yes\n", True), ("n\n", False),
                                             ("\n", False)])
def test_reset_and_delete_ask_on_a_terminal(cli, tdb, answer, changed):
    now = int(time.time())
    tdb.update([token("error1", lock=now, done=now, exit_code=3),
                token("done1", lock=now, done=now, exit_code=0)])
    result = cli("reset", "error", stdin=FakeTerminal(answer))
    assert result.code == 0, result
    assert "reset 1 tokens in error to todo? [y/N]" in result.out
    assert states(tdb)["error1"] == ("todo" if changed else "error")
    result = cli("delete", "done", stdin=FakeTerminal(answer))
    assert result.code == 0 and "delete 1 tokens in done? [y/N]" in result.out
    assert (tdb.get("done1") is None) == changed


# -- connection settings -------------------------------------------------------

def test_settings_flags_beat_environment_beat_picasconfig(cli, make_db, tmp_path, monkeypatch,
                                                          fast_retries):
    couch = cli.couch
    cfg_db, env_db, flag_db = make_db(), make_db(), make_db()
    dead_url = "http://127.0.0.1:%d" % free_port()
    write_config(tmp_path / "picasconfig.py", PICAS_HOST_URL=couch.url,
                 PICAS_DATABASE=cfg_db.name, PICAS_USERNAME=couch.username,
                 PICAS_PASSWORD=couch.password)
    write(tmp_path / "in.txt", "x\n")
    cli.clear_env()

    def push(prefix, *front):
        return cli(*(list(front) + ["--timeout", "2", "push", "--id-prefix", prefix, "in.txt"]))

    def holders(tid):
        return [d.name for d in (cfg_db, env_db, flag_db) if d.get(tid) is not None]

    assert push("cfg").code == 0 and holders("cfg-1") == [cfg_db.name]
    monkeypatch.setenv("PICAS_DATABASE", env_db.name)
    assert push("env").code == 0 and holders("env-1") == [env_db.name]
    assert push("flag", "--db", flag_db.name).code == 0 and holders("flag-1") == [flag_db.name]
    # URL: the environment's (dead) one beats the config's; the flag beats both.
    monkeypatch.setenv("PICAS_HOST_URL", dead_url)
    result = push("url1")
    assert result.code == 1 and "cannot reach the server" in result.err
    assert dead_url in result.err
    assert push("url2", "--url", couch.url).code == 0 and holders("url2-1") == [env_db.name]
    monkeypatch.delenv("PICAS_HOST_URL")
    # User: the environment's (unknown) user beats the config's; the flag beats both.
    monkeypatch.setenv("PICAS_USERNAME", "nobody-%s" % uuid.uuid4().hex[:6])
    result = push("user1")
    assert result.code == 1 and "user name and password" in result.err
    assert push("user2", "--user", couch.username).code == 0
    monkeypatch.delenv("PICAS_USERNAME")
    # Password: the environment's (wrong) one beats the config's.
    monkeypatch.setenv("PICAS_PASSWORD", "not-the-password")
    result = push("pw1")
    assert result.code == 1 and "not-the-password" not in text(result)
    monkeypatch.delenv("PICAS_PASSWORD")
    assert push("pw2").code == 0
    assert [holders(t) for t in ("url1-1", "user1-1", "pw1-1")] == [[], [], []]


def test_settings_from_config_option_and_pythonpath(cli, make_db, tmp_path, monkeypatch):
    couch = cli.couch
    a, b, c = make_db(), make_db(), make_db()
    cli.clear_env()
    settings = dict(PICAS_HOST_URL=couch.url, PICAS_USERNAME=couch.username,
                    PICAS_PASSWORD=couch.password)
    os.mkdir(str(tmp_path / "elsewhere"))
    os.mkdir(str(tmp_path / "onpath"))
    write_config(tmp_path / "elsewhere" / "my-settings.py", PICAS_DATABASE=a.name, **settings)
    write_config(tmp_path / "onpath" / "picasconfig.py", PICAS_DATABASE=b.name, **settings)
    write(tmp_path / "in.txt", "x\n")
    result = cli("--config", tmp_path / "elsewhere" / "my-settings.py", "push", "--id-prefix",
                 "opt", "in.txt")
    assert result.code == 0, result
    assert a.get("opt-1") is not None
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["", str(tmp_path / "onpath")]))
    assert cli("push", "--id-prefix", "path", "in.txt").code == 0
    assert b.get("path-1") is not None
    # A picasconfig.py in the working directory comes before PYTHONPATH's.
    write_config(tmp_path / "picasconfig.py", PICAS_DATABASE=c.name, **settings)
    assert cli("push", "--id-prefix", "cwd", "in.txt").code == 0
    assert c.get("cwd-1") is not None and b.get("cwd-1") is None
    result = cli("--config", tmp_path / "nope.py", "status")
    assert result.code == 2 and "does not exist" in result.err and "nope.py" in result.err


@pytest.mark.parametrize("present, complaint", [
    ((), "no server URL"),
    (("PICAS_DATABASE",), "no server URL"),
    (("PICAS_HOST_URL",), "no database name"),
    (("PICAS_HOST_URL", "PICAS_USERNAME", "PICAS_PASSWORD"), "no database name"),
])
def test_missing_url_or_database_is_a_usage_error(cli, present, complaint):
    cli.use_env(**dict((name, None) for name in SETTINGS if name not in present))
    result = cli("status")
    assert result.code == 2, result
    assert complaint in result.err and "PICAS_" in result.err and "picasconfig.py" in result.err


@pytest.mark.parametrize("where", ["global", "global=", "after-command", "in-task", "push"])
def test_password_on_the_command_line_is_refused(cli, tdb, tmp_path, where):
    secret = "cmdline-pw-%s" % uuid.uuid4().hex[:8]
    make_tokens(tdb, ["a"])
    write(tmp_path / "in.txt", "x\n")
    argv = {
        "global": ["--password", secret, "status"],
        "global=": ["--password=" + secret, "status"],
        "after-command": ["status", "--json", "--password", secret],
        "in-task": ["run", "--", "true", "--password", secret],
        "push": ["--db", tdb.name, "push", "in.txt", "--password=%s" % secret],
    }[where]
    before = revisions(tdb)
    result = cli(*argv)
    assert result.code == 2, result
    assert "never taken from the command line" in result.err
    assert "PICAS_PASSWORD" in result.err
    assert secret not in text(result)
    assert revisions(tdb) == before


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o604, True),
                                          (0o600, False), (0o400, False)])
def test_readable_picasconfig_with_a_password_warns(cli, tdb, tmp_path, mode, warned):
    couch = cli.couch
    cli.clear_env()
    path = write_config(tmp_path / "picasconfig.py", mode=mode, PICAS_HOST_URL=couch.url,
                        PICAS_DATABASE=tdb.name, PICAS_USERNAME=couch.username,
                        PICAS_PASSWORD=couch.password)
    result = cli("status", "--json")
    assert result.code == 0, result
    assert ("chmod 600" in result.err) == warned
    if warned:
        assert path in result.err and "password" in result.err
    result = cli("-q", "status", "--json")
    assert ("chmod 600" in result.err) == warned


def test_readable_picasconfig_without_a_password_does_not_warn(cli, tdb, tmp_path):
    write_config(tmp_path / "picasconfig.py", mode=0o644, PICAS_DATABASE=tdb.name)
    result = cli("status", "--json")
    assert result.code == 0 and "chmod" not in result.err


@pytest.mark.parametrize("content, complaint", [
    ('PICAS_HOST_URL = "http://x"\nPICAS_PASSWORD = "%s\n' % SENTINEL_PASSWORD,
     "cannot read config file"),
    ('PICAS_DATABASE = "db"\nif True\n    PICAS_PASSWORD = "%s"\n' % SENTINEL_PASSWORD,
     "cannot read config file"),
    ('PICAS_DATABASE = 5\nPICAS_PASSWORD = "%s"\n' % SENTINEL_PASSWORD,
     "PICAS_DATABASE must be a string"),
    ('PICAS_DATABASE = undefined_name\nPICAS_PASSWORD = "%s"\n' % SENTINEL_PASSWORD,
     "running it failed"),
])
def test_malformed_picasconfig_is_a_usage_error(cli, tdb, tmp_path, content, complaint):
    cli.clear_env()
    path = write(tmp_path / "picasconfig.py", content, mode=0o600)
    result = cli("status")
    assert result.code == 2, result
    assert complaint in result.err and path in result.err
    assert "Traceback" not in result.err


def test_picasconfig_that_computes_its_values(cli, tdb, tmp_path):
    couch = cli.couch
    cli.clear_env()
    write(tmp_path / "picasconfig.py", textwrap.dedent("""\
        import os
        PICAS_HOST_URL = %r.rstrip("/")
        PICAS_DATABASE = "".join([%r])
        PICAS_USERNAME = %r
        PICAS_PASSWORD = os.environ.get("MY_SECRET_SOURCE", "")
        """ % (couch.url + "/", tdb.name, couch.username)), mode=0o600)
    cli.monkeypatch.setenv("MY_SECRET_SOURCE", couch.password)
    result = cli("status", "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["todo"] == 0


# -- run: the quick example and the task's interface (subprocesses) ------------

def test_quick_example_from_an_empty_directory(cli, db, tmp_path):
    work = tmp_path / "quick"
    os.mkdir(str(work))
    for name in ("quickExample.txt", "process_task.sh"):
        shutil.copy(os.path.join(EXAMPLES, name), str(work / name))
    shutil.copy(PICAS, str(work / "picas.py"))
    assert os.access(str(work / "process_task.sh"), os.X_OK)
    python = [sys.executable, "picas.py"]

    result = cli.sub(python + ["views"], cwd=work)
    assert result.code == 0, result
    result = cli.sub(python + ["push", "quickExample.txt"], cwd=work)
    assert result.code == 0 and "created 3 tokens" in result.out, result
    started = time.time()
    result = cli.sub(python + ["run", "--", "./process_task.sh"], cwd=work)
    assert result.code == 0, result
    assert time.time() - started < 30
    assert "pilot finished: 3 runs (3 done, 0 error, 0 back to todo for a retry)" in result.err
    status = cli.sub(python + ["status"], cwd=work)
    assert status.out.startswith("todo 0  locked 0  done 3  error 0")

    lines = [l for l in open(os.path.join(EXAMPLES, "quickExample.txt")).read().splitlines() if l]
    docs = sorted(token_docs(db), key=lambda d: d["_id"])
    assert [d["input"] for d in docs] == lines
    for doc, letter in zip(docs, "ABC"):
        assert picas.token_state(doc) == "done" and doc["exit_code"] == 0
        assert doc["pilot_id"] and doc["hostname"] and doc["done"] >= doc["lock"] > 0
        out = attachment(db, doc["_id"]).decode()
        assert "this is token %s\n" % letter in out
        assert "token:    %s\n" % doc["_id"] in out and "exit code 0" in out
        assert attachment(db, doc["_id"], "err") == b""
    # Nothing left behind in the working directory.
    assert sorted(os.listdir(str(work))) == ["picas.py", "process_task.sh", "quickExample.txt"]


DUMP_TASK = """
#!{python}
# Dumps what the task got; bytes decoded as UTF-8 whatever the locale says.
import json, os, sys
argv = [os.fsencode(arg).decode("utf-8") for arg in sys.argv[1:]]
env = dict((k.decode("utf-8"), v.decode("utf-8")) for k, v in os.environb.items())
with open(env["PICAS_TOKEN_FILE"], "rb") as fh:
    token = json.loads(fh.read().decode("utf-8"))
record = {"argv": argv, "env": env, "token": token, "token_file": env["PICAS_TOKEN_FILE"],
          "cwd": os.getcwd()}
with open(%r, "ab") as fh:
    fh.write(json.dumps(record).encode("ascii") + b"\\n")
for key, value in sorted(env.items()):
    sys.stdout.buffer.write(("%%s=%%s\\n" %% (key, value)).encode("utf-8"))
"""


def _dump_task(tmp_path):
    dump = str(tmp_path / "dump.jsonl")
    path = script(tmp_path / "dump_task.py", DUMP_TASK % dump)
    return path, dump


def _records(cli, dump):
    with open(dump, "rb") as fh:
        raw = fh.read().decode("ascii")
    cli.transcript.append(raw)
    return dict((r["argv"][1], r) for r in map(json.loads, raw.splitlines()))


def test_task_gets_input_id_and_token_file_but_not_the_password(cli, db, tmp_path):
    task, dump = _dump_task(tmp_path)
    nasty = "it's \"quoted\" $(touch pwned) ; touch pwned2 && echo `id` * \u00e9\u2713 \\n"
    write(tmp_path / "in.txt", "plain\n" + nasty + "\n")
    assert cli.picas("views").code == 0
    assert cli.picas("push", "--id-prefix", "t", "in.txt").code == 0
    result = cli.picas("run", "--heartbeat", "0", "--", task)
    assert result.code == 0, result
    records = _records(cli, dump)
    assert sorted(records) == ["t-1", "t-2"]
    for tid, value in (("t-1", "plain"), ("t-2", nasty)):
        rec = records[tid]
        assert rec["argv"] == [value, tid]
        env = rec["env"]
        assert env["PICAS_TOKEN_ID"] == tid and env["PICAS_TOKEN_INPUT"] == value
        assert "PICAS_PASSWORD" not in env
        assert not [k for k, v in env.items() if cli.couch.password in v]
        assert rec["token"]["_id"] == tid and rec["token"]["input"] == value
        assert picas.token_state(rec["token"]) == "locked"
        assert rec["token"]["pilot_id"] == db.get(tid)["pilot_id"]
        assert not os.path.exists(rec["token_file"])          # removed after the task
        assert rec["cwd"] == str(tmp_path)
        out = attachment(db, tid).decode("utf-8")
        assert "PICAS_TOKEN_ID=%s\n" % tid in out and "PICAS_PASSWORD" not in out
    assert not os.path.exists(str(tmp_path / "pwned"))
    assert not os.path.exists(str(tmp_path / "pwned2"))
    assert set(states(db).values()) == {"done"}


def test_non_ascii_input_under_the_c_locale(cli, tdb, tmp_path):
    task, dump = _dump_task(tmp_path)
    value = "caf\u00e9 \u2713 \u65e5\u672c"
    write(tmp_path / "in.txt", value + "\n")
    assert cli("push", "--id-prefix", "t", "in.txt").code == 0
    env = cli.couch.env(tdb.name)
    for name in list(env):
        if name == "LANG" or name.startswith("LC_") or name.startswith("PYTHON"):
            del env[name]
    env["LC_ALL"] = "C"
    result = cli.sub([sys.executable, PICAS, "run", "--heartbeat", "0", "--", task], env=env)
    assert result.code == 0, result
    assert states(tdb) == {"t-1": "done"}, tdb.get("t-1").get("error")
    record = _records(cli, dump)["t-1"]
    assert record["argv"] == [value, "t-1"] and record["env"]["PICAS_TOKEN_INPUT"] == value


def test_non_string_input_arrives_as_json(cli, tdb, tmp_path):
    task, dump = _dump_task(tmp_path)
    values = [{"a": 1}, 5, [1, "x", None], None, True, "5", ""]
    write(tmp_path / "t.json", "\n".join(json.dumps({"input": v}) for v in values))
    assert cli("push", "--json", "--id-prefix", "t", "t.json").code == 0
    result = cli.picas("run", "--heartbeat", "0", "--", task)
    assert result.code == 0, result
    records = _records(cli, dump)
    for n, value in enumerate(values, 1):
        rec = records["t-%d" % n]
        expected = value if isinstance(value, str) else json.dumps(value)
        assert rec["argv"][0] == expected
        assert rec["env"]["PICAS_TOKEN_INPUT"] == expected
        assert rec["token"]["input"] == value
        if not isinstance(value, str):
            assert json.loads(rec["argv"][0]) == value
    assert set(states(tdb).values()) == {"done"}


def test_python_example_runs_the_quick_example(cli, db, tmp_path):
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, str(work))
    shutil.copy(PICAS, str(work / "picas.py"))
    python = [sys.executable]
    assert cli.sub(python + ["picas.py", "views"], cwd=work).code == 0
    assert cli.sub(python + ["picas.py", "push", "quickExample.txt"], cwd=work).code == 0
    result = cli.sub(python + ["local_example.py"], cwd=work)
    assert result.code == 0, result
    assert "processed 3 tokens" in result.out
    docs = sorted(token_docs(db), key=lambda d: d["_id"])
    assert len(docs) == 3
    for doc, letter in zip(docs, "ABC"):
        assert picas.token_state(doc) == "done" and doc["exit_code"] == 0
        assert "this is token %s\n" % letter in attachment(db, doc["_id"]).decode()
    # Nothing left to do: the example says so.
    again = cli.sub(python + ["local_example.py"], cwd=work)
    assert again.code == 3 and "processed 0 tokens" in again.out


# -- run: bad inputs -----------------------------------------------------------

class _HTMLHandler(BaseHTTPRequestHandler):
    def _answer(self, body=True):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        page = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if body:
            self.wfile.write(page)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def do_HEAD(self):
        self._answer(body=False)

    def log_message(self, *args):
        pass


class _ThreadingHTTPServer(ThreadingMixIn, HTTPServer):
    daemon_threads = True


@pytest.fixture
def html_server():
    server = _ThreadingHTTPServer(("127.0.0.1", 0), _HTMLHandler)
    thread = threading.Thread(target=server.serve_forever)
    thread.daemon = True
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


COMMANDS = {
    "status": ["status"],
    "push": ["push", "in.txt"],
    "run": ["run", "--heartbeat", "0", "--", "true"],
    "reset": ["reset", "error", "--yes"],
    "delete": ["delete", "todo", "--yes"],
    "views": ["views"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreachable_server(cli, tdb, tmp_path, command, fast_retries):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    write(tmp_path / "in.txt", "x\n")
    url = "http://127.0.0.1:%d" % free_port()
    started = time.time()
    result = cli("--url", url, "--timeout", "2", *COMMANDS[command])
    assert time.time() - started < 10
    assert result.code == 1, result
    assert "cannot reach the server (9 attempts)" in result.err
    assert "connection refused" in result.err and url in result.err
    assert "Traceback" not in result.err
    assert revisions(tdb) == before


@pytest.mark.parametrize("command", ["status", "push", "run", "reset"])
def test_server_that_is_not_couchdb(cli, tdb, tmp_path, html_server, command):
    make_tokens(tdb, ["a"])
    write(tmp_path / "in.txt", "x\n")
    result = cli("--url", html_server, "--timeout", "2", *COMMANDS[command])
    assert result.code == 1, result
    assert "not JSON" in result.err and "really a CouchDB server" in result.err
    assert "Traceback" not in result.err
    assert states(tdb) == {"t-1": "todo"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_database(cli, tdb, tmp_path, command):
    missing = "no-such-db-%s" % uuid.uuid4().hex[:8]
    write(tmp_path / "in.txt", "x\n")
    result = cli("--db", missing, *COMMANDS[command])
    assert result.code == 2, result
    assert "database '%s' does not exist" % missing in result.err
    assert "--create-db" in result.err
    assert missing not in cli.couch.server().all_databases()     # not created on the way


@pytest.mark.parametrize("command", ["run", "status", "reset", "delete"])
def test_missing_views(cli, db, command):
    make_tokens(db, ["a", "b"])
    before = revisions(db)
    result = cli(*COMMANDS[command])
    assert result.code in (1, 2), result
    assert "picas.py views" in result.err
    assert "Traceback" not in result.err
    assert revisions(db) == before
    assert set(states(db).values()) == {"todo"}


@pytest.mark.parametrize("command", ["status", "push", "run", "reset"])
@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_wrong_credentials(cli, tdb, tmp_path, command, who):
    make_tokens(tdb, ["a"])
    before = revisions(tdb)
    write(tmp_path / "in.txt", "x\n")
    wrong = "wrong-pw-%s" % uuid.uuid4().hex[:8]
    if who == "wrong-password":
        cli.use_env(PICAS_PASSWORD=wrong)
    else:
        cli.use_env(PICAS_USERNAME="nobody-%s" % uuid.uuid4().hex[:6])
    result = cli(*COMMANDS[command])
    assert result.code == 1, result
    assert "HTTP 401" in result.err and "user name and password" in result.err
    assert wrong not in text(result)
    assert "Traceback" not in result.err
    assert revisions(tdb) == before


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory", "not-on-path",
                                  "nothing", "only-dashes"])
def test_task_command_that_cannot_run_is_refused_before_claiming(cli, tdb, tmp_path, kind):
    make_tokens(tdb, ["a", "b"])
    before = revisions(tdb)
    write(tmp_path / "noexec.sh", "#!/bin/sh\nexit 0\n", mode=0o644)
    os.mkdir(str(tmp_path / "adir"))
    argv, complaint = {
        "missing": (["--", "./missing.sh"], "command ./missing.sh does not exist"),
        "not-executable": (["--", "./noexec.sh"], "not executable: chmod +x ./noexec.sh"),
        "directory": (["--", "./adir"], "not executable"),
        "not-on-path": (["--", "no-such-command-%s" % uuid.uuid4().hex[:6]], "not found on PATH"),
        "nothing": ([], "no command to run"),
        "only-dashes": (["--"], "no command to run"),
    }[kind]
    result = cli("run", "--heartbeat", "0", *argv)
    assert result.code == 2, result
    assert complaint in result.err
    assert revisions(tdb) == before


def test_task_with_a_broken_interpreter_ends_in_error_not_locked(cli, tdb, tmp_path):
    make_tokens(tdb, ["a", "b"])
    script(tmp_path / "broken.sh", "#!/no/such/interpreter\nexit 0\n")
    result = cli("run", "--heartbeat", "0", "--", "./broken.sh")
    assert result.code == 0, result
    assert states(tdb) == {"t-1": "error", "t-2": "error"}
    for tid in ("t-1", "t-2"):
        doc = tdb.get(tid)
        assert doc["exit_code"] != 0
        assert "No such file or directory" in doc["error"][-1]["message"]
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith("picas-")] == []


@pytest.mark.parametrize("kind", ["nul-byte", "too-long"])
def test_input_that_cannot_be_an_argument_ends_in_error(cli, tdb, tmp_path, kind):
    value = "a\u0000b" if kind == "nul-byte" else "x" * 300000
    write(tmp_path / "t.json", json.dumps([{"input": value}, {"input": "fine"}]))
    assert cli("push", "--json", "--id-prefix", "t", "t.json").code == 0
    result = cli("run", "--heartbeat", "0", *sh('echo "ran $2"'))
    assert result.code == 0, result
    assert states(tdb) == {"t-1": "error", "t-2": "done"}
    doc = tdb.get("t-1")
    message = doc["error"][-1]["message"]
    assert ("null" in message) if kind == "nul-byte" else ("environment variable may hold" in message)
    assert attachment(tdb, "t-2") == b"ran t-2\n"


def test_token_ids_with_slashes_spaces_and_unicode(cli, tdb, tmp_path):
    ids = ["dir/sub id \u00e9", "100%", "a+b&c=d?e#f"]
    write(tmp_path / "t.json", json.dumps([{"_id": i, "input": "in-%d" % n}
                                           for n, i in enumerate(ids)]))
    assert cli("push", "--json", "t.json").code == 0
    result = cli("run", "--heartbeat", "0", *sh('printf "%s|%s|%s" "$1" "$2" "$PICAS_TOKEN_ID"'))
    assert result.code == 0, result
    for n, tid in enumerate(ids):
        assert picas.token_state(tdb.get(tid)) == "done"
        assert attachment(tdb, tid).decode("utf-8") == "in-%d|%s|%s" % (n, tid, tid)


def test_binary_and_non_utf8_output_is_kept_byte_for_byte(cli, tdb, tmp_path):
    out = bytes(bytearray(range(256))) * 3 + b"\xff\xfe\x80 not utf-8 \xc3\x28\n\x00end"
    err = b"\x00\x01 stderr \xe9t\xe9\r\n"
    task = script(tmp_path / "binary.py", """
        #!{python}
        import sys
        sys.stdout.buffer.write(%r)
        sys.stderr.buffer.write(%r)
        """ % (out, err))
    make_tokens(tdb, ["a"])
    result = cli("run", "--heartbeat", "0", "--", task)
    assert result.code == 0, result
    assert attachment(tdb, "t-1") == out
    assert attachment(tdb, "t-1", "err") == err
    assert states(tdb) == {"t-1": "done"}


@pytest.mark.parametrize("limit, size", [(100000, 30000000), (None, 3000000)])
def test_huge_output_keeps_head_and_tail(cli, tdb, tmp_path, limit, size):
    full = str(tmp_path / "full.txt")
    make_tokens(tdb, ["a"])
    args = ["run", "--heartbeat", "0"]
    if limit:
        args += ["--log-limit", str(limit)]
    started = time.time()
    result = cli(*(args + sh("head -c %d /dev/urandom | base64 | tee %s; echo done >&2"
                             % (size, full))))
    assert result.code == 0, result
    assert time.time() - started < 30
    with open(full, "rb") as fh:
        data = fh.read()
    assert len(data) > size
    keep = limit or picas.DEFAULT_LOG_LIMIT
    stored = attachment(tdb, "t-1")
    assert keep < len(stored) <= keep + 100
    assert stored.startswith(data[:keep // 4])
    assert stored.endswith(data[-(keep - keep // 4):])
    marker = stored[keep // 4:len(stored) - (keep - keep // 4)]
    assert marker == ("\n[... picas.py cut %d bytes from the middle of this log ...]\n"
                      % (len(data) - keep)).encode()
    assert attachment(tdb, "t-1", "err") == b"done\n"
    assert states(tdb) == {"t-1": "done"}


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM", "SIGUSR1", "SIGINT"])
def test_task_killed_by_a_signal_records_128_plus_n(cli, tdb, signame):
    make_tokens(tdb, ["a", "b"])
    signum = getattr(signal, signame)
    # sh ignores SIGINT for itself only when interactive; send it with the
    # default disposition restored to be sure.
    code = "trap - INT; kill -%s $$; sleep 5" % signame[3:]
    result = cli.picas("run", "--heartbeat", "0", "--grace", "1", *sh(code))
    assert result.code == 0, result                  # the pilot itself was not stopped
    for tid in ("t-1", "t-2"):
        doc = tdb.get(tid)
        assert doc["exit_code"] == 128 + signum
        assert picas.token_state(doc) == "error"
    assert "exit code %d" % (128 + signum) in result.err


def test_max_token_time_kills_the_task(cli, tdb):
    make_tokens(tdb, ["a"])
    started = time.time()
    result = cli.picas("run", "--heartbeat", "0", "--grace", "1", "--max-token-time", "1",
                       *sh("sleep 30"))
    elapsed = time.time() - started
    assert result.code == 0, result
    assert elapsed < 8, elapsed
    doc = tdb.get("t-1")
    assert doc["exit_code"] == 124 and picas.token_state(doc) == "error"
    assert "timed out after 1.0 s" in doc["error"][-1]["message"]


def test_max_token_time_kills_a_task_that_ignores_sigterm_after_the_grace(cli, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    started = time.time()
    result = cli.picas("run", "--heartbeat", "0", "--grace", "1", "--max-token-time", "1",
                       *sh("trap '' TERM; sleep 30; sleep 30"))
    elapsed = time.time() - started
    assert result.code == 0, result
    assert 2 <= elapsed < 10, elapsed
    assert "SIGKILL" in result.err
    doc = tdb.get("t-1")
    assert doc["exit_code"] == 124 and picas.token_state(doc) == "error"


def test_max_scrub_retries_a_failing_task(cli, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    log = str(tmp_path / "runs.log")
    result = cli("run", "--heartbeat", "0", "--max-scrub", "2",
                 *sh('echo "$2" >> %s; echo "attempt"; exit 3' % log))
    assert result.code == 0, result
    assert executions(log) == ["t-1"] * 3
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "error"
    assert doc["scrub_count"] == 2 and doc["exit_code"] == 3
    assert attachment(tdb, "t-1") == b"attempt\n"
    assert "pilot finished: 3 runs (0 done, 1 error, 2 back to todo for a retry)" in result.err


def test_run_exit_status_and_limits(cli, tdb, tmp_path):
    result = cli("run", "--heartbeat", "0", "--", "true")
    assert result.code == 3, result                           # no work
    make_tokens(tdb, ["a", "b", "c"])
    result = cli("run", "--heartbeat", "0", "--max-tasks", "2", "--", "true")
    assert result.code == 0 and "2 runs (2 done, 0 error, 0 back to todo for a retry)" in result.err
    assert sorted(states(tdb).values()) == ["done", "done", "todo"]
    # Without "--" the command and its options still go to the task.
    left = [d["input"] for d in token_docs(tdb) if picas.token_state(d) == "todo"]
    log = str(tmp_path / "args.log")
    result = cli("run", "--heartbeat", "0", "sh", "-c", 'echo "$0 $1" >> %s' % log, "--grace")
    assert result.code == 0, result
    assert executions(log) == ["--grace %s" % left[0]]
    assert set(states(tdb).values()) == {"done"}


def test_heartbeat_fields_let_reset_stale_tell_live_pilots(cli, tdb, tmp_path):
    """A pilot with heartbeats records heartbeat_interval; reset --stale leaves it alone."""
    make_tokens(tdb, ["a"])
    marker = str(tmp_path / "running")
    proc = subprocess.Popen([sys.executable, PICAS, "run", "--heartbeat", "2", "--grace", "1",
                             "--", "sh", "-c", "touch %s; sleep 5" % marker, "sh"],
                            env=cli.couch.env(tdb.name), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: os.path.exists(marker), timeout=20)
        first = tdb.get("t-1")
        assert picas.token_state(first) == "locked" and first["heartbeat_interval"] == 2
        assert wait_for(lambda: tdb.get("t-1")["_rev"] != first["_rev"], timeout=4)
        beat = tdb.get("t-1")
        assert picas.token_state(beat) == "locked" and beat["heartbeat"] > first["heartbeat"]
        # Even a 1 s lease is stretched to twice the interval: a live pilot is not dead.
        result = cli("reset", "locked", "--stale", "--lease", "1", "--yes")
        assert result.code == 0 and "no stale tokens" in result.out, result
    finally:
        out, err = proc.communicate(timeout=30)
        cli.transcript += [out.decode(), err.decode()]
    assert proc.returncode == 0
    assert states(tdb) == {"t-1": "done"}


# -- the rest of the command line ----------------------------------------------

def test_version_help_and_unknown_commands(cli):
    result = cli("--version")
    assert result.code == 0 and picas.__version__ in result.out
    result = cli()
    assert result.code == 2 and "views" in result.out and "exit status" in result.out
    result = cli("frobnicate")
    assert result.code == 2 and "invalid choice" in result.err
    result = cli("status", "--no-such-option")
    assert result.code == 2 and "unrecognized arguments" in result.err


def test_bad_url_is_reported_clearly(cli, tdb):
    for url, complaint in (("ftp://127.0.0.1/", "only http:// and https://"),
                           ("http://", "no host name")):
        result = cli("--url", url, "status")
        assert result.code != 0 and complaint in result.err, result
    result = cli("--url", "https://127.0.0.1:1", "--cafile", "/nonexistent/ca.pem", "status")
    assert result.code != 0 and "does not exist" in result.err


# -- bugs (strict xfails) ------------------------------------------------------

def test_credentials_in_the_url_do_not_reach_the_task(cli, tdb, tmp_path):
    cli.check_secrets_at_teardown = False        # checked below, where xfail applies
    couch = cli.couch
    url = couch.url.replace("://", "://%s:%s@" % (quote(couch.username, safe=""),
                                                  quote(couch.password, safe="")), 1)
    cli.use_env(PICAS_HOST_URL=url, PICAS_USERNAME=None, PICAS_PASSWORD=None)
    task, dump = _dump_task(tmp_path)
    make_tokens(tdb, ["a"])
    result = cli("run", "--heartbeat", "0", "--", task)
    assert result.code == 0, result
    assert states(tdb) == {"t-1": "done"}
    record = _records(cli, dump)["t-1"]
    assert not [k for k, v in record["env"].items() if couch.password in v]
    cli.assert_secret_free()


def test_password_inside_the_url_flag_is_refused(cli, tdb):
    cli.use_env(PICAS_HOST_URL=None, PICAS_USERNAME=None, PICAS_PASSWORD=None)
    couch = cli.couch
    url = couch.url.replace("://", "://%s:%s@" % (couch.username, couch.password), 1)
    result = cli("--url", url, "status")
    assert couch.password not in text(result)
    assert result.code == 2


def test_push_ignores_a_utf8_byte_order_mark(cli, tdb, tmp_path):
    write(tmp_path / "bom.txt", b"\xef\xbb\xbfecho hi\necho there\n")
    assert cli("push", "--id-prefix", "t", "bom.txt").code == 0
    assert tdb.get("t-1")["input"] == "echo hi"
    write(tmp_path / "bom.json", b'\xef\xbb\xbf[{"input": "x"}]')
    result = cli("push", "--json", "--id-prefix", "j", "bom.json")
    assert result.code == 0, result
    assert tdb.get("j-1")["input"] == "x"


@pytest.mark.parametrize("args", [["--url", "ftp://127.0.0.1/"], ["--url", "http://"],
                                  ["--url", "https://127.0.0.1:1", "--cafile", "/nonexistent.pem"]])
def test_bad_url_or_cafile_exits_2(cli, tdb, args):
    result = cli(*(args + ["status"]))
    assert result.code == 2, result


def test_main_leaves_the_picas_logger_as_it_found_it(cli, tdb):
    logger = logging.getLogger("picas")
    # As a fresh import leaves it (other tests may have changed it; `isolated` restores it).
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    logger.handlers[:] = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert cli("status").code == 0
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_a_refused_result_write_is_not_dropped(cli, tdb, tmp_path):
    tdb.save({"_id": "_design/validate", "validate_doc_update":
              "function(newDoc, oldDoc, userCtx) {\n"
              "  if (newDoc.done > 0) { throw({forbidden: 'results go elsewhere'}); }\n}\n"})
    make_tokens(tdb, ["a"])
    result = cli("run", "--heartbeat", "0", *sh('echo "precious result"'))
    # Refused for good: the token stays locked and the result waits in the journal.
    assert states(tdb)["t-1"] == "locked"
    entries = glob.glob(os.path.join(str(tmp_path), "picas-journal", "*.json"))
    assert len(entries) == 1, entries
    kept = json.load(open(entries[0]))["result"]
    assert kept["exit_code"] == 0 and kept["_id"] == "t-1"
    assert "picas.py replay" in result.err and "results go elsewhere" in result.err
