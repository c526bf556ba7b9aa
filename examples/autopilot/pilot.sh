#!/bin/bash
#SBATCH --output=picas-%j.out
#SBATCH --signal=B:USR1@300
#
# pilot.sh -- one pilot of the autopilot: claims from $PICAS_VIEW (set by
# autopilot.sh from autopilot.conf), runs $TASK for each token, and stops
# when the view is empty or the job's walltime (read from SLURM) is near.
# See ../slurm_example.sh for what the options and exit statuses mean.
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
TASK=${TASK:-../process_task.sh}
for PICAS in picas.py ../picas.py ../../picas.py; do
    [ -f "$PICAS" ] && break
done
echo "pilot $SLURM_JOB_ID for ${PICAS_VIEW:?set by autopilot.sh} on $(hostname) at $(date)"
exec python3 "$PICAS" run --view "$PICAS_VIEW" --max-time auto --journal picas-journal -- "$TASK"
