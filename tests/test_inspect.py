"""Looking into a campaign from the command line (issues 14 and 15).

``status --errors`` (failures per exit code and per host, the latest error
messages), ``show ID``, ``logs ID``, ``export VIEW`` and ``has-work``, on
pools that real pilots ran against the real test server. Every figure a
test checks is computed again from the documents the server holds.
"""
import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest

import picas
from helpers import PICAS, ensure_views, make_tokens, wait_for
from test_cli import cli, isolated  # noqa: F401  (fixtures)
from test_faults import script, token_docs

TASK = """\
case "$1" in
  ok*) echo "out of $1"; echo "err of $1" >&2; exit 0 ;;
  two*) echo "failing $1" >&2; exit 2 ;;
  missing*) exec /no/such/program ;;
esac
exit 9
"""


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


def pilot(cli, host, *options):
    """A real pilot as a subprocess on host ``host`` (``PICAS_HOSTNAME``)."""
    task = script(cli.tmp_path / "task.sh", TASK)
    env = cli.couch.env(cli.db.name)
    env["PICAS_HOSTNAME"] = host
    return cli.picas("run", "--heartbeat", "0", *(list(options) + ["--", task]), env=env)


@pytest.fixture
def campaign(cli, tdb):
    """node-b ran 3 good and 3 failing tokens (black-hole check off); node-a then
    failed 3 fast in a row and stopped as a black hole (exit 4)."""
    make_tokens(tdb, ["ok-1", "ok-2", "ok-3", "two-1", "two-2", "missing-1"], prefix="b")
    result = pilot(cli, "node-b", "--black-hole", "0")
    assert result.code == 0, result
    make_tokens(tdb, ["two-a1", "two-a2", "two-a3"], prefix="a")
    result = pilot(cli, "node-a", "--black-hole", "3")
    assert result.code == picas.EXIT_BLACK_HOLE, result
    return tdb


def expected_failures(db):
    """The figures of status --errors, computed here from the stored documents."""
    codes, hosts, entries = {}, {}, []
    for doc in token_docs(db).values():
        state = picas.token_state(doc)
        if state == "error" or (state == "todo" and doc.get("exit_code")):
            row = codes.setdefault(str(doc["exit_code"]), {"error": 0, "todo": 0})
            row[state] += 1
        if state == "error":
            hosts.setdefault(doc["hostname"], [0, 0])[0] += 1
        for host in doc.get("failed_hosts", []):
            hosts.setdefault(host, [0, 0])[1] += 1
        for entry in doc.get("error") or []:
            entries.append((entry["time"], doc["_id"], entry["message"]))
    return codes, hosts, entries


