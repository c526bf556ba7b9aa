"""examples/autopilot run as a user would: copied into a campaign folder with
picas.py, against the real test server, with fake ``squeue``/``sbatch`` on
PATH (the fake sbatch records the job and, when asked, runs pilot.sh at once
as SLURM would, so the submitted pilots really do the work)."""
import json
import os
import shutil
import subprocess

import pytest

import picas
from helpers import ROOT, ensure_views
from test_faults import script, token_docs

EXAMPLES = os.path.join(ROOT, "examples")

FAKE_SQUEUE = """\
# squeue -h -u USER -n NAME -t STATES -o %i: the ids of our jobs of that name
while [ $# -gt 0 ]; do
    case "$1" in -n) shift; name=$1 ;; esac
    shift
done
[ -f "$FAKE_SLURM/jobs" ] || exit 0
awk -v n="$name" '$2 == n { print $1 }' "$FAKE_SLURM/jobs"
"""

FAKE_SBATCH = """\
# sbatch --job-name=NAME [options] --export=ALL,PICAS_VIEW=V SCRIPT
for arg in "$@"; do
    case "$arg" in
        --job-name=*) name=${arg#--job-name=} ;;
        --export=ALL,PICAS_VIEW=*) view=${arg#--export=ALL,PICAS_VIEW=} ;;
    esac
    last=$arg
done
echo "$*" >> "$FAKE_SLURM/sbatch.args"
id=$(( $(wc -l < "$FAKE_SLURM/sbatch.args") + 1000 ))
echo "Submitted batch job $id"
if [ "${FAKE_SLURM_RUN:-0}" = 1 ]; then
    SLURM_JOB_ID=$id SLURM_SUBMIT_DIR=$PWD PICAS_VIEW=$view bash "$last" \\
        > "$FAKE_SLURM/job-$id.out" 2>&1
    echo "$?" > "$FAKE_SLURM/job-$id.rc"
else
    echo "$id $name PENDING" >> "$FAKE_SLURM/jobs"
fi
"""


