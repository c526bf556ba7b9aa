#!/bin/bash
# process_task.sh -- the task script for pilots on grid worker nodes.
#
#   $1  the token's input: here, a shell command
#   $2  the token's id
#
# startpilot.sh runs the pilot as
#
#   python3 picas.py run --max-time ... -- ./process_task.sh
#
# which calls this script once per token and stores its exit code in the
# token (0: done, anything else: error), with its stdout and stderr attached
# as logs_<id>.out and logs_<id>.err.
#
# Each token runs in a scratch directory of its own, removed afterwards:
# files left on a worker node are lost when the job ends, so a task that
# produces files must copy them to grid storage itself (see the end).
#
# SECURITY: this script runs the token's input as a shell command
# (bash -c "$1"). Anyone who can write tokens into the database can run any
# code, with your grid credentials, on every worker node your pilots reach.
# Only trusted users may have write access to the database. picas.py itself
# never pastes the input into a shell command line: it hands it to this
# script as a single argument; running it is this script's choice.

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT TOKEN_ID" >&2
    exit 2
fi
input=$1
token_id=$2

top=$(pwd)
workdir=$(mktemp -d "$top/task.XXXXXX") || exit 1
trap 'cd "$top" && rm -rf "$workdir"' EXIT
cd "$workdir" || exit 1

echo "token:    $token_id"
echo "host:     $(hostname)"
echo "job:      ${DIRACJOBID:-${GLITE_WMS_JOBID:-unknown}}"
echo "started:  $(date)"
echo "command:  $input"
echo "----"

bash -c "$input"
status=$?

echo "----"
echo "finished: $(date), exit code $status"
# Copy results to storage before the scratch directory goes, for example:
#   gfal-copy "file://$workdir/result.dat" "davs://storage.example.org/myproject/$token_id.dat"
exit "$status"
