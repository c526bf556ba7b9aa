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

The script imports picas.py from the folder above it (the repository layout)
or from its own folder (picas.py copied next to it).
"""
import os
import sys

# picas.py's own options, which must come before the subcommand.
_VALUE_OPTIONS = ("--url", "--db", "--user", "--config", "--design-doc", "--cafile",
                  "--capath", "--timeout", "--password")
_FLAG_OPTIONS = ("--insecure", "--verbose", "--quiet", "--version", "-v", "-vv", "-vvv", "-q")


def import_picas():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    try:
        import picas
    except ImportError:
        sys.exit("%s: cannot find picas.py: put it next to this script or in the folder above"
                 % os.path.basename(sys.argv[0]))
    if not hasattr(picas, "connection_settings"):
        sys.exit("%s: %s is not picas.py (an installed upstream picas package?)"
                 % (os.path.basename(sys.argv[0]), getattr(picas, "__file__", "picas")))
    return picas


def split_global_options(argv):
    """Return (picas.py's global options, the rest), so both may be given in any order."""
    front, rest = [], []
    args = iter(argv)
    for arg in args:
        name = arg.split("=", 1)[0]
        if arg == "--":
            rest.append(arg)
            rest.extend(args)
        elif name in _VALUE_OPTIONS:
            front.append(arg)
            if "=" not in arg:
                front.append(next(args, ""))
        elif arg in _FLAG_OPTIONS:
            front.append(arg)
        else:
            rest.append(arg)
    return front, rest


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
    picas = import_picas()
    front, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    return picas.main(front + ["reset"] + legacy_hours(rest))


if __name__ == "__main__":
    sys.exit(main())
