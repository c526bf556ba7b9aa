"""The campaign report (issue 15): ``picas.py report --html FILE`` and ``--json``.

A pool with known done and error tokens (written directly, with known
times, run times, hosts, exit codes and error messages) plus one token a
real pilot ran; the report is made by the command line, parsed with
html.parser and its numbers checked against the database. Where chromium
is installed, the page is also rendered once in it, headless.
"""
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib

import pytest

import picas
from faultserver import FaultServer
from conftest import SENTINEL_PASSWORD
from helpers import ensure_views, make_tokens
from test_faults import run_cli, script, token_docs

HOUR = 3600.0
HOSTILE_ID = 'x"><script>alert(1)</script>'
HOSTILE_MESSAGE = 'segfault in <script>alert("pwned")</script> & <b>bold</b>'


@pytest.fixture
def tdb(db):
    ensure_views(db)
    return db


def token(tid, **fields):
    doc = dict(picas.TOKEN_DEFAULTS, _id=tid, input=tid)
    doc["error"] = []
    doc.update(fields)
    return doc


def build_campaign(couch, db, tmp_path, now):
    """A pool: 3 todo, 1 locked, 1 done by a real pilot, 12 done and 6 error written directly."""
    make_tokens(db, ["real"], prefix="pilot")
    task = script(tmp_path / "task.sh", "echo working on $1\n")
    result = run_cli(couch, db, ["run", "--max-tasks", "1", "--", task])
    assert result.code == 0, result
    docs = [token("todo-%d" % i) for i in range(3)]
    docs.append(token("locked-0", lock=int(now - 100), hostname="node-a"))
    # Done tokens: finished 3 h ago to 10 min ago, run times 5 s to 600 s.
    for i in range(12):
        done = int(now - 3 * HOUR + i * 900)
        docs.append(token("done-%02d" % i, lock=done - 60, done=done, exit_code=0,
                          hostname="node-%s" % "abc"[i % 3], run_seconds=5.0 + 50 * i + i % 4))
        if i < 2:          # given back by black holes before they ran well elsewhere
            docs[-1]["failed_hosts"] = ["node-x", "node-a"][:i + 1]
    failures = [("err-1", "node-a", 1, "exit code 1: missing input file"),
                ("err-2", "node-a", 1, "Traceback: ValueError"),
                ("err-3", "node-b", 2, None),
                ("err-4", "node-a", 137, "killed by max_token_time after 600 s"),
                (HOSTILE_ID, "node-<c>", 139, HOSTILE_MESSAGE),
                ("err-6", "node-b", "", "the task could not be started")]
    for i, (tid, host, code, message) in enumerate(failures):
        done = int(now - 2.5 * HOUR + i * 1500)
        errors = [{"time": done - 5000, "message": "an earlier attempt", "hostname": "old"}]
        if message:
            errors.append({"time": done, "message": message, "hostname": host})
        docs.append(token(tid, lock=done - 30, done=done, exit_code=code, hostname=host,
                          run_seconds=3.0, error=errors, scrub_count=1 if i == 0 else 0))
    for ok, doc_id, why in db.update(docs):
        assert ok, (doc_id, why)
    return token_docs(db)


@pytest.fixture
def campaign(couch, tdb, tmp_path):
    now = time.time()
    return build_campaign(couch, tdb, tmp_path, now), now


class Page(html.parser.HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text):
        html.parser.HTMLParser.__init__(self, convert_charrefs=True)
        self.ids = {}               # element id -> its text
        self.tables = {}            # table id -> rows of cell texts
        self.links = []             # (href, text)
        self.tags, self.attrs = [], []
        self._open = []             # [id, text parts] of elements with an id being read
        self._table = self._row = self._cell = self._link = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, attrs))
        if "id" in attrs:
            self._open.append([attrs["id"], [], tag])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "a" and "href" in attrs:
            self._link = [attrs["href"], []]

    def handle_endtag(self, tag):
        if self._open and self._open[-1][2] == tag:
            ident, parts, _ = self._open.pop()
            self.ids[ident] = "".join(parts)
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = self._row = None
        elif tag == "a" and self._link is not None:
            self.links.append((self._link[0], "".join(self._link[1])))
            self._link = None

    def handle_data(self, data):
        for item in self._open:
            item[1].append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._link is not None:
            self._link[1].append(data)