@pytest.fixture
def campaign(tmp_path, couch, db):
    """A campaign folder as a user makes it: picas.py, process_task.sh, autopilot/."""
    folder = tmp_path / "campaign"
    shutil.copytree(os.path.join(EXAMPLES, "autopilot"), str(folder / "autopilot"))
    shutil.copy(os.path.join(ROOT, "picas.py"), str(folder / "picas.py"))
    shutil.copy(os.path.join(EXAMPLES, "process_task.sh"), str(folder / "process_task.sh"))
    (folder / "autopilot" / "autopilot.conf").write_text(
        "# a test campaign\nSingleCore/todo 3 --cpus-per-task=1\n"
        "MultiCore/todo  2 --cpus-per-task=4 --time=01:00:00\n")
    fake = tmp_path / "slurm"
    fake.mkdir()
    script(fake / "squeue", FAKE_SQUEUE)
    script(fake / "sbatch", FAKE_SBATCH)
    ensure_views(db)
    db.ensure_design("SingleCore", picas.standard_views("doc.cores == 1"))
    db.ensure_design("MultiCore", picas.standard_views("doc.cores == 4"))
    picas.push_tokens(db, tokens=[{"input": "echo small %d" % i, "cores": 1} for i in range(3)],
                      id_prefix="single")
    env = couch.env(db.name)
    env.update(FAKE_SLURM=str(fake), PATH="%s:%s" % (fake, env.get("PATH", "")))

    def run(**extra):
        proc = subprocess.run(["bash", str(folder / "autopilot" / "autopilot.sh")],
                              env=dict(env, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=180)
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    def submitted():
        path = fake / "sbatch.args"
        return path.read_text().splitlines() if path.exists() else []

    return run, submitted, fake, folder


def test_autopilot_submits_only_for_classes_with_work_up_to_the_maximum(campaign, db):
    run, submitted, fake, _ = campaign
    code, out = run()
    assert code == 0, out
    assert "MultiCore/todo: no work; nothing submitted" in out
    assert "SingleCore/todo: has work; 0 pilots were queued or running, submitted 2 (at most 3)" \
        in out
    jobs = submitted()
    assert len(jobs) == 2 and all("--job-name=picas-SingleCore" in j and
                                  "--cpus-per-task=1" in j and
                                  "PICAS_VIEW=SingleCore/todo" in j for j in jobs)
    code, out = run()
    assert "2 pilots were queued or running, submitted 1 (at most 3)" in out
    code, out = run()
    assert "3 pilots queued or running (at most 3); nothing submitted" in out
    assert len(submitted()) == 3

    # Work for the other class appears: it gets pilots with its own options.
    picas.push_tokens(db, tokens=[{"input": "echo big", "cores": 4}], id_prefix="multi")
    code, out = run()
    assert "MultiCore/todo: has work; 0 pilots were queued or running, submitted 2 (at most 2)" \
        in out
    multi = [j for j in submitted() if "picas-MultiCore" in j]
    assert len(multi) == 2 and all("--time=01:00:00" in j for j in multi)


def test_autopilot_pilots_do_the_work_and_then_nothing_is_submitted(campaign, db):
    run, submitted, fake, folder = campaign
    code, out = run(FAKE_SLURM_RUN="1")
    assert code == 0, out
    assert len(submitted()) == 2
    rcs = sorted(int((fake / name).read_text()) for name in os.listdir(str(fake))
                 if name.endswith(".rc"))
    assert rcs == [0, picas.EXIT_NO_WORK]        # the first pilot ran all three tokens
    docs = token_docs(db)
    assert sorted(picas.token_state(d) for d in docs.values()) == ["done"] * 3
    for token_id, doc in docs.items():
        log = db.get_attachment(doc, "logs_%s.out" % token_id)
        assert ("\n%s\n" % doc["input"][len("echo "):]).encode() in log
    code, out = run(FAKE_SLURM_RUN="1")
    assert "SingleCore/todo: no work; nothing submitted" in out
    assert len(submitted()) == 2
    assert not os.path.exists(str(folder / "autopilot" / "picas-journal")) or \
        not os.listdir(str(folder / "autopilot" / "picas-journal"))


def test_autopilot_submits_nothing_when_the_database_cannot_be_asked(campaign, couch):
    run, submitted, fake, folder = campaign
    code, out = run(PICAS_PASSWORD="wrong-password")
    assert code == 1
    assert "SingleCore/todo: could not ask the database (see above); nothing submitted" in out
    assert "check the user name and password" in out and "wrong-password" not in out
    assert submitted() == []

    (folder / "autopilot" / "autopilot.conf").write_text("SingleCore/todo many\n")
    code, out = run()
    assert code == 2 and "MAX_PILOTS must be a whole number" in out
    assert submitted() == []
    code, out = run(AUTOPILOT_STEP="two")
    assert code == 2 and "AUTOPILOT_STEP=two: give a whole number" in out


def test_autopilot_reads_confs_as_editors_save_them(campaign):
    """A last line without a newline, Windows line ends, a leading zero, a glob in the
    options: the class is still read, its maximum is decimal, the option stays as written."""
    run, submitted, fake, folder = campaign
    (folder / "autopilot" / "x*").write_text("")         # a file the glob could match
    (folder / "autopilot" / "autopilot.conf").write_bytes(
        b"# classes\r\nSingleCore/todo 08 --gres=gpu:x* --cpus-per-task=1\r\nMultiCore/todo 1")
    code, out = run(AUTOPILOT_STEP="09")
    assert code == 0, out
    assert "SingleCore/todo: has work; 0 pilots were queued or running, submitted 8 (at most 8)" \
        in out
    assert "MultiCore/todo: no work; nothing submitted" in out
    jobs = submitted()
    assert len(jobs) == 8 and all("--gres=gpu:x* --cpus-per-task=1 --export" in j for j in jobs)
