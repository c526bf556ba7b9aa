#!/usr/bin/env python3
"""Delete the tokens in a view: a wrapper for ``picas.py delete``.

Usage::

    python delete_tokens.py error                # asks before deleting
    python delete_tokens.py done --yes           # no question (needed without a terminal)
    python delete_tokens.py Monitor/todo --yes   # a view in another design document

Deleting cannot be undone: the tokens and their attached logs are gone. A
token that changes while it is being deleted is left alone and counted.
Connection settings come from the --url/--db/--user options, then the
PICAS_HOST_URL, PICAS_DATABASE, PICAS_USERNAME and PICAS_PASSWORD environment
variables, then a picasconfig.py in the working directory (or on PYTHONPATH).
Exit status: 0 done, 1 an error, 2 bad usage or settings.
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


def main(argv=None):
    return script_main("delete", argv)


if __name__ == "__main__":
    sys.exit(main())