def test_status_errors_breaks_failures_down_per_exit_code_and_host(cli, campaign):
    codes, hosts, entries = expected_failures(campaign)
    # The campaign is what we meant: node-a's three tokens are back in todo.
    assert codes == {"2": {"error": 2, "todo": 3}, "127": {"error": 1, "todo": 0}}
    assert hosts["node-a"] == [0, 3] and hosts["node-b"] == [3, 0]
    result = cli("status", "--errors", "4", "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    assert (report["todo"], report["done"], report["error"]) == (3, 3, 3)
    failures = report["failures"]
    assert failures["error_tokens"] == 3 and failures["exit_codes"] == codes
    for host, (errors, black_hole) in hosts.items():
        assert (failures["hosts"][host]["error"], failures["hosts"][host]["failed_hosts"]) == \
            (errors, black_hole)
    newest = sorted(entries, reverse=True)[:4]
    assert len(failures["latest"]) == min(4, len(entries))
    assert [item["time"] for item in failures["latest"]] == [t for t, _, _ in newest]
    assert set(item["id"] for item in failures["latest"]) <= set(i for _, i, _ in entries)
    # The black hole's messages are the newest, and name it.
    assert "looks broken" in failures["latest"][0]["message"]
    assert failures["latest"][0]["hostname"] == "node-a"

    text = cli("status", "--errors").out
    assert "todo 3  locked 0  done 3  error 3" in text
    rows = dict((ln.split(None, 2)[2], ln.split()[:2]) for ln in text.splitlines()
                if "   exit code " in ln)
    assert rows == {"exit code 2": ["2", "3"], "exit code 127 (command not found)": ["1", "0"]}
    hosts_shown = dict((ln.split()[3], ln.split()[:3] + ln.split()[4:]) for ln in
                       text.splitlines() if " node-" in ln and "[" not in ln)
    assert hosts_shown["node-a"][:3] == ["0", "3", "3"] and "broken" in hosts_shown["node-a"][-2]
    assert hosts_shown["node-b"] == ["3", "0", str(sum(1 for e in entries if e[1][0] == "b"))]
    assert "latest %d error messages" % min(10, len(entries)) in text


def test_bad_input_escape_sequences_in_tokens(cli, tdb):
    """Ids, host names and messages are shown with control characters escaped."""
    evil = "evil\x1b[2J\x07"
    tdb.save(dict(picas.TOKEN_DEFAULTS, _id=evil, lock=1, done=2, exit_code=3, hostname="h\x1b",
                  error=[{"time": 5, "message": "line one\nline\x1b[31m two"}],
                  note="\x1b]0;title\x07", run_seconds="\x1b[5m", live_log="not a dict",
                  _attachments={"a.txt": {"content_type": "text/\x1b[1m", "data": "eA=="}}))
    for argv in (["status", "--errors"], ["show", evil]):
        result = cli(*argv)
        assert result.code == 0, result
        assert "\x1b" not in result.out and "\x07" not in result.out
        assert "evil\\x1b[2J\\x07" in result.out and "line\\x1b[31m two" in result.out
    assert "\\x1b]0;title\\x07" in result.out


def test_status_errors_on_a_pool_without_failures(cli, tdb):
    make_tokens(tdb, ["x"])
    result = cli("status", "--errors", "--json")
    assert json.loads(result.out)["failures"] == {
        "error_tokens": 0, "exit_codes": {}, "hosts": {}, "latest": []}
    assert "0 tokens in error" in cli("status", "--errors").out


# -- show ----------------------------------------------------------------------

def test_show_tells_a_tokens_story(cli, campaign):
    result = cli("show", "b-4")
    assert result.code == 0, result
    text = result.out
    assert "token b-4" in text and "state        error" in text
    assert "on node-b" in text and "exit code 2" in text
    assert "logs_b-4.err" in text and "logs_b-4.out" in text
    doc = campaign.get("b-4")
    size = doc["_attachments"]["logs_b-4.err"]["length"]
    assert [ln for ln in text.splitlines() if "logs_b-4.err" in ln][0].split()[1] == str(size)
    assert "claims       1 seen" in text

    # A black-hole token: back in todo, naming the host it failed on.
    text = cli("show", "a-1").out
    assert "state        todo" in text and "failed on    node-a" in text
    assert "looks broken" in text                  # its error entry

    stored = json.loads(cli("show", "b-1", "--json").out)
    assert stored["_id"] == "b-1" and stored["exit_code"] == 0


def test_show_lists_every_claim_the_server_still_holds(cli, tdb):
    make_tokens(tdb, ["two-x"], prefix="s")
    assert pilot(cli, "node-c", "--black-hole", "0", "--max-scrub", "1").code == 0
    doc = tdb.get("s-1")
    assert picas.token_state(doc) == "error" and doc["scrub_count"] == 1
    text = cli("show", "s-1").out
    lines = text.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith("  claims")][0]
    assert lines[at].split()[1] == "2"
    first, second = lines[at + 1:at + 3]
    assert "todo again on node-c, exit code 2" in first     # scrubbed: tried again
    assert "error      on node-c, exit code 2" in second
    assert "attempts     scrub_count 1" in text


def test_bad_input_unknown_token_id(cli, tdb):
    make_tokens(tdb, ["never"], prefix="n")
    for argv in (["show", "nope"], ["logs", "nope"], ["logs", "nope", "--follow"]):
        result = cli(*argv)
        assert result.code == picas.EXIT_ERROR, result
        assert "no token 'nope' in database %s" % tdb.name in result.err
        assert "Traceback" not in result.err
    result = cli("logs", "n-1")
    assert result.code == picas.EXIT_ERROR
    assert "token n-1 has no attached stdout (state todo: it has not run yet)" in result.err


# -- logs ----------------------------------------------------------------------

