"""Task outputs (issue 15): $PICAS_OUTPUT_FILE, --attach, --workdir and the live tail.

Pilots run ``python picas.py run`` against the real test server; the tasks
are small shell scripts. Bad output files and files over the attachment
limits must never lose a result or change the task's exit code.
"""
import glob
import json
import os
import signal

import pytest

import picas
from helpers import make_tokens, wait_for
from test_faults import Pilot, assert_clear, run_cli, script, token_docs  # noqa: F401
from test_pilot_health import _no_pilot_left, tdb  # noqa: F401  (fixtures)


def names(doc):
    return sorted(doc.get("_attachments") or {})


# -- $PICAS_OUTPUT_FILE ----------------------------------------------------------

def test_the_output_file_is_merged_into_the_tokens_output(couch, tdb, tmp_path):
    make_tokens(tdb, ["a", "b"])
    token = tdb.get("t-2")
    token["output"] = {"kept": 1, "score": 0}           # a value pushed with the token
    tdb.save(token)
    task = script(tmp_path / "task.sh", """
        printf '{"score": 0.5, "input": "%s", "nested": {"k": [1, 2]}}' "$1" > "$PICAS_OUTPUT_FILE"
        """)
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    docs = token_docs(tdb)
    assert docs["t-1"]["output"] == {"score": 0.5, "input": "a", "nested": {"k": [1, 2]}}
    assert docs["t-2"]["output"] == {"kept": 1, "score": 0.5, "input": "b",
                                     "nested": {"k": [1, 2]}}
    for doc in docs.values():
        assert picas.token_state(doc) == "done" and "output_note" not in doc, doc
    # The file lives in the pilot's own folder, not in the task's directory.
    assert set(os.listdir(str(tmp_path))) <= set(["picas-journal", "task.sh"])


def test_a_task_that_writes_no_output_file_changes_nothing(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "echo hi\n")
    assert_clear(run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path), 0)
    doc = tdb.get("t-1")
    assert "output" not in doc and "output_note" not in doc and "attached" not in doc, doc


def test_an_output_that_is_not_an_object_is_kept_under_previous_output(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    token = tdb.get("t-1")
    token["output"] = ["pushed", "as", "a", "list"]
    tdb.save(token)
    task = script(tmp_path / "task.sh", """echo '{"score": 1}' > "$PICAS_OUTPUT_FILE"\n""")
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "kept as output.previous_output")
    doc = tdb.get("t-1")
    assert doc["output"] == {"score": 1, "previous_output": ["pushed", "as", "a", "list"]}
    assert "was an array, not an object" in doc["output_note"]


BAD_OUTPUT_FILES = {
    "invalid JSON": (b'{"score": 0.5,', "is not valid JSON"),
    "a list": (b"[1, 2, 3]", "holds an array, not a JSON object"),
    "too large": (b'{"x": "' + b"y" * (picas.OUTPUT_FILE_LIMIT + 10) + b'"}',
                  "bytes, more than the %d merged" % picas.OUTPUT_FILE_LIMIT),
    "not UTF-8": (b'{"x": "\xff\xfe"}', "is not UTF-8 text"),
}


@pytest.mark.faults
@pytest.mark.parametrize("kind", sorted(BAD_OUTPUT_FILES))
@pytest.mark.parametrize("exit_code", [0, 3])
def test_bad_input_output_file(couch, tdb, tmp_path, kind, exit_code):
    """A bad $PICAS_OUTPUT_FILE: the result is kept, the file attached, a note says why."""
    content, phrase = BAD_OUTPUT_FILES[kind]
    (tmp_path / "bad.json").write_bytes(content)
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", 'echo the-log\ncp "%s" "$PICAS_OUTPUT_FILE"\nexit %d\n'
                  % (tmp_path / "bad.json", exit_code))
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0, phrase, "Not merged into output")
    doc = tdb.get("t-1")
    assert doc["exit_code"] == exit_code
    assert picas.token_state(doc) == ("done" if exit_code == 0 else "error")
    assert phrase in doc["output_note"] and "attached as output_t-1.json" in doc["output_note"]
    assert "output" not in doc
    assert tdb.get_attachment("t-1", "output_t-1.json") == content
    assert tdb.get_attachment("t-1", "logs_t-1.out") == b"the-log\n"


