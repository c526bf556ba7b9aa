#!/usr/bin/env python3
"""Create one token per line of a file: a wrapper for ``picas.py push``.

Usage::

    python push_tokens.py FILE               # one token per non-empty line
    python push_tokens.py -                  # lines from standard input
    python push_tokens.py --json FILE        # a JSON array (or JSON lines) of token bodies
    python push_tokens.py --id-prefix run7 FILE
    python push_tokens.py --db otherdb FILE  # picas.py's connection options work too

Each line becomes the token's ``input``. Token ids are derived from the file
name and a hash of its content, so pushing the same file twice adds nothing
the second time. Connection settings come from the --url/--db/--user options,
then the PICAS_HOST_URL, PICAS_DATABASE, PICAS_USERNAME and PICAS_PASSWORD
environment variables, then a picasconfig.py in the working directory (or on
PYTHONPATH). Exit status: 0 all tokens created (or already there), 1 an error,
2 bad usage or settings.

The script imports picas.py from the folder above it (the repository layout)
or from its own folder (picas.py copied next to it).
"""
import os
import sys

SUBCOMMAND = "push"

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


def main(argv=None):
    picas = import_picas()
    front, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    return picas.main(front + [SUBCOMMAND] + rest)


if __name__ == "__main__":
    sys.exit(main())
