#!/bin/bash
# process_task.sh -- the task script of the quick example.
#
#   $1  the token's input: here, a shell command such as  echo "this is token A"
#   $2  the token's id
#
# The pilot runs it once per token:
#
#   python picas.py run -- ./process_task.sh
#
# and records its exit code in the token (0: the token goes to "done",
# anything else: to "error"); what it prints on stdout and stderr is attached
# to the token as logs_<id>.out and logs_<id>.err.
#
# SECURITY -- READ THIS BEFORE USING IT FOR REAL WORK
#   This script runs the token's input as a shell command (bash -c "$1").
#   Whoever can write tokens into the database can therefore run any code,
#   as you, on every machine where a pilot runs. Give write access to the
#   database only to users you trust with your account, and keep its
#   password secret (picasconfig.py: chmod 600).
#   picas.py itself never builds a shell command line from a token: it passes
#   the input to this script as one argument ($1), so a token can only run
#   code if the task script chooses to execute it, as this one does. For
#   real work, prefer a task script that treats $1 as data (parameters, file
#   names) rather than as a command; see fractals/process_fractal.sh.

if [ $# -lt 2 ]; then
    echo "usage: $0 INPUT TOKEN_ID" >&2
    exit 2
fi
input=$1
token_id=$2

echo "token:    $token_id"
echo "host:     $(hostname)"
echo "started:  $(date)"
echo "command:  $input"
echo "----"

bash -c "$input"
status=$?

echo "----"
echo "finished: $(date), exit code $status"
exit "$status"
