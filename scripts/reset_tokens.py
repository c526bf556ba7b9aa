#!/usr/bin/env python3
"""Send tokens back to todo: a wrapper for ``picas.py reset``.

Usage::

    python reset_tokens.py locked --stale          # tokens of pilots that died (no heartbeat)
    python reset_tokens.py locked --older-than 24  # tokens locked more than 24 hours ago
    python reset_tokens.py error --yes             # retry every failed token, without asking
    python reset_tokens.py Monitor/locked 24       # upstream's form: VIEW [HOURS]

A reset token gets lock = done = 0 and scrub_count + 1; its logs and error
history are kept. A token that changes while it is being reset (a pilot
finished it meanwhile) is left alone and counted. Without --yes you are asked
to confirm, which needs a terminal. Connection settings come from the
--url/--db/--user options, then the PICAS_HOST_URL, PICAS_DATABASE,
PICAS_USERNAME and PICAS_PASSWORD environment variables, then a
picasconfig.py in the working directory (or on PYTHONPATH). Exit status: 0
done, 1 an error, 2 bad usage or settings.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.dirname(here)]       # picas.py next to this script, or above it
try:
    from picas import script_main
except ImportError:
    sys.exit("%s: cannot find picas.py (this file, not the upstream picas package) next to "
             "it or in the folder above" % sys.argv[0])


def legacy_hours(rest):
    """Turn upstream's ``VIEW HOURS`` into ``VIEW --older-than HOURS`` (0 meant: all)."""
    positional = []
    skip = False
    for index, arg in enumerate(rest):
        if skip:
            skip = False
        elif arg in ("--older-than", "--lease"):
            skip = True                     # its value is not upstream's HOURS
        elif not arg.startswith("-"):
            positional.append(index)
    if len(positional) != 2:
        return rest
    index = positional[1]
    try:
        hours = float(rest[index])
    except ValueError:
        return rest
    tail = ["--older-than", rest[index]] if hours > 0 else []
    return rest[:index] + tail + rest[index + 1:]


def main(argv=None):
    return script_main("reset", argv, rewrite=legacy_hours)


if __name__ == "__main__":
    sys.exit(main())
