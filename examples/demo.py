#!/usr/bin/env python3
"""The picas.py demo: a whole PiCaS run on this machine, in one command.

    python3 examples/demo.py

It installs (once) and starts a local CouchDB-compatible server
(pouchdb-server, in memory, on 127.0.0.1), creates a database and the
standard views, pushes the quick example's tokens, runs one pilot over them
with examples/process_task.sh, shows the status and a token's log, and stops
the server again. Every step is the same `python picas.py ...` command you
would run against a real CouchDB; they are printed as they run.
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "server"))
sys.path.insert(0, ROOT)

import picas  # noqa: E402
import pouchdb  # noqa: E402


def step(env, cwd, *args):
    print("\n$ python picas.py " + " ".join(args), flush=True)
    return subprocess.call([sys.executable, "picas.py"] + list(args), env=env, cwd=cwd)


def main():
    print("starting a local CouchDB-compatible server (pouchdb-server, in memory)...")
    password = picas.new_id()[:16]
    with pouchdb.PouchDBServer("admin", password) as server:
        work = tempfile.mkdtemp(prefix="picas-demo-")
        try:
            # A pilot's sandbox holds picas.py, the task script and the token file.
            for src in (os.path.join(ROOT, "picas.py"),
                        os.path.join(HERE, "process_task.sh"),
                        os.path.join(HERE, "quickExample.txt")):
                shutil.copy(src, work)
            env = dict(os.environ, PICAS_HOST_URL=server.url, PICAS_DATABASE="demo",
                       PICAS_USERNAME="admin", PICAS_PASSWORD=password)
            print("server: %s, database: demo (settings passed as PICAS_* variables)"
                  % server.url)
            codes = [step(env, work, "views", "--create-db"),
                     step(env, work, "push", "quickExample.txt"),
                     step(env, work, "status"),
                     step(env, work, "run", "--", "./process_task.sh"),
                     step(env, work, "status")]
            db = picas.Server(server.url, "admin", password).database("demo")
            first = sorted(r["id"] for r in db.view("Monitor/done")["rows"])[:1]
            for token_id in first:
                log = db.get_attachment(token_id, "logs_%s.out" % token_id) or b""
                print("\nthe log attached to token %s (logs_%s.out):" % (token_id, token_id))
                print(log.decode("utf-8", "replace").rstrip())
            counts = picas.count_states(db)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ok = codes == [0, 0, 0, 0, 0] and counts["done"] == 3
    print("\ndemo %s: %d tokens done, server stopped" % ("finished" if ok else "FAILED",
                                                       counts["done"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
