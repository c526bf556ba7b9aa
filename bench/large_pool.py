#!/usr/bin/env python3
"""Claim rate in a large pool against a small one (issue 17): P picas.py pilots, task `true`.

    python3 bench/large_pool.py --url http://127.0.0.1:PORT --password-file FILE \
        --pilots 4 --pools 1000,100000 --work 1000 --rounds 2

For each pool size a fresh database gets that many todo tokens (its index is
built before the pilots start, so no pilot pays for it). Then P pilots run
until ``--work`` tokens are done: a pool of exactly ``--work`` tokens is
drained, a larger one is left with the rest (``run --max-tasks``, work/P each).
The rate is tokens done / wall time of the pilots. Pool sizes alternate per
round so that a change in the machine's load hits both. The password comes
from a file or PICAS_PASSWORD and is never printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def one_run(couch, args, password, pool, round_):
    db = "pool-%d-%d-%d" % (pool, round_, int(time.time()))
    t0 = time.time()
    couch.prepare(db, pool)
    setup = time.time() - t0
    per_pilot = args.work // args.pilots
    env = dict(os.environ, PICAS_USERNAME=args.user, PICAS_PASSWORD=password)
    argv = [sys.executable, bench.PICAS_PY, "--url", args.url, "--db", db, "run",
            "--heartbeat", "0"]
    if pool > args.work:
        argv += ["--max-tasks", str(per_pilot)]
    load = float(open("/proc/loadavg").read().split()[0])
    start = time.time()
    procs = [subprocess.Popen(argv + ["--", "true"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(args.pilots)]
    codes = [p.wait() for p in procs]
    wall = time.time() - start
    states = couch.states(db)
    couch.delete_db(db)
    done = states.get("done", 0)
    return {"pool": pool, "round": round_, "pilots": args.pilots, "done": done,
            "states": states, "wall_s": round(wall, 2), "tokens_per_s": round(done / wall, 1),
            "exit_codes": codes, "load_at_start": load, "setup_s": round(setup, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file")
    parser.add_argument("--pilots", type=int, default=4)
    parser.add_argument("--pools", default="1000,100000")
    parser.add_argument("--work", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    password = os.environ.get("PICAS_PASSWORD")
    if args.password_file:
        password = open(args.password_file).read().strip()
    couch = bench.Couch(args.url, args.user, password)
    pools = [int(p) for p in args.pools.split(",")]
    runs = []
    for round_ in range(args.rounds):
        for pool in (pools if round_ % 2 == 0 else pools[::-1]):
            run = one_run(couch, args, password, pool, round_)
            runs.append(run)
            print(json.dumps(run, sort_keys=True))
            sys.stdout.flush()
    medians = dict((pool, statistics.median(r["tokens_per_s"] for r in runs if r["pool"] == pool))
                   for pool in pools)
    print(json.dumps({"median_tokens_per_s": medians,
                      "ratio_largest_to_smallest": round(medians[max(pools)] /
                                                         medians[min(pools)], 3)}))


if __name__ == "__main__":
    main()
