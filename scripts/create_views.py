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


def main(argv=None):
    picas = import_picas()
    front, rest = split_global_options(sys.argv[1:] if argv is None else argv)
    if "autopilot" not in rest:
        return picas.main(front + ["views"] + rest)
    # Upstream's "autopilot" layout: one design document per core count, so
    # pilots asking for 1 or 4 cores each claim only the tokens that fit them.
    rest.remove("autopilot")
    status = picas.main(front + ["views"] + rest)
    rest = [arg for arg in rest if arg != "--create-db"]
    for design, cores in (("SingleCore", 1), ("MultiCore", 4)):
        if status == 0:
            status = picas.main(front + ["--design-doc", design, "views",
                                         "--filter", "doc.cores == %d" % cores] + rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