def test_logs_prints_the_attached_output_byte_for_byte(cli, campaign):
    doc = campaign.get("b-1")
    out = campaign.get_attachment(doc, "logs_b-1.out")
    err = campaign.get_attachment(doc, "logs_b-1.err")
    assert out == b"out of ok-1\n" and err == b"err of ok-1\n"
    result = cli.picas("logs", "b-1")
    assert result.code == 0 and result.out == out.decode()
    result = cli.picas("logs", "b-1", "--err")
    assert result.code == 0 and result.out == err.decode()


def test_logs_follow_shows_a_running_task_and_ends_with_it(cli, tdb):
    """The pilot sends its task's latest output with each heartbeat (live_log);
    logs --follow, started before any pilot, waits for the claim, prints the
    output as it grows, and the rest once the token is done."""
    make_tokens(tdb, ["slow"], prefix="f")
    task = script(cli.tmp_path / "slow.sh", """\
        for i in 1 2 3 4 5 6; do echo "line $i"; sleep 1; done
        """)
    env = cli.couch.env(cli.db.name)
    follow = subprocess.Popen([sys.executable, PICAS, "logs", "f-1", "--follow", "--interval",
                               "0.3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        pilot_proc = subprocess.Popen([sys.executable, PICAS, "run", "--heartbeat", "1", "--",
                                       task], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        seen_live = wait_for(lambda: (tdb.get("f-1") or {}).get("live_log"), timeout=30)
        assert pilot_proc.wait(timeout=60) == 0
        out, err = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert seen_live and follow.returncode == 0, err
    out, err = out.decode(), err.decode()
    assert out.split("\n") == ["line %d" % i for i in range(1, 7)] + [""]
    assert "waiting for a pilot to claim it" in err and "is running on" in err
    assert "finished: done, exit code 0" in err
    assert "live_log" not in tdb.get("f-1")


def _logs_output(env, token_id, terminal):
    """What `picas.py logs TOKEN` writes to its stdout: a pseudo-terminal, or a pipe."""
    if not terminal:
        proc = subprocess.run([sys.executable, PICAS, "logs", token_id], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    import select
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, PICAS, "logs", token_id], env=env, stdout=slave,
                            stderr=subprocess.PIPE)
    os.close(slave)
    chunks, deadline = [], time.time() + 60
    try:
        while True:
            if not select.select([master], [], [], max(0, deadline - time.time()))[0]:
                proc.kill()
                raise AssertionError("`logs %s` wrote no end within 60 s: %r"
                                     % (token_id, b"".join(chunks)))
            try:
                chunk = os.read(master, 4096)
            except OSError:                     # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    err = proc.stderr.read()
    proc.stderr.close()
    return proc.wait(timeout=60), b"".join(chunks), err


def test_a_live_tail_shown_on_a_terminal_escapes_control_characters(cli, tdb):
    """live_log is a token field anyone who can write the database can set: on a terminal its
    escape sequences (a title change, a screen clear) are shown as \\xNN, newlines and tabs
    kept; through a pipe the tail is passed on byte for byte."""
    make_tokens(tdb, ["hostile"], prefix="h")
    doc = tdb.get("h-1")
    tail = "line 1\n\tindented \x1b]0;owned\x07 then \x1b[2J cleared \x9b31m\n"
    doc.update(lock=int(time.time()), hostname="node-x",
               live_log={"out": tail, "err": "", "time": int(time.time())})
    tdb.save(doc)
    env = cli.couch.env(cli.db.name)
    code, out, err = _logs_output(env, "h-1", terminal=True)
    assert code == 0, err
    shown = out.decode("utf-8").replace("\r\n", "\n")     # the terminal adds the \r
    assert shown == ("line 1\n\tindented \\x1b]0;owned\\x07 then \\x1b[2J cleared "
                     "\\x9b31m\n"), shown
    assert b"\x1b" not in out and b"\x07" not in out and "\x9b" not in out.decode("utf-8")
    assert b"is running on node-x" in err
    code, out, err = _logs_output(env, "h-1", terminal=False)
    assert code == 0, err
    assert out == tail.encode("utf-8")


# -- export --------------------------------------------------------------------

