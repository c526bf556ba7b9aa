#!/bin/bash
#SBATCH --job-name=picas-pilot
#SBATCH --array=0-4
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=picas-%A_%a.out
#
# slurm_example.sh -- five PiCaS pilots as a SLURM job array.
#
# Submit from this folder:   sbatch slurm_example.sh
#
# Every array task is one pilot: it claims tokens from the todo view one by
# one, runs ./process_task.sh INPUT TOKEN_ID for each and writes the exit code
# and logs into the token, until no work is left or its time is up. More
# pilots: raise --array (0-19 starts twenty). Connection settings come from
# the PICAS_* environment variables (sbatch passes your environment on) or
# from picas.py's lookup of picasconfig.py in this folder (chmod 600 it).
#
# Time limits. --time is the walltime, and the only place you write it:
#   * the pilot reads the job's end from SLURM (SLURM_JOB_END_TIME, or squeue
#     for this job; --max-time auto, the default) and logs it. It claims a new
#     token only when the run time it learned (its own tokens, at first the
#     pool's recently finished ones) fits before that end, less a minute, so
#     it does not start work it cannot finish. --max-token-time S kills a task
#     running longer than S seconds (exit code 124; a token killed that way
#     three times goes to error as poison).
#   * --signal=B:USR1@300: SLURM sends SIGUSR1 to this batch script 300
#     seconds before the walltime. Because the script exec's the pilot below,
#     the pilot itself is the batch script's process and gets the signal (the
#     "B:" means: only the batch shell is signalled). On SIGUSR1 (and SIGTERM,
#     SIGINT, SIGXCPU) the pilot claims nothing more, stops the running task
#     with its whole process group, gives that token back to todo (it is not
#     counted as a failed attempt), and exits -- before SLURM kills the job.
#     Without this a token running at the walltime stays locked until
#     `python picas.py reset locked --stale` frees it.
#
# Exit codes of the pilot (and so of the array task in sacct):
#     0        tokens were processed
#     1        an error (the server could not be reached, bad credentials...)
#     2        bad usage or settings (no database name, task script missing...)
#     3        no work: the view was empty (sacct shows FAILED; harmless)
#     4        this node looks broken: three tasks in a row failed within 10 s
#              (or could not be executed); their tokens went back to todo,
#              marked so that pilots on this node pass them over
#     128+N    stopped by signal N: 138 for SIGUSR1, 143 for SIGTERM
# A failing task does not fail the pilot: its exit code goes into the token,
# which then shows up in the error view. A task that exits with 75 ("try
# again later": storage busy, say) sends its token back to todo uncharged.

cd "${SLURM_SUBMIT_DIR:-.}" || exit 2

# The task script, relative to the folder you submit from; another one can
# be chosen at submission:  sbatch --export=ALL,TASK=./process_fractal.sh ...
TASK=${TASK:-./process_task.sh}

# picas.py in the submission folder, or one or two folders up (the repository).
for PICAS in picas.py ../picas.py ../../picas.py; do
    [ -f "$PICAS" ] && break
done

# If python3 is not on the PATH of the compute nodes, load it first, e.g.:
#   module load Python
echo "pilot ${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?} on $(hostname) at $(date)"

# Results wait in picas-journal/ of the submission folder until the server
# holds them (a pilot killed right after a task, or a server that stayed away):
# every pilot of the array saves what it finds there before it claims, and
# `python3 picas.py replay picas-journal` does it by hand.
exec python3 "$PICAS" run --max-time auto --journal picas-journal -- "$TASK"
