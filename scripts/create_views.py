#!/usr/bin/env python3
"""Create or update the standard PiCaS views: a wrapper for ``picas.py views``.

Usage::

    python create_views.py               # _design/Monitor: todo, locked, done, error,
                                         # overview_total
    python create_views.py --create-db   # also create the database if it is missing
    python create_views.py --design-doc Big --filter "doc.size > 100"
    python create_views.py autopilot     # also _design/SingleCore (doc.cores == 1)
                                         # and _design/MultiCore (doc.cores == 4)

Views that already hold the standard definitions are left untouched, so it is
safe to run this again. Connection settings come from the --url/--db/--user
options, then the PICAS_HOST_URL, PICAS_DATABASE, PICAS_USERNAME and
PICAS_PASSWORD environment variables, then a picasconfig.py in the working
directory (or on PYTHONPATH). Exit status: 0 done, 1 an error, 2 bad usage or
settings.
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "autopilot" not in argv:
        return script_main("views", argv)
    # Upstream's "autopilot" layout: one design document per core count, so
    # pilots asking for 1 or 4 cores each claim only the tokens that fit them.
    argv.remove("autopilot")
    status = script_main("views", argv)
    argv = [arg for arg in argv if arg != "--create-db"]
    for design, cores in (("SingleCore", 1), ("MultiCore", 4)):
        if status == 0:
            status = script_main("views", argv + ["--design-doc", design,
                                                  "--filter", "doc.cores == %d" % cores])
    return status


if __name__ == "__main__":
    sys.exit(main())
