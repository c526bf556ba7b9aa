#!/bin/sh
# startpilot.sh -- start one PiCaS pilot on a grid worker node.
#
# Usage (grid-example.jdl runs it as  /bin/sh startpilot.sh 72000):
#
#     sh startpilot.sh [MAX_TIME [TASK_SCRIPT]]
#
# The job's input sandbox holds picas.py, this script, the task script
# (TASK_SCRIPT, default process_task.sh) and picasconfig.py; nothing else is
# needed but a Python 3.6 or newer, which the script looks for as
# $PICAS_PYTHON, python3, then python. The pilot claims
# tokens until the todo view is empty or the job's time is nearly up: MAX_TIME
# seconds from now (default 72000, 20 hours; the walltime your JDL's CPUTime
# buys at the sites you use), passed to the pilot as PICAS_END_TIME. The pilot
# also asks the site's batch system (SLURM, PBS/Torque, HTCondor) and takes
# the earliest end it finds; it claims a token only when its learned run time
# fits before that end, less a minute.
#
# The script exits with the pilot's status: 0 tokens were processed, 1 an
# error, 2 bad usage or settings, 3 no work found, 4 this worker node looks
# broken (its tasks failed fast, one after another: the tokens went back to
# todo for other nodes), 128+N stopped by signal N.
# Signals this shell receives (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGXCPU) are
# passed on to the pilot, which then gives its running token back to todo.

MAX_TIME=${1:-72000}
TASK=${2:-process_task.sh}
case $MAX_TIME in
    ''|*[!0-9]*) echo "usage: sh startpilot.sh [MAX_TIME_SECONDS [TASK_SCRIPT]]" >&2; exit 2 ;;
esac
case $TASK in
    */*) ;;
    *) TASK=./$TASK ;;
esac

echo "=== PiCaS pilot"
echo "host:       $(hostname 2>/dev/null || uname -n)"
echo "date:       $(date)"
echo "system:     $(uname -srm)"
echo "directory:  $(pwd)"
echo "job id:     ${DIRACJOBID:-${GLITE_WMS_JOBID:-unknown}}"
echo "max time:   $MAX_TIME s"
# The job's end as the pilot sees it, unless the wrapper set it already.
PICAS_END_TIME=${PICAS_END_TIME:-$(( $(date +%s) + MAX_TIME ))}
export PICAS_END_TIME
echo "task:       $TASK"

# A Python 3.6 or newer: picas.py uses nothing but its standard library.
PYTHON=
for candidate in ${PICAS_PYTHON:-} python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 6))' 2>/dev/null; then
        PYTHON=$(command -v "$candidate")
        break
    fi
done
if [ -z "$PYTHON" ]; then
    echo "startpilot.sh: no Python 3.6 or newer on this worker node (set PICAS_PYTHON," >&2
    echo "for example to a python3 on CVMFS)" >&2
    exit 2
fi
echo "python:     $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"

for file in picas.py "$TASK"; do
    if [ ! -f "$file" ]; then
        echo "startpilot.sh: $file is not in the sandbox: add it to InputSandbox" >&2
        exit 2
    fi
done
if [ -f picasconfig.py ]; then
    chmod 600 picasconfig.py          # it holds the password
elif [ -z "${PICAS_HOST_URL:-}" ]; then
    echo "startpilot.sh: no picasconfig.py in the sandbox and no PICAS_* variables" >&2
    exit 2
fi
chmod +x "$TASK"
echo "sandbox:"
ls -l
echo "==="

# Run the pilot in the background so that this shell can pass signals on
# (SIGHUP becomes SIGTERM, which the pilot handles).
pilot=
signalled=
forward() {    # $1: the signal this shell got, $2: the signal for the pilot
    signalled=$2
    echo "startpilot.sh: SIG$1: stopping the pilot" >&2
    [ -n "$pilot" ] && kill -"$2" "$pilot" 2>/dev/null
}
trap 'forward TERM TERM' TERM
trap 'forward INT INT' INT
trap 'forward HUP TERM' HUP
trap 'forward USR1 USR1' USR1
trap 'forward XCPU XCPU' XCPU
"$PYTHON" picas.py run --max-time auto --journal picas-journal -- "$TASK" &
pilot=$!
[ -n "$signalled" ] && kill -"$signalled" "$pilot" 2>/dev/null

# A trapped signal makes wait return early (status 128+N): wait again until
# the pilot has given its token back and exited, and take its own status.
wait "$pilot"
status=$?
while kill -0 "$pilot" 2>/dev/null; do
    wait "$pilot"
    status=$?
done
if [ -n "$signalled" ]; then
    wait "$pilot"
    rc=$?
    [ "$rc" -ne 127 ] && status=$rc
fi

# Results a pilot could not hand to the server (it was killed, the server was
# away) wait in picas-journal/: ship them back in the OutputSandbox (always
# present, empty or not); `python3 picas.py replay picas-journal` after
# `tar -xf picas-journal.tar` saves them from any machine.
mkdir -p picas-journal
tar -cf picas-journal.tar picas-journal 2>/dev/null || : > picas-journal.tar
left=$(ls picas-journal | grep -c '\.json$')
[ "$left" -gt 0 ] && echo "startpilot.sh: $left results wait in picas-journal.tar (OutputSandbox)" >&2

echo "=== pilot exited with status $status at $(date)"
exit "$status"
