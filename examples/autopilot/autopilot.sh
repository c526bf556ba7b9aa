#!/bin/bash
# autopilot.sh -- submit SLURM pilots only while the database has work for them.
#
# Run it every few minutes from scrontab (or cron) on the cluster's login node:
#
#     scrontab -e
#     #SCRON --time=00:05:00
#     */10 * * * * /home/me/campaign/autopilot/autopilot.sh >> /home/me/campaign/autopilot.log 2>&1
#
# Each line of autopilot.conf (next to this script, or $AUTOPILOT_CONF) is one
# resource class:   VIEW  MAX_PILOTS  SBATCH_OPTIONS...
#
#     SingleCore/todo   20   --cpus-per-task=1 --time=04:00:00
#     MultiCore/todo     5   --cpus-per-task=4 --time=12:00:00
#
# For every class whose view has tokens (`picas.py has-work VIEW`: exit 0),
# it counts the pilots of that class that are queued or running (squeue, by
# job name picas-<view>, e.g. picas-SingleCore_todo) and submits up to $AUTOPILOT_STEP more (default 2),
# never more than MAX_PILOTS in all. A class without work gets nothing; a
# server that cannot be reached gets nothing submitted and a line in the log.
# Two runs never overlap (flock). Connection settings: the PICAS_* variables
# or a picasconfig.py in this folder (chmod 600), as for every picas.py command.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
CONF=${AUTOPILOT_CONF:-$HERE/autopilot.conf}
STEP=${AUTOPILOT_STEP:-2}
PILOT=${AUTOPILOT_PILOT:-$HERE/pilot.sh}
PYTHON=${PYTHON:-python3}
for PICAS in "$HERE/picas.py" "$HERE/../picas.py" "$HERE/../../picas.py"; do
    [ -f "$PICAS" ] && break
done
cd "$HERE" || exit 2
say() { echo "$(date -u '+%Y-%m-%d %H:%M:%S') autopilot: $*"; }

if [ ! -f "$CONF" ]; then
    say "no $CONF: write one line per resource class (VIEW MAX_PILOTS SBATCH_OPTIONS...)"
    exit 2
fi
if command -v flock >/dev/null 2>&1; then
    exec 9>"$HERE/.autopilot.lock"
    if ! flock -n 9; then
        say "another autopilot run is still busy; this one does nothing"
        exit 0
    fi
fi

case "$STEP" in
    ''|*[!0-9]*) say "AUTOPILOT_STEP=$STEP: give a whole number"; exit 2 ;;
esac
STEP=$((10#$STEP))
if ! command -v flock >/dev/null 2>&1; then
    say "flock not found: two runs at once could both submit (install util-linux)"
fi

status=0
set -f                  # SBATCH_OPTIONS are split into words, never expanded as file names
while read -r view max options || [ -n "$view" ]; do
    max=${max%$'\r'}
    options=${options%$'\r'}       # a conf saved with Windows line ends
    case "$view" in ''|'#'*) continue ;; esac
    case "$max" in
        ''|*[!0-9]*)
            say "$CONF: '$view $max': MAX_PILOTS must be a whole number; class skipped"
            status=2
            continue ;;
    esac
    max=$((10#$max))
    case "$view" in
        *,*) say "$CONF: view '$view' holds a comma (sbatch --export cannot pass it); class skipped"
             status=2
             continue ;;
    esac
    name="picas-$(printf '%s' "$view" | tr -c 'A-Za-z0-9_.-' '_')"
    "$PYTHON" "$PICAS" -q has-work "$view" </dev/null
    case $? in
        0) ;;
        3) say "$view: no work; nothing submitted"; continue ;;
        *) say "$view: could not ask the database (see above); nothing submitted"
           status=1; continue ;;
    esac
    if ! jobs=$(squeue -h -u "${USER:-$(id -un)}" -n "$name" -t PENDING,RUNNING,CONFIGURING,SUSPENDED,REQUEUED,REQUEUE_HOLD -o %i </dev/null); then
        say "$view: squeue failed; nothing submitted"
        status=1
        continue
    fi
    have=$(printf '%s' "$jobs" | grep -c .)
    want=$(( max - have ))
    [ "$want" -gt "$STEP" ] && want=$STEP
    if [ "$want" -le 0 ]; then
        say "$view: has work; $have pilots queued or running (at most $max); nothing submitted"
        continue
    fi
    for _ in $(seq "$want"); do
        # shellcheck disable=SC2086  # the options are words on purpose
        if ! sbatch --job-name="$name" $options --export=ALL,PICAS_VIEW="$view" "$PILOT" </dev/null; then
            say "$view: sbatch failed"
            status=1
            break
        fi
    done
    say "$view: has work; $have pilots were queued or running, submitted $want (at most $max)"
done < "$CONF"
exit $status
