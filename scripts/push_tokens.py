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
    return script_main("push", argv)


if __name__ == "__main__":
    sys.exit(main())
