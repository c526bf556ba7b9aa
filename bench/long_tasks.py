#!/usr/bin/env python3
"""Requests per token for long tasks (issue 17): P picas.py pilots, N tokens, task `sleep S`.

    python3 bench/long_tasks.py --url http://127.0.0.1:PORT --password-file FILE \
        --pilots 1,4 --tokens 24 --seconds 10
    python3 bench/long_tasks.py ... --pilots 4 --per-pilot 30     # 120 tokens
    python3 bench/long_tasks.py ... --pilots 4 --per-pilot 30 --pool 2000
                    # 120 tokens run (run --max-tasks 30) out of a pool of 2,000

Every request goes through bench.py's CountingProxy; the figure is deterministic enough to
compare (it does not depend on the machine's speed, only on who wins which race).
The password is read from a file or PICAS_PASSWORD and never printed.
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def call(url, auth, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": auth})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read().decode() or "null")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file")
    parser.add_argument("--pilots", default="1,4")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--per-pilot", type=int, help="tokens per pilot (instead of --tokens)")
    parser.add_argument("--pool", type=int, help="todo tokens in the database (default: as many "
                        "as are run); with a larger pool each pilot stops after its share")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    password = os.environ.get("PICAS_PASSWORD")
    if args.password_file:
        password = open(args.password_file).read().strip()
    auth = "Basic " + base64.b64encode(("%s:%s" % (args.user, password)).encode()).decode()
    port = int(args.url.rsplit(":", 1)[1].strip("/"))
    env = dict(os.environ, PICAS_USERNAME=args.user, PICAS_PASSWORD=password)
    for pilots in [int(p) for p in args.pilots.split(",")]:
        if args.per_pilot:
            args.tokens = args.per_pilot * pilots
        db = "long-%d-%d-%d" % (pilots, args.pool or 0, int(time.time() * 1000))
        call(args.url, auth, "PUT", "/" + db)
        call(args.url, auth, "PUT", "/%s/_design/%s" % (db, bench.DESIGN),
             {"language": "javascript", "views": bench.VIEWS})
        pool = max(args.pool or 0, args.tokens)
        docs = [{"_id": "t%05d" % i, "type": "token", "lock": 0, "done": 0}
                for i in range(pool)]
        call(args.url, auth, "POST", "/%s/_bulk_docs" % db, {"docs": docs})
        call(args.url, auth, "GET", "/%s/_design/%s/_view/todo?limit=0" % (db, bench.DESIGN))
        proxy = bench.CountingProxy(port)
        load = open("/proc/loadavg").read().split()[0]
        start = time.time()
        procs = [subprocess.Popen([sys.executable, bench.PICAS_PY, "--url", proxy.url, "--db", db,
                                   "run"] + (["--max-tasks", str(args.tokens // pilots)]
                                             if pool > args.tokens else []) +
                                  ["--", "sh", "-c", "sleep %g" % args.seconds, "sh"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(pilots)]
        codes = [p.wait() for p in procs]
        wall = time.time() - start
        proxy.stop()
        summary = bench.summarize_requests(proxy.records, args.tokens)
        print(json.dumps({"pilots": pilots, "tokens": args.tokens, "pool": pool,
                          "task_s": args.seconds,
                          "wall_s": round(wall, 1), "load_at_start": load,
                          "exit_codes": codes, "requests": summary}, sort_keys=True))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