@pytest.mark.faults
def test_bad_input_output_file_with_values_couchdb_cannot_store(couch, tdb, tmp_path):
    """A lone surrogate (as truncating JavaScript writes it) and NaN: stored as text, noted."""
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", r"""
        printf '{"text": "cut \ud83d", "ratio": NaN, "fine": 2}' > "$PICAS_OUTPUT_FILE"
        """)
    result = run_cli(couch, tdb, ["run", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "holds values CouchDB cannot store")
    doc = tdb.get("t-1")
    assert doc["output"] == {"text": "cut \ufffd", "ratio": "nan", "fine": 2}
    assert "lone surrogate U+D83D" in doc["output_note"] and "nan" in doc["output_note"]
    assert picas.token_state(doc) == "done" and doc["exit_code"] == 0


# -- --attach --------------------------------------------------------------------

def test_attach_globs_attach_the_tasks_files(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", """
        mkdir -p results/deep
        printf 'x,y\\n1,%s\\n' "$1" > results/table.csv
        printf 'deep' > results/deep/z.txt
        head -c 300 /dev/urandom > blob.bin
        echo not-matched > other.dat
        """)
    result = run_cli(couch, tdb, ["run", "--attach", "results/**/*.*", "--attach", "*.bin",
                                  "--attach", "nothing-*.x", "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    doc = tdb.get("t-1")
    assert names(doc) == ["blob.bin", "logs_t-1.err", "logs_t-1.out", "results/deep/z.txt",
                          "results/table.csv"]
    assert doc["attached"] == ["results/deep/z.txt", "results/table.csv", "blob.bin"]
    assert tdb.get_attachment("t-1", "results/table.csv") == b"x,y\n1,a\n"
    assert tdb.get_attachment("t-1", "blob.bin") == (tmp_path / "blob.bin").read_bytes()
    assert doc["_attachments"]["results/table.csv"]["content_type"] == "text/csv"
    assert doc["_attachments"]["blob.bin"]["content_type"] == "application/octet-stream"
    assert "attach_skipped" not in doc
    assert "--attach nothing-*.x matched no file" in result.err


def test_an_attachment_over_couchdbs_document_size_limit_is_stored(couch, tdb, tmp_path):
    """9 MB: more than CouchDB's max_document_size (8 MB, which counts the JSON fields only)."""
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "head -c 9000000 /dev/urandom > big.bin\n")
    result = run_cli(couch, tdb, ["run", "--attach", "big.bin", "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done" and doc["attached"] == ["big.bin"], doc
    assert tdb.get_attachment("t-1", "big.bin") == (tmp_path / "big.bin").read_bytes()


@pytest.mark.faults
def test_bad_input_attachment_over_the_limits(couch, tdb, tmp_path):
    """Files over --attach-limit or --attach-total: left out, listed, the result kept."""
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", """
        head -c 800 /dev/zero > a.out1
        head -c 900 /dev/zero > b.out1
        head -c 2000 /dev/zero > c.out1
        head -c 100 /dev/zero > d.out1
        """)
    result = run_cli(couch, tdb, ["run", "--attach", "*.out1", "--attach-limit", "1000",
                                  "--attach-total", "1000", "--", task], cwd=tmp_path)
    assert_clear(result, 0, "2 files not attached (listed in its attach_skipped)")
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "done"
    assert doc["attached"] == ["a.out1", "d.out1"]
    skipped = dict((s["name"], s["reason"]) for s in doc["attach_skipped"])
    assert sorted(skipped) == ["b.out1", "c.out1"], skipped
    assert "over the limit of 1000 for all files of a token (--attach-total" in skipped["b.out1"]
    assert "2000 bytes, over the limit of 1000 for one file (--attach-limit)" in skipped["c.out1"]
    assert len(tdb.get_attachment("t-1", "a.out1")) == 800
    assert tdb.get_attachment("t-1", "c.out1") is None


@pytest.mark.parametrize("pattern", ["../x", "results/../../x", "/etc/passwd"])
def test_bad_input_attach_pattern_outside_the_working_directory(couch, tdb, tmp_path,
                                                                pattern):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "true\n")
    result = run_cli(couch, tdb, ["run", "--attach", pattern, "--", task], cwd=tmp_path)
    assert_clear(result, 2, "--attach %r: give a pattern relative to the task's working "
                 "directory" % pattern)
    assert picas.token_state(tdb.get("t-1")) == "todo"
    with pytest.raises(ValueError):
        picas.CommandActor(tdb, [task], attach=[pattern])


def test_bad_input_files_attach_cannot_attach(couch, tdb, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    make_tokens(tdb, ["a"])
    work = tmp_path / "work"
    work.mkdir()
    task = script(tmp_path / "task.sh", """
        ln -s "%s/secret.txt" link-out.txt
        echo inside > real.txt
        ln -s real.txt link-in.txt
        mkdir dir.txt
        echo x > _hidden.txt
        echo x > logs_t-1.out.txt
        mkfifo pipe.txt
        """ % outside)
    result = run_cli(couch, tdb, ["run", "--attach", "*.txt", "--", task], cwd=work)
    assert_clear(result, 0, "files not attached")
    doc = tdb.get("t-1")
    skipped = dict((s["name"], s["reason"]) for s in doc["attach_skipped"])
    assert skipped["link-out.txt"] == "a symlink pointing outside the working directory"
    assert skipped["dir.txt"].startswith("a directory")
    assert skipped["_hidden.txt"].startswith("CouchDB refuses attachment names starting with _")
    assert skipped["pipe.txt"] == "not a regular file"
    assert sorted(skipped) == ["_hidden.txt", "dir.txt", "link-out.txt", "pipe.txt"]
    assert doc["attached"] == ["link-in.txt", "logs_t-1.out.txt", "real.txt"]
    assert tdb.get_attachment("t-1", "link-in.txt") == b"inside\n"
    assert picas.token_state(doc) == "done"


def test_attach_never_enters_a_symlinked_folder(couch, tdb, tmp_path):
    """``**`` goes through the task's folders only: not a link to the outside, not a loop."""
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret.txt").write_text("not yours")
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", """
        mkdir -p sub/deeper .hidden
        echo a > sub/a.txt
        echo b > sub/deeper/b.txt
        echo h > .hidden/h.txt
        ln -s "%s" ext
        ln -s . loop
        """ % outside)
    result = run_cli(couch, tdb, ["run", "--workdir", "--attach", "**", "--attach", "**/*.txt",
                                  "--", task], cwd=tmp_path, timeout=60)
    assert_clear(result, 0, "1 files not attached")
    doc = tdb.get("t-1")
    assert doc["attached"] == ["sub/a.txt", "sub/deeper/b.txt"]
    assert doc["attach_skipped"] == [{"name": "ext", "reason": "a symlink pointing outside "
                                      "the working directory"}]


def test_match_inside_matches_as_glob_does(tmp_path):
    for name in ["a.txt", "b.csv", ".dot.txt", "d/e.txt", "d/f/g.txt", "d/.h/i.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    base = str(tmp_path)
    for pattern in ["*.txt", "*", "d/*", "**/*.txt", "d/**", "**", ".*", "d/f/*.txt", "?.csv",
                    "[ab].*", "d//e.txt", "./a.txt", "nothing/*"]:
        if pattern in ("d//e.txt", "./a.txt"):
            continue
        # The files (glob also gives "d/**" the folder d itself, which is never attached).
        expected = sorted(os.path.relpath(p, base) for p in
                          glob.glob(os.path.join(base, pattern), recursive=True)
                          if os.path.isfile(p))
        got = picas._match_inside(base, pattern)
        assert [p for p in got if os.path.isfile(os.path.join(base, p))] == expected, pattern
        assert set(got) >= set(os.path.relpath(p, base) for p in glob.glob(
            os.path.join(base, pattern), recursive=True)) - set(["d", "."]), pattern
    assert picas._match_inside(base, "d//e.txt") == ["d/e.txt"]
    assert picas._match_inside(base, "./a.txt") == ["a.txt"]


def test_an_attachment_never_replaces_the_logs_or_an_input_attachment(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    token = tdb.get("t-1")
    tdb.put_attachment(token, "input.dat", b"the input")
    task = script(tmp_path / "task.sh", "echo log\necho new > input.dat\necho fake > "
                  "logs_t-1.out\n")
    result = run_cli(couch, tdb, ["run", "--attach", "*", "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    doc = tdb.get("t-1")
    skipped = dict((s["name"], s["reason"]) for s in doc["attach_skipped"])
    assert "already has an attachment of that name" in skipped["input.dat"]
    assert "taken by the task's logs" in skipped["logs_t-1.out"]
    assert tdb.get_attachment("t-1", "input.dat") == b"the input"
    assert tdb.get_attachment("t-1", "logs_t-1.out") == b"log\n"


# -- --workdir -------------------------------------------------------------------

WORKDIR_TASK = """
    echo "$PWD $PICAS_WORKDIR $(ls -A | wc -l)" >> "%s"
    echo "$1" > mine.txt
    """


def workdir_lines(path):
    with open(str(path)) as fh:
        return [line.split() for line in fh]


@pytest.mark.parametrize("keep", [False, True])
def test_workdir_gives_every_token_a_fresh_folder(couch, tdb, tmp_path, keep):
    make_tokens(tdb, ["a", "b", "c"])
    base = tmp_path / "scratch"
    script(tmp_path / "task.sh", WORKDIR_TASK % (tmp_path / "seen"))
    args = ["run", "--workdir", str(base)] + (["--keep-workdir"] if keep else [])
    result = run_cli(couch, tdb, args + ["--attach", "mine.txt", "--", "./task.sh"],
                     cwd=tmp_path)
    assert_clear(result, 0)
    seen = workdir_lines(tmp_path / "seen")
    assert len(seen) == 3
    folders = [pwd for pwd, _, _ in seen]
    assert len(set(folders)) == 3
    for pwd, workdir, entries in seen:
        assert pwd == workdir and os.path.dirname(pwd) == str(base) and entries == "0"
    docs = token_docs(tdb)
    for tid, doc in docs.items():
        assert tdb.get_attachment(tid, "mine.txt") == doc["input"].encode() + b"\n"
    if keep:
        assert sorted(os.listdir(str(base))) == sorted(os.path.basename(f) for f in folders)
        for folder in folders:
            assert os.listdir(folder) == ["mine.txt"]
        assert "is kept (--keep-workdir)" in result.err
    else:
        assert os.listdir(str(base)) == []


def test_a_workdir_with_read_only_folders_is_removed_too(couch, tdb, tmp_path):
    """(As root, who removes read-only folders anyway, only the symlink's target is proven.)"""
    make_tokens(tdb, ["a"])
    base = tmp_path / "scratch"
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o555)
    task = script(tmp_path / "task.sh", """
        mkdir -p locked/inner && echo x > locked/inner/f && chmod 500 locked/inner locked
        ln -s "%s" link
        """ % outside)
    result = run_cli(couch, tdb, ["run", "--workdir", str(base), "--", task], cwd=tmp_path)
    assert_clear(result, 0)
    assert os.listdir(str(base)) == [] and "could not remove" not in result.err
    assert oct(outside.stat().st_mode & 0o777) == oct(0o555)     # a link's target is left alone
    outside.chmod(0o755)


def test_workdir_without_a_folder_uses_the_pilots_temporary_folder(couch, tdb, tmp_path):
    make_tokens(tdb, [u"\u03b1/../x y"], prefix="../odd id")
    script(tmp_path / "task.sh", WORKDIR_TASK % (tmp_path / "seen"))
    result = run_cli(couch, tdb, ["run", "--workdir", "--", "./task.sh"], cwd=tmp_path)
    assert_clear(result, 0)
    [(pwd, workdir, entries)] = workdir_lines(tmp_path / "seen")
    assert "/picas-pilot-" in pwd and pwd == workdir and entries == "0"
    assert os.path.basename(pwd).startswith("_odd_id-1-")     # the id's plain characters
    assert not os.path.exists(pwd) and not os.path.exists(os.path.dirname(pwd))


def test_without_workdir_the_task_runs_in_the_pilots_folder(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    script(tmp_path / "task.sh", 'echo "$PWD $PICAS_WORKDIR" > seen\necho r > r.txt\n')
    result = run_cli(couch, tdb, ["run", "--attach", "r.txt", "--", "./task.sh"], cwd=tmp_path)
    assert_clear(result, 0)
    assert (tmp_path / "seen").read_text().split() == [str(tmp_path)] * 2
    assert tdb.get_attachment("t-1", "r.txt") == b"r\n"
    assert (tmp_path / "r.txt").exists()


def test_keep_workdir_needs_workdir(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "true\n")
    result = run_cli(couch, tdb, ["run", "--keep-workdir", "--", task], cwd=tmp_path)
    assert_clear(result, 2, "--keep-workdir needs --workdir")
    (tmp_path / "file").write_text("x")
    result = run_cli(couch, tdb, ["run", "--workdir", str(tmp_path / "file"), "--", task],
                     cwd=tmp_path)
    assert_clear(result, 2, "cannot create it")
    assert picas.token_state(tdb.get("t-1")) == "todo"


# -- the live tail -----------------------------------------------------------------

LIVE_TASK = """
    echo "started $1"
    echo "warming up" >&2
    sleep 4
    echo "finished $1"
    exit %d
    """


@pytest.mark.parametrize("code", [0, 1])
def test_live_log_shows_the_running_tasks_output_and_is_gone_after(couch, tdb, tmp_path,
                                                                  code):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", LIVE_TASK % code)
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "1", "--", task], cwd=str(tmp_path))
    wait_for(lambda: "live_log" in (tdb.get("t-1") or {}), timeout=20)
    live = tdb.get("t-1")["live_log"]
    assert live["out"] == "started a\n" and live["err"] == "warming up\n", live
    assert abs(live["time"] - picas._now()) < 10 and picas.token_state(tdb.get("t-1")) == "locked"
    assert pilot.wait(60) == 0, pilot.err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == ("done" if code == 0 else "error")
    assert "live_log" not in doc, doc
    assert tdb.get_attachment("t-1", "logs_t-1.out") == b"started a\nfinished a\n"


def test_live_log_is_gone_when_a_stopped_token_goes_back_to_todo(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "echo begun\nsleep 30\n")
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "1", "--grace", "1", "--", task],
                  cwd=str(tmp_path))
    wait_for(lambda: ((tdb.get("t-1") or {}).get("live_log") or {}).get("out") == "begun\n",
             timeout=20)
    pilot.send(signal.SIGTERM)
    assert pilot.wait(60) == 128 + signal.SIGTERM, pilot.err
    doc = tdb.get("t-1")
    assert picas.token_state(doc) == "todo" and "live_log" not in doc, doc