def body_rows(page, table):
    return page.tables[table][1:]


def report(couch, db, tmp_path, *extra, **kwargs):
    path = tmp_path / "report.html"
    result = run_cli(couch, db, ["report", "--html", str(path)] + list(extra), **kwargs)
    assert result.code == 0, result
    text = path.read_text(encoding="utf-8")
    return text, Page(text), result


def by_state(docs):
    out = {}
    for doc in docs.values():
        out.setdefault(picas.token_state(doc), []).append(doc)
    return out


def nearest_rank(values, q):
    values = sorted(values)
    return values[max(1, -(-int(q * len(values) * 1000000) // 1000000)) - 1]


def assert_self_contained(text, couch):
    """No scripts, no resources from anywhere, no http(s) URL but the server's."""
    low = text.lower()
    assert "<script" not in low and "javascript:" not in low
    for tag, attrs in Page(text).attrs:
        assert "src" not in attrs, (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "link":
            raise AssertionError("a <link> element: %r" % attrs)
    assert "@import" not in low and "url(" not in low
    urls = re.findall(r"(?:[a-z]+:)?//[^\s\"'<>)]*", text, re.I)
    assert urls, "no link to the server at all"
    assert [u for u in urls if not u.startswith(couch.url)] == []
    for href, _ in Page(text).links:
        assert href.startswith(couch.url + "/_utils/"), href


def test_report_numbers_match_the_database(couch, tdb, campaign, tmp_path):
    docs, started = campaign
    text, page, result = report(couch, tdb, tmp_path)
    assert "Traceback" not in result.err and "written to" in result.err, result
    states = by_state(docs)
    # Counts per state.
    for state in picas.STATES:
        assert page.ids["count-%s" % state] == str(len(states.get(state, []))), state
    assert page.ids["count-total"] == str(len(docs)) == "23"
    assert page.ids["database"] == tdb.name
    # Failures per host (the host of the last attempt) and per exit code.
    hosts = {}
    for state in ("done", "error"):
        for doc in states[state]:
            hosts.setdefault(doc["hostname"], [0, 0, 0])[state == "error"] += 1
            for host in doc.get("failed_hosts", []):
                hosts.setdefault(host, [0, 0, 0])[2] += 1
    assert hosts["node-x"] == [0, 0, 2] and hosts["node-a"][2] == 1
    rows = body_rows(page, "hosts")
    assert dict((r[0], [int(r[2]), int(r[1]), int(r[4])]) for r in rows) == hosts
    assert [r[0] for r in rows][:2] == ["node-a", "node-b"]          # most errors first
    codes = {}
    for doc in states["error"]:
        code = picas._parse_int(doc["exit_code"])
        codes["none" if code is None else str(code)] = \
            codes.get("none" if code is None else str(code), 0) + 1
    shown = dict((r[0].split(" (")[0], int(r[1])) for r in body_rows(page, "exit-codes"))
    assert shown == codes
    assert "137 (killed by SIGKILL)" in [r[0] for r in body_rows(page, "exit-codes")]
    assert codes == {"1": 2, "2": 1, "137": 1, "139": 1, "none": 1}
    # The slowest done tokens, in order; the real pilot's run is among them.
    done = sorted(states["done"], key=lambda d: (-d["run_seconds"], d["_id"]))
    assert [r[1] for r in body_rows(page, "slowest")] == [d["_id"] for d in done]
    assert "pilot-1" in [r[1] for r in body_rows(page, "slowest")]
    # The failed tokens, latest first, with their last error message.
    failed = sorted(states["error"], key=lambda d: (-d["done"], d["_id"]))
    rows = body_rows(page, "failed")
    assert [r[0] for r in rows] == [d["_id"] for d in failed]
    expected = [d["error"][-1]["message"] if len(d["error"]) > 1 else "an earlier attempt"
                for d in failed]
    assert [r[4] for r in rows] == expected
    assert HOSTILE_MESSAGE in [r[4] for r in rows]
    # Hostile ids, hosts and messages are text, never markup.
    assert "<script" not in text and "&lt;script&gt;alert(&quot;pwned&quot;)" in text
    assert "node-&lt;c&gt;" in text
    # Every listed token links to its Fauxton page and has an anchor.
    base = "%s/_utils/#database/%s/" % (couch.url, picas.quote(tdb.name, safe=""))
    links = dict((label, href) for href, label in page.links)
    for doc in done + failed:
        assert links[doc["_id"]] == base + picas.quote(doc["_id"], safe=""), doc["_id"]
        assert "token-" + picas.quote(doc["_id"], safe="") in page.ids
    assert_self_contained(text, couch)
    assert SENTINEL_PASSWORD not in text and "%s:" % couch.username not in text


def test_report_figures_as_json(couch, tdb, campaign, tmp_path):
    docs, started = campaign
    result = run_cli(couch, tdb, ["report", "--json"])
    assert result.code == 0, result
    figures = json.loads(result.out)
    after = time.time()
    states = by_state(docs)
    finished = states["done"] + states["error"]
    assert figures["counts"] == dict((s, len(states.get(s, []))) for s in picas.STATES)
    # Run times: the quantiles within 1 % (a bounded histogram), min and max exact.
    seconds = [d["run_seconds"] for d in states["done"]]
    runs = figures["run_seconds"]
    assert runs["count"] == len(seconds) == 13
    assert runs["max"] == max(seconds) and runs["min"] == min(seconds)
    for q, name in ((0.5, "median"), (0.9, "p90")):
        assert abs(runs[name] - nearest_rank(seconds, q)) <= 0.01 * nearest_rank(seconds, q), \
            (name, runs[name], sorted(seconds))
    assert sum(b[2] for b in runs["histogram"]) == len(seconds)
    assert all(low <= high for low, high, _ in runs["histogram"])
    # Finished over time and the rate.
    fin = figures["finished"]
    assert sum(b[1] for b in fin["buckets"]) == len(states["done"])
    assert sum(b[2] for b in fin["buckets"]) == len(states["error"])
    first = min(d["lock"] for d in finished)
    last = max(d["done"] for d in finished)
    assert fin["first_lock"] == first and fin["last_done"] == last
    assert abs(figures["rate"]["overall_per_hour"] - 3600.0 * len(finished) / (last - first)) \
        < 1e-6
    recent = [d for d in finished if d["done"] > after - HOUR]
    also = [d for d in finished if d["done"] > started - HOUR]
    assert len(recent) <= figures["rate"]["last_hour"] <= len(also)
    assert figures["rate"]["last_hour"] >= 5
    assert figures["tokens_with"]["scrubbed"] == 1
    assert SENTINEL_PASSWORD not in result.out + result.err


def test_report_numbers_shown_match_the_figures(couch, tdb, campaign, tmp_path):
    figures = json.loads(run_cli(couch, tdb, ["report", "--json"]).out)
    text, page, _ = report(couch, tdb, tmp_path)
    runs = figures["run_seconds"]
    assert page.ids["run-max"] == picas._seconds_text(runs["max"])
    assert page.ids["run-median"] == picas._seconds_text(runs["median"])
    assert page.ids["run-p90"] == picas._seconds_text(runs["p90"])
    assert page.ids["rate-overall"] == picas._count_text(figures["rate"]["overall_per_hour"])
    # The charts are there: one bar per run-time bin with tokens, lines for all/done/error.
    assert text.count('<polyline class="line') == 3
    assert text.count("<svg") == 4
    # All charts drawn at the page's width (the browser scales them to fit).
    assert re.findall(r'<svg [^>]*viewBox="0 0 (\d+) \d+"', text) == ["900"] * 4
    assert sum(1 for tag, a in page.attrs if tag == "rect" and a.get("class") == "done") >= \
        sum(1 for b in runs["histogram"] if b[2])
    # Every finished token is in one bar of the rate chart, every run time in one of the histogram.
    rate_bars = re.findall(r"<title>[^<]*: (\d+) (done|error), [^<]* tokens/h</title>", text)
    for state in ("done", "error"):
        assert sum(int(n) for n, s in rate_bars if s == state) == figures["counts"][state]
    assert sum(int(n) for n in re.findall(r"<title>[^<]* to [^<]*: (\d+) tokens</title>", text)) \
        == runs["count"]


def test_report_never_shows_credentials(couch, tdb, campaign, tmp_path):
    """Neither the password nor the user name, with the URL holding them or the environment."""
    bare = couch.url.split("://", 1)[1]
    with_creds = "http://%s:%s@%s" % (couch.username, SENTINEL_PASSWORD, bare)
    for env in ({}, {"PICAS_HOST_URL": with_creds, "PICAS_USERNAME": None,
                     "PICAS_PASSWORD": None}):
        text, page, result = report(couch, tdb, tmp_path, env=env)
        assert SENTINEL_PASSWORD not in text + result.out + result.err
        assert "%s:" % couch.username not in text and "@" + bare not in text
        assert page.ids["count-total"] == "23"
        assert all(href.startswith(couch.url + "/_utils/#database/") for href, _ in page.links)
        assert_self_contained(text, couch)


def test_report_of_an_empty_database_and_of_todo_tokens_only(couch, tdb, tmp_path):
    text, page, _ = report(couch, tdb, tmp_path)
    assert page.ids["count-total"] == "0"
    assert "The database holds no tokens." in text and "No token has finished yet." in text
    assert "<svg" not in text
    assert_self_contained(text, couch)
    make_tokens(tdb, ["a", "b", "c"])
    text, page, _ = report(couch, tdb, tmp_path)
    assert page.ids["count-total"] == page.ids["count-todo"] == "3"
    assert page.ids["count-done"] == "0"
    assert "No token has finished yet." in text and "No token is in error." in text
    assert text.count("<svg") == 1                   # the state bar only
    assert_self_contained(text, couch)


def test_report_to_standard_output(couch, tdb, campaign):
    result = run_cli(couch, tdb, ["report", "--html", "-"])
    assert result.code == 0, result
    assert result.out.startswith("<!DOCTYPE html>") and result.out.rstrip().endswith("</html>")
    assert Page(result.out).ids["count-total"] == "23"


def test_figures_paged_in_small_batches_are_the_same(couch, tdb, campaign):
    now = time.time()
    one = picas.campaign_figures(tdb, now=now, top=5)
    small = picas.campaign_figures(tdb, now=now, top=5, batch=2)
    assert one == small
    assert len(one["slowest"]) == len(one["failed"]) == 5
    assert one["slowest"][0]["id"] == "done-11"


@pytest.mark.parametrize("args, message", [
    (["report"], "report needs --html FILE"),
    (["report", "--html", "-", "--json"], "both want standard output"),
    (["report", "--html", "/nonexistent-folder/r.html"], "the folder /nonexistent-folder "
                                                         "does not exist"),
    (["report", "--html", "/"], "is a folder"),
    (["report", "--html", "/proc/version/r.html"], "does not exist"),
    (["report", "--top", "0", "--json"], "must be at least 1"),
])
def test_bad_input_report_usage(couch, tdb, args, message):
    result = run_cli(couch, tdb, args)
    assert result.code == picas.EXIT_USAGE, result
    assert message in result.err and "Traceback" not in result.err + result.out, result
    assert SENTINEL_PASSWORD not in result.err


def test_bad_input_report_file_without_permission(couch, tdb, tmp_path, monkeypatch, capsys):
    """(Tests run as root, whom permissions do not stop: os.access stands in for a user's.)"""
    for name, value in (("PICAS_HOST_URL", couch.url), ("PICAS_DATABASE", tdb.name),
                        ("PICAS_USERNAME", couch.username), ("PICAS_PASSWORD", couch.password)):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(picas.os, "access", lambda path, mode: False)
    target = tmp_path / "report.html"
    assert picas.main(["report", "--html", str(target)]) == picas.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--html %s: no permission to write there" % target in err, err
    assert not target.exists()


def test_bad_input_report_file_that_cannot_be_written(couch, tdb, tmp_path):
    """Past the early checks (the file turns into a folder meanwhile): a clear error."""
    target = tmp_path / "report.html"
    argv = ["-c", "import sys, os; sys.path.insert(0, %r); import picas; "
                  "real = picas.campaign_figures\n"
                  "def slow(*a, **k):\n"
                  "    os.mkdir(%r); return real(*a, **k)\n"
                  "picas.campaign_figures = slow; sys.exit(picas.main(sys.argv[1:]))"
            % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), str(target))]
    proc = subprocess.run([sys.executable] + argv + ["report", "--html", str(target)],
                          env=couch.env(tdb.name), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == picas.EXIT_USAGE, err
    assert "cannot write the report to %s" % target in err and "Traceback" not in err


def test_report_of_a_token_holding_a_lone_surrogate(couch, tdb, tmp_path):
    """pouchdb-server stores what CouchDB refuses: the page shows U+FFFD instead."""
    raw = ('{"type":"token","lock":100,"done":200,"exit_code":3,"hostname":"node\\udc80",'
           '"input":"x","scrub_count":0,"error":[{"time":200,"message":"cut \\ud83d"}]}')
    try:
        couch.server().request("PUT", "/%s/bad" % tdb.name, body=raw.encode("ascii"),
                               headers={"Content-Type": "application/json"})
    except picas.BadRequest:
        pytest.skip("this server refuses lone surrogates itself (CouchDB does: 400)")
    text, page, result = report(couch, tdb, tmp_path)
    assert body_rows(page, "failed")[0][4] == "cut \ufffd"
    assert body_rows(page, "hosts")[0][0] == "node\ufffd"
    for args in (["report", "--html", "-"], ["report", "--json"]):
        result = run_cli(couch, tdb, args)
        assert result.code == 0 and "Traceback" not in result.err, result


def test_report_says_it_waits_for_the_views_index(couch, tdb, monkeypatch, capsys, tmp_path):
    make_tokens(tdb, ["a"])

    def slow_first_view(fs, request):
        slow = "/_view/overview_total" in request.path
        return ("sleep", 3.0, ("proxy",)) if slow else ("proxy",)
    with FaultServer(upstream=couch.url, default=slow_first_view) as fs:
        for name, value in (("PICAS_HOST_URL", fs.url), ("PICAS_DATABASE", tdb.name),
                            ("PICAS_USERNAME", couch.username),
                            ("PICAS_PASSWORD", couch.password)):
            monkeypatch.setenv(name, value)
        assert picas.main(["report", "--html", str(tmp_path / "r.html")]) == 0
    err = capsys.readouterr().err
    assert "waiting for CouchDB to build the index of _design/Monitor" in err, err
    assert Page((tmp_path / "r.html").read_text()).ids["count-todo"] == "1"


def test_bad_input_report_without_views_or_database(couch, db, tmp_path):
    result = run_cli(couch, db, ["report", "--html", str(tmp_path / "r.html")])
    assert result.code == picas.EXIT_ERROR and "python picas.py views" in result.err, result
    assert not (tmp_path / "r.html").exists()
    result = run_cli(couch, db, ["--db", "no-such-db", "report", "--json"])
    assert result.code == picas.EXIT_USAGE and "does not exist" in result.err, result


def test_figures_memory_stays_bounded_for_a_long_campaign():
    """A year of tokens: a bounded number of time buckets and run-time bins, quantiles within 1 %."""
    import random
    rng = random.Random(7)
    start = 1.7e9
    figures = picas._Figures(top=10, now=start + 400 * 86400)
    seconds = []
    for i in range(20000):
        s = rng.lognormvariate(5, 1.2)
        seconds.append(s)
        done = start + rng.uniform(0, 365 * 86400)
        figures.add({"_id": "t%d" % i, "lock": done - s, "done": done, "exit_code": 0,
                     "hostname": "n%d" % (i % 50), "run_seconds": s}, "done")
    assert len(figures.buckets) <= picas._MAX_BUCKETS and len(figures.runtime_bins) < 2000
    assert figures.width == 6 * 3600                         # a year in 6 h buckets
    assert len(figures.slowest) == 10
    result = figures.result()
    assert sum(b[1] for b in result["finished"]["buckets"]) == 20000
    for q, name in ((0.5, "median"), (0.9, "p90")):
        exact = nearest_rank(seconds, q)
        assert abs(result["run_seconds"][name] - exact) <= 0.01 * exact
    assert [r["run_seconds"] for r in result["slowest"]] == sorted(seconds)[-10:][::-1]
    assert sum(b[2] for b in result["run_seconds"]["histogram"]) == 20000
    page = picas.render_report(dict(result, database="x", server="http://h:5984",
                                    design_doc="Monitor", generated=start, top=10,
                                    counts={"todo": 0, "locked": 0, "done": 20000, "error": 0},
                                    total=20000, fauxton="http://h:5984/_utils/#database/x/"))
    assert Page(page).ids["count-done"] == "20,000"
    # A pool where every token names another host is counted in bounded memory too.
    monkey = picas._Figures(top=3, now=start)
    for i in range(picas._MAX_DISTINCT + 500):
        monkey.add({"_id": "e%d" % i, "lock": start, "done": start + 1, "exit_code": i + 1,
                    "hostname": "host-%d" % i}, "error")
    assert len(monkey.hosts) == len(monkey.codes) == picas._MAX_DISTINCT + 1
    assert monkey.hosts["(other hosts)"] == [0, 500, 0] and monkey.codes["other"] == 500


# -- rendered in a real browser ------------------------------------------------------

def png_pixels(path):
    """(width, height, raw scanline bytes) of a PNG, with the standard library only."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + length
    return width, height, zlib.decompress(b"".join(idat))


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH: the report is not "
                    "rendered in a browser here (apt-get install chromium to check it)")
def test_report_renders_in_headless_chromium(couch, tdb, campaign, tmp_path):
    text, page, _ = report(couch, tdb, tmp_path)
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--user-data-dir=%s" % (tmp_path / "profile"), "--screenshot=%s" % shot,
         "--window-size=1200,2000", "file://%s" % (tmp_path / "report.html")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert shot.exists(), proc.stderr.decode("utf-8", "replace")[-2000:]
    keep = os.environ.get("PICAS_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(str(shot), keep)
    width, height, raw = png_pixels(str(shot))
    assert (width, height) == (1200, 2000)
    assert os.path.getsize(str(shot)) > 20000              # a blank page compresses to ~10 KB
    # Many distinct colours (text, green and red bars), not one flat page.
    assert len(set(raw[i:i + 3] for i in range(0, len(raw) - 3, 997))) > 50


def test_report_is_documented():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "README.md")) as fh:
        readme = fh.read()
    assert "picas.py report --html report.html" in readme and "`tests/test_report.py`" in readme
    assert "only where `chromium` is on PATH" in readme
    assert "report --html report.html" in picas._EPILOG
