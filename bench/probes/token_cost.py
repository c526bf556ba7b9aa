#!/usr/bin/env python3
"""What one token costs the server, against one bare PUT (issue 17's "80% of the write ceiling").

    python3 bench/probes/token_cost.py --url http://127.0.0.1:PORT --password-file FILE [--split]

Three measurements, one after the other, on a CouchDB node of this machine:

1. ``true`` started N times the way picas.py starts a task (subprocess, new session);
2. N bare PUTs from ``--pilots`` writers (threads), as bench.py's write ceiling makes them (one
   lock update per token);
3. ``--pilots`` ``picas.py run -- true`` pilots over N tokens.

For 2 and 3 it prints the wall time and the CPU time, while they ran and in all, of the CouchDB process tree (beam.smp and
its couchjs view servers, from /proc) per token, taken after the server has gone idle again
(CouchDB's background indexer works after the writes). ``--split`` pins CouchDB to CPU 0 and
this probe and its pilot to CPU 1 (``taskset``), a stand-in for a server with a core of its own.
The password is read from the file or PICAS_PASSWORD and never printed.
"""
import argparse
import http.client
import json
import os
import resource
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def listener_pid(port):
    """The pid of the process listening on 127.0.0.1:``port`` (found through /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) in \
                        ["socket:[%s]" % inode for inode in inodes]:
                    return int(pid)
        except OSError:
            continue
    raise SystemExit("no process of this user listens on port %d" % port)


def _stat(pid):
    text = open("/proc/%d/stat" % pid).read()
    return text[text.rindex(")") + 2:].split()     # fields from 3 (state) on


def tree_cpu(root):
    """CPU seconds of ``root`` and every live descendant (and the children it has reaped)."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(_stat(int(pid))[1])
        except (OSError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:13])          # utime, stime
        if pid == root:
            total += sum(int(x) for x in fields[13:15])      # cutime, cstime
    return total / float(TICK)


def idle_cpu(root, quiet=0.02, step=1.0, longest=60.0):
    """The tree's CPU seconds once it has used less than ``quiet`` of a core for ``step``."""
    before, waited = tree_cpu(root), 0.0
    while waited < longest:
        time.sleep(step)
        waited += step
        now = tree_cpu(root)
        if now - before < quiet * step:
            return now
        before = now
    return before


def measured(root, action, count):
    """Per token: wall time, and the server's CPU time while ``action`` ran and in all."""
    cpu0, t0 = idle_cpu(root), time.perf_counter()
    action()
    wall, during = time.perf_counter() - t0, tree_cpu(root) - cpu0
    cpu = idle_cpu(root) - cpu0
    return {"wall_ms": round(1000 * wall / count, 2), "server_cpu_ms": round(1000 * cpu / count, 2),
            "server_cpu_during_ms": round(1000 * during / count, 2),
            "per_s": round(count / wall, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--pilots", type=int, default=1,
                        help="writers and pilots working at once (default 1)")
    parser.add_argument("--split", action="store_true",
                        help="pin CouchDB to CPU 0, this probe and its pilot to CPU 1")
    args = parser.parse_args()
    password = os.environ.get("PICAS_PASSWORD")
    if args.password_file:
        password = open(args.password_file).read().strip()
    if not password:
        raise SystemExit("give --password-file or PICAS_PASSWORD")
    couch = bench.Couch(args.url, args.user, password)
    root = listener_pid(couch.port)
    if args.split:
        subprocess.check_call(["taskset", "-a", "-p", "-c", "0", str(root)],
                              stdout=subprocess.DEVNULL)
        os.sched_setaffinity(0, {1})
    n = args.tokens
    out = {"tokens": n, "pilots": args.pilots, "split": args.split, "load_at_start": open("/proc/loadavg").read().split()[0]}
    try:
        def forks():
            for _ in range(n):
                subprocess.call(["true"], stdin=subprocess.DEVNULL, start_new_session=True)
        t0 = time.perf_counter()
        forks()
        out["start_true_ms"] = round(1000 * (time.perf_counter() - t0) / n, 2)

        db = "tokencost-put-%d" % int(time.time() * 1000)
        couch.prepare(db, n)
        _, rows = couch.request("GET", "/%s/_all_docs?include_docs=true" % db)
        docs = [row["doc"] for row in rows["rows"] if row["doc"].get("type") == "token"]

        def puts():
            threads = [threading.Thread(target=writer, args=(docs[k::args.pilots],))
                       for k in range(args.pilots)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failed:
                raise SystemExit("bare PUT: %s" % failed[0])

        failed = []

        def writer(share):
            conn = http.client.HTTPConnection(couch.host, couch.port, timeout=120)
            for doc in share:
                doc.update(lock=int(time.time()), hostname="probe", pilot_id="writer")
                conn.request("PUT", "/%s/%s" % (db, doc["_id"]), body=json.dumps(doc).encode(),
                             headers=couch.headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 201:
                    failed.append("HTTP %d" % resp.status)
                    return
            conn.close()
        out["bare_put"] = measured(root, puts, n)
        couch.delete_db(db)

        db = "tokencost-run-%d" % int(time.time() * 1000)
        couch.prepare(db, n)
        env = dict(os.environ, PICAS_USERNAME=args.user, PICAS_PASSWORD=password)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)

        def pilot():
            procs = [subprocess.Popen([sys.executable, bench.PICAS_PY, "--url", args.url,
                                       "--db", db, "-q", "run", "--", "true"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(args.pilots)]
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise SystemExit("a pilot failed: exit codes %r" % codes)
        out["picas_token"] = measured(root, pilot, n)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["picas_token"]["pilot_and_task_cpu_ms"] = round(
            1000 * (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n, 2)
        states = couch.states(db)
        if states != {"done": n}:
            raise SystemExit("the pilot left %r" % states)
        couch.delete_db(db)
        out["server_cpu_ratio"] = round(out["picas_token"]["server_cpu_ms"] /
                                        out["bare_put"]["server_cpu_ms"], 2)
        out["wall_ratio"] = round(out["picas_token"]["wall_ms"] / out["bare_put"]["wall_ms"], 2)
    finally:
        if args.split:
            subprocess.call(["taskset", "-a", "-p", "-c", "0,1", str(root)],
                            stdout=subprocess.DEVNULL)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