def test_live_log_keeps_only_the_end_of_long_output(couch, tdb, tmp_path):
    make_tokens(tdb, ["a"])
    task = script(tmp_path / "task.sh", "head -c 20000 /dev/zero | tr '\\0' x\necho END\n"
                  "printf '\\377' >&2\nsleep 4\n")
    pilot = Pilot(couch, tdb, ["run", "--heartbeat", "1", "--", task], cwd=str(tmp_path))
    wait_for(lambda: "live_log" in (tdb.get("t-1") or {}), timeout=20)
    live = tdb.get("t-1")["live_log"]
    assert len(live["out"]) == picas.LIVE_LOG_BYTES and live["out"].endswith("xEND\n")
    assert live["err"] == u"\ufffd"
    assert pilot.wait(60) == 0, pilot.err


def test_a_failing_live_log_hook_never_fails_the_heartbeat(tdb):
    make_tokens(tdb, ["a"])
    token = picas.Task(tdb.get("t-1"))
    lease = picas._Lease(tdb, token, picas._deep_copy(token), 0)
    lease.extra_fields = lambda: {"live_log": {"out": "x", "err": "", "time": 1}}
    lease.beat()
    assert tdb.get("t-1")["live_log"]["out"] == "x"

    def broken():
        raise OSError("the log file is gone")
    lease.extra_fields = broken
    before = tdb.get("t-1")["_rev"]
    lease.beat()
    after = tdb.get("t-1")
    assert after["_rev"] != before and after["live_log"]["out"] == "x"
    lease.stop()


def test_a_result_reapplied_after_a_conflict_does_not_take_the_live_log_back():
    claimed = {"_id": "t", "_rev": "1-a", "lock": 1, "done": 0, "claim_id": "c"}
    current = dict(claimed, _rev="3-c", heartbeat=5, live_log={"out": "x", "err": "", "time": 5},
                   note="someone else's")
    result = dict(claimed, done=9, exit_code=0)
    picas._reapply(result, claimed, current)
    assert "live_log" not in result
    assert result["note"] == "someone else's" and result["_rev"] == "3-c"
    assert "live_log" in picas._CLAIM_FIELDS            # gone when a token goes back to todo