def test_export_streams_every_token_in_pages(cli, tdb):
    ids = make_tokens(tdb, ["in %d" % i for i in range(1203)], prefix="e")
    tdb.save({"_id": "not-a-token", "kind": "config"})
    out = cli.tmp_path / "all.jsonl"
    result = cli("export", "all", "-o", out)
    assert result.code == 0, result
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["_id"] for r in rows) == sorted(ids)          # each once, no non-token
    stored = token_docs(tdb)
    assert all(dict(stored[r["_id"]], _attachments=None) == dict(r, _attachments=None)
               for r in rows)
    result = cli("export", "todo", "--fields", "_id,state,input")
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert len(rows) == 1203 and rows[0] == {"_id": rows[0]["_id"], "state": "todo",
                                             "input": stored[rows[0]["_id"]]["input"]}
    assert cli("export", "done").out == ""


def test_export_csv_with_nested_fields(cli, tdb):
    tdb.save(dict(picas.TOKEN_DEFAULTS, _id="c1", input="naïve, \"quoted\"\nline", lock=1,
                  done=2, exit_code=0, output={"energy": 1.5, "tags": ["a"]}))
    tdb.save(dict(picas.TOKEN_DEFAULTS, _id="c2", input="plain"))
    result = cli("export", "all", "--format", "csv", "--fields", "_id,state,input,output.energy,"
                 "output.tags,missing")
    assert result.code == 0, result
    rows = list(csv.reader(io.StringIO(result.out)))
    assert rows == [["_id", "state", "input", "output.energy", "output.tags", "missing"],
                    ["c1", "done", "naïve, \"quoted\"\nline", "1.5", '["a"]', ""],
                    ["c2", "todo", "plain", "", "", ""]]
    header = list(csv.reader(io.StringIO(cli("export", "all", "--format", "csv").out)))[0]
    assert header == list(picas.EXPORT_CSV_FIELDS)


def test_export_to_a_closed_pipe_and_under_a_c_locale(cli, tdb):
    make_tokens(tdb, ["é %d" % i for i in range(600)], prefix="p")
    env = cli.couch.env(cli.db.name)
    env.update(LANG="C", LC_ALL="C", PYTHONIOENCODING="")
    proc = subprocess.run("%s %s export all | head -n 2" % (sys.executable, PICAS), shell=True,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0
    lines = proc.stdout.decode("utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["input"].startswith("é ")
    assert b"Traceback" not in proc.stderr and b"Broken pipe" not in proc.stderr


def test_bad_input_export_and_status_options(cli, tdb):
    result = cli("export", "nosuchview")
    assert result.code == picas.EXIT_ERROR and "create the views first" in result.err
    result = cli("export", "all", "--fields", " , ")
    assert result.code == picas.EXIT_USAGE and "names no field" in result.err
    result = cli("export", "all", "-o", cli.tmp_path / "no" / "such" / "dir.jsonl")
    assert result.code == picas.EXIT_USAGE and "cannot write" in result.err
    result = cli("export", "all", "--format", "xml")
    assert result.code == picas.EXIT_USAGE and "invalid choice: 'xml'" in result.err
    result = cli("status", "--errors", "--watch", "5")
    assert result.code == picas.EXIT_USAGE and "not with --watch" in result.err
    result = cli("status", "--errors", "-1")
    assert result.code == picas.EXIT_USAGE and "must be at least 0" in result.err
    assert "Traceback" not in "".join(cli.transcript)


# -- has-work ------------------------------------------------------------------

def test_has_work_exit_status(cli, tdb):
    assert cli("has-work").code == picas.EXIT_NO_WORK
    make_tokens(tdb, ["w"], prefix="w")
    result = cli("has-work")
    assert result.code == 0 and "Monitor/todo holds 1 tokens" in result.err
    assert cli("has-work", "done").code == picas.EXIT_NO_WORK
    tdb.ensure_design("Big", picas.standard_views("doc.cores == 8"))
    assert cli("has-work", "Big/todo").code == picas.EXIT_NO_WORK
    tdb.save(dict(picas.TOKEN_DEFAULTS, _id="big", cores=8))
    assert cli("has-work", "Big/todo").code == 0
    result = cli("has-work", "Nope/todo")
    assert result.code == picas.EXIT_ERROR and "not found" in result.err
    assert cli("-q", "has-work").err == ""
