#!/usr/bin/env python3
"""What one token costs the server, against one bare PUT (issue 17's "80% of the write ceiling").

    python3 bench/probes/token_cost.py --url http://127.0.0.1:PORT --password-file FILE \
        [--tokens 1000] [--pilots 4] [--split]

Three measurements, one after the other, on a CouchDB node of this machine:

1. ``true`` started N times the way picas.py starts a task (subprocess, new session): wall ms;
2. N bare PUTs from ``--pilots`` writer processes, each on its own keep-alive connection:
   bench.py's write ceiling (``bench.put_each_once``, one lock update per token);
3. ``--pilots`` ``picas.py run -- true`` pilots over N tokens.

For 2 and 3 it prints, per token, the wall time and the CPU time of the CouchDB process tree
(beam.smp, erl_child_setup and the couchjs view servers, from /proc, with the CPU of children
they reaped): while the workload ran, and in all once the server was idle again (CouchDB's
background indexer works after the writes). ``idle_reached`` is false when it never went idle
within a minute (the figures are then low). Start the node with schedulers that do not spin
(``PICAS_COUCHDB_VM_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none" python3
tests/server/couchdb.py``), or the CPU time includes Erlang's busy waiting.

``--split`` pins every process of the CouchDB tree to CPU 0 (so are the couchjs started later:
they inherit erl_child_setup's) and this probe with its writers and pilots to CPU 1, a
stand-in for a server with a core of its own; the affinities are restored at the end. The
password is read from the file or PICAS_PASSWORD and never printed.
"""
import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _read(path):
    with open(path) as fh:
        return fh.read()


def listener_pid(port):
    """The pid of the process listening on ``port`` (found through /proc)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add("socket:[%s]" % fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) in sockets:
                    return int(pid)
        except OSError:
            continue
    raise SystemExit("no process of this user listens on port %d (the probe measures a "
                     "server on this machine)" % port)


def _stat(pid):
    text = _read("/proc/%d/stat" % pid)
    return text[text.rindex(")") + 2:].split()     # fields from 3 (state) on


def tree(root):
    """``root`` and every live descendant."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(_stat(int(pid))[1])
        except (OSError, ValueError, IndexError):
            continue
    found, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def tree_cpu(root):
    """CPU seconds of the tree: its processes' own, and their reaped children's."""
    total = 0
    for pid in tree(root):
        try:
            total += sum(int(x) for x in _stat(pid)[11:15])   # utime stime cutime cstime
        except (OSError, ValueError):
            continue
    return total / float(TICK)


def idle_cpu(root, quiet=0.02, step=1.0, longest=60.0):
    """(the tree's CPU seconds once it used under ``quiet`` of a core for ``step``, went idle)"""
    before, waited = tree_cpu(root), 0.0
    while waited < longest:
        time.sleep(step)
        waited += step
        now = tree_cpu(root)
        if now - before < quiet * step:
            return now, True
        before = now
    return before, False


def measured(root, action, count, out):
    """Per token: wall time, and the server's CPU time while ``action`` ran and in all.
    ``action`` may return the seconds its work took (without its own start-up)."""
    (cpu0, idle0), t0 = idle_cpu(root), time.perf_counter()
    wall = action()
    wall, during = wall or time.perf_counter() - t0, tree_cpu(root) - cpu0
    cpu1, idle1 = idle_cpu(root)
    out["idle_reached"] = out.get("idle_reached", True) and idle0 and idle1
    return {"wall_ms": round(1000 * wall / count, 2),
            "server_cpu_ms": round(1000 * (cpu1 - cpu0) / count, 2),
            "server_cpu_during_ms": round(1000 * during / count, 2),
            "server_busy": round(during / wall, 2),      # cores' worth while it ran
            "per_s": round(count / wall, 1)}


def pin(root):
    """Pin the CouchDB tree to CPU 0 and this process to CPU 1; a function undoing both."""
    saved = []
    for pid in tree(root):
        for tid in map(int, os.listdir("/proc/%d/task" % pid)):
            try:
                saved.append((tid, os.sched_getaffinity(tid)))
            except OSError:
                continue
    saved.append((0, os.sched_getaffinity(0)))

    def undo():
        for tid, mask in saved:
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
    try:
        for tid, _ in saved[:-1]:
            try:
                os.sched_setaffinity(tid, {0})
            except ProcessLookupError:
                pass                               # a thread that ended meanwhile
        os.sched_setaffinity(0, {1})
    except OSError as exc:
        undo()
        raise SystemExit("--split needs CPUs 0 and 1: %s" % exc)
    return undo


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--pilots", type=int, default=1,
                        help="writers and pilots working at once (default 1)")
    parser.add_argument("--split", action="store_true",
                        help="pin CouchDB to CPU 0, this probe and its pilots to CPU 1")
    args = parser.parse_args()
    if args.tokens < 1 or args.pilots < 1:
        parser.error("--tokens and --pilots must be at least 1")
    password = os.environ.get("PICAS_PASSWORD")
    if args.password_file:
        password = _read(args.password_file).strip()
    if not password:
        raise SystemExit("give --password-file or PICAS_PASSWORD")
    couch = bench.Couch(args.url, args.user, password)
    root = listener_pid(couch.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that the finally runs
    n = args.tokens
    out = {"tokens": n, "pilots": args.pilots, "split": args.split,
           "load_at_start": _read("/proc/loadavg").split()[0]}
    undo = pin(root) if args.split else None
    stamp = int(time.time() * 1000)
    dbs = ["tokencost-put-%d" % stamp, "tokencost-run-%d" % stamp]
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            subprocess.call(["true"], stdin=subprocess.DEVNULL, start_new_session=True)
        out["start_true_ms"] = round(1000 * (time.perf_counter() - t0) / n, 2)

        couch.prepare(dbs[0], n)
        _, rows = couch.request("GET", "/%s/_all_docs?include_docs=true" % dbs[0])
        docs = [row["doc"] for row in rows["rows"] if row["doc"].get("type") == "token"]

        def puts():
            try:
                spans = bench.put_each_once(couch, dbs[0], docs, args.pilots)
            except RuntimeError as exc:
                raise SystemExit("bare PUTs: %s" % exc)
            return max(end for _, end in spans) - min(begin for begin, _ in spans)
        out["bare_put"] = measured(root, puts, n, out)

        couch.prepare(dbs[1], n)
        env = dict(os.environ, PICAS_USERNAME=args.user, PICAS_PASSWORD=password)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)

        def pilots():
            procs = [subprocess.Popen([sys.executable, bench.PICAS_PY, "--url", args.url,
                                       "--db", dbs[1], "-q", "run", "--", "true"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(args.pilots)]
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise SystemExit("a pilot failed: exit codes %r" % codes)
        out["picas_token"] = measured(root, pilots, n, out)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["picas_token"]["pilot_and_task_cpu_ms"] = round(
            1000 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n, 2)
        states = couch.states(dbs[1])
        if states != {"done": n}:
            raise SystemExit("the pilots left %r" % states)
        if out["bare_put"]["server_cpu_ms"] > 0:
            out["server_cpu_ratio"] = round(out["picas_token"]["server_cpu_ms"] /
                                            out["bare_put"]["server_cpu_ms"], 2)
        out["wall_ratio"] = round(out["picas_token"]["wall_ms"] / out["bare_put"]["wall_ms"], 2)
    finally:
        for db in dbs:
            couch.delete_db(db)
        if undo is not None:
            undo()
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
