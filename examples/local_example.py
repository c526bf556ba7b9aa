#!/usr/bin/env python3
"""The quick example with picas.py's Python API, for pilots that need Python code.

Usage::

    python local_example.py [--design-doc Monitor] [--view todo]

It claims tokens from the view, runs ``./process_task.sh INPUT TOKEN_ID`` for
each, stores the exit code and attaches the output as ``logs_<id>.out`` and
``logs_<id>.err``. It stops after MAX_TASKS tokens, after MAX_TOTAL_TIME
seconds, or when the view is empty; a task running longer than
MAX_TOKEN_TIME seconds is killed (exit code 124); a failed token is tried
again up to MAX_SCRUB more times.

``python picas.py run -- ./process_task.sh`` does the same without any Python
code (and caps the size of the attached logs); start from this file when the
work itself is Python, or when you want to decide in Python what goes into
the token.

Connection settings: the PICAS_HOST_URL, PICAS_DATABASE, PICAS_USERNAME and
PICAS_PASSWORD environment variables, else a picasconfig.py in the working
directory or next to this file (see picasconfig.py.example). picas.py is
imported from the folder above (the repository layout) or from this folder.

Exit status: 0 tokens were processed, 1 an error, 2 bad settings, 3 no work
found, 128+N stopped by signal N (the running token went back to todo).
"""
import argparse
import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import picas  # noqa: E402  (after the sys.path change above)

#: The task script; it gets the token's input as $1 and its id as $2.
TASK_SCRIPT = os.path.join(HERE, "process_task.sh")

# Stop criteria, as upstream's example used them.
MAX_TOKEN_TIME = 1800   # seconds one token may run before it is killed
MAX_TOTAL_TIME = 3600   # seconds after which no new token is claimed
MAX_TASKS = 10          # tokens this pilot processes at most
MAX_SCRUB = 2           # times a failed token goes back to todo for another try


class ExampleActor(picas.RunActor):
    """Runs the task script for every token it claims."""

    def process_task(self, token):
        # ``token`` is a picas.Task: a dict holding the CouchDB document.
        print("-----------------------")
        print("Working on token: %s" % token["_id"])
        for key in sorted(token):
            if key != "_attachments":
                print("%s %s" % (key, token[key]))

        value = token["input"]
        argument = value if isinstance(value, str) else json.dumps(value)
        # The input is passed as one argument: no shell ever parses it here.
        proc, exit_code, out, err = picas.execute([TASK_SCRIPT, argument, token["_id"]])

        # The result exists: from here on a stop signal lets it be saved
        # instead of sending the token back to todo.
        self.finishing()
        token["exit_code"] = exit_code
        token.put_attachment("logs_%s.out" % token["_id"], out)
        token.put_attachment("logs_%s.err" % token["_id"], err)
        print("exit_code %s" % exit_code)
        print("-----------------------")
        # The actor saves the token when this method returns: exit code 0
        # puts it in the done view, anything else in error (or back in todo
        # while scrub_count < max_scrub).


def connect():
    """Return the Database named by the PICAS_* variables or a picasconfig.py."""
    config = None
    next_to_me = os.path.join(HERE, "picasconfig.py")
    if not os.path.isfile("picasconfig.py") and os.path.isfile(next_to_me):
        config = next_to_me
    # picas.py's own loader: environment variables first, then picasconfig.py.
    settings = argparse.Namespace(url=None, db=None, user=None, config=config)
    url, dbname, user, password = picas.connection_settings(settings)
    # The task script runs token input as shell code: keep the password out
    # of its environment (the Server below already holds it).
    os.environ.pop("PICAS_PASSWORD", None)
    server = picas.Server(url, user, password)
    return server.database(dbname)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run the quick example's tokens with picas.py's Python API.")
    parser.add_argument("--design-doc", "--design_doc", default="Monitor",
                        help="design document holding the views (default: %(default)s)")
    parser.add_argument("--view", default="todo",
                        help="view to take tokens from (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="picas: %(message)s")

    if not os.access(TASK_SCRIPT, os.X_OK):
        print("%s is missing or not executable: chmod +x %s" % (TASK_SCRIPT, TASK_SCRIPT),
              file=sys.stderr)
        return 2
    try:
        db = connect()
        # Fail early, with a clear message, when the database or view is missing.
        db.view("%s/%s" % (args.design_doc, args.view), limit=0)
    except picas.UsageError as exc:
        print("local_example.py: %s" % exc, file=sys.stderr)
        return 2
    except picas.PicasError as exc:
        print("local_example.py: %s" % exc, file=sys.stderr)
        return 1

    actor = ExampleActor(db, view=args.view, design_doc=args.design_doc)
    try:
        # A stop signal (SIGTERM, SIGINT, SIGUSR1, SIGXCPU) ends run() with
        # SystemExit(128 + N) after the running token went back to todo.
        actor.run(max_token_time=MAX_TOKEN_TIME, max_total_time=MAX_TOTAL_TIME,
                  max_tasks=MAX_TASKS, max_scrub=MAX_SCRUB)
    except picas.PicasError as exc:
        print("local_example.py: %s" % exc, file=sys.stderr)
        return 1
    print("processed %d tokens" % actor.tasks_processed)
    return 0 if actor.tasks_processed else 3


if __name__ == "__main__":
    sys.exit(main())
