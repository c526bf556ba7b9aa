"""picas.py runs on every Python a worker node has, with nothing but the standard library."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, states

PICAS = os.path.join(ROOT, "picas.py")

#: Reports the modules that importing picas.py loads from outside the standard library.
PROBE = r"""
import os, sys, sysconfig
sys.path.insert(0, %(root)r)
before = set(sys.modules)
import picas
new = sorted(set(sys.modules) - before)
stdlib_dir = os.path.realpath(sysconfig.get_paths()["stdlib"])
names = getattr(sys, "stdlib_module_names", None)
foreign = []
for name in new:
    top = name.split(".")[0]
    if top == "picas":
        continue
    if names is not None:
        if top not in names:
            foreign.append(name)
        continue
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path is None:
        continue                      # built into the interpreter
    path = os.path.realpath(path)
    if not path.startswith(stdlib_dir) or "site-packages" in path:
        foreign.append(name)
print("loaded %%d modules; foreign: %%s" %% (len(new), ",".join(foreign) or "none"))
print(picas.__version__)
"""


def pyenv_pythons():
    """The newest pyenv CPython of each minor version 3.6-3.13 on this machine."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = {}
    for path in glob.glob(os.path.join(root, "versions", "3.*", "bin", "python")):
        match = re.search(r"/(3)\.(\d+)\.(\d+)/bin/python$", path)
        if match:
            minor, patch = int(match.group(2)), int(match.group(3))
            if 6 <= minor <= 13 and patch >= found.get(minor, (-1, ""))[0]:
                found[minor] = (patch, path)
    return dict((minor, path) for minor, (patch, path) in found.items())


def test_import_under_isolated_mode_loads_only_the_standard_library():
    out = subprocess.check_output([sys.executable, "-I", "-S", "-c", PROBE % {"root": ROOT}])
    lines = out.decode().splitlines()
    assert lines[0].endswith("foreign: none"), lines
    assert re.match(r"^\d+\.\d+\.\d+$", lines[1])


def test_version_runs_without_site_packages():
    out = subprocess.check_output([sys.executable, "-I", "-S", PICAS, "--version"])
    assert out.decode().startswith("picas.py ")


def test_every_pyenv_interpreter_compiles_and_imports_picas():
    pythons = pyenv_pythons()
    if not pythons:
        pytest.skip("no pyenv interpreters on this machine")
    # Machines of this project's kind have every CPython from 3.6 to 3.13 in pyenv.
    assert sorted(pythons) == list(range(6, 14)), sorted(pythons)
    for minor, python in sorted(pythons.items()):
        out = subprocess.check_output([python, "-I", "-S", "-c", PROBE % {"root": ROOT}])
        assert out.decode().splitlines()[0].endswith("foreign: none"), (minor, out)


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_vendored_copy_runs_the_quick_flow(couch, db, tmp_path, which):
    """Copy only picas.py into an empty directory and run the quick example from there."""
    pythons = pyenv_pythons()
    python = pythons[min(pythons) if which == "oldest" else max(pythons)] if pythons \
        else sys.executable
    work = tmp_path / "sandbox"
    work.mkdir()
    shutil.copy(PICAS, str(work / "picas.py"))
    (work / "tokens.txt").write_text('echo "token A"\necho "token B"\nexit 3\n')
    task = work / "task.sh"
    task.write_text('#!/bin/sh\nsh -c "$1"\n')
    task.chmod(0o755)
    env = couch.env(db.name)
    env.pop("PYTHONPATH", None)
    for args in (["views"], ["push", "tokens.txt"], ["run", "--", "./task.sh"]):
        proc = subprocess.run([python, "-I", "picas.py"] + args, cwd=str(work), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert proc.returncode == 0, (python, args, proc.stderr.decode())
    assert sorted(states(db).values()) == ["done", "done", "error"]
    left = sorted(os.listdir(str(work)))
    if "__pycache__" in left:                  # Python's bytecode cache of picas.py
        left.remove("__pycache__")
        assert all(n.startswith("picas.") and n.endswith(".pyc")
                   for n in os.listdir(str(work / "__pycache__")))
    assert left == ["picas.py", "task.sh", "tokens.txt"]


@pytest.mark.parametrize("reexec", [True, False], ids=["as-module", "PICAS_NO_REEXEC"])
def test_a_script_pilot_goes_on_as_a_module_with_the_same_pid_and_options(couch, db, tmp_path,
                                                                         reexec):
    # Frees the syntax tree CPython keeps for a script (about 7 MB) for the pilot's lifetime.
    from helpers import ensure_views, make_tokens, wait_for
    ensure_views(db)
    make_tokens(db, ["a"])
    started = tmp_path / "started"
    task = tmp_path / "task.sh"
    task.write_text("#!/bin/sh\ntouch %s\nsleep 30\n" % started)
    task.chmod(0o755)
    env = couch.env(db.name)
    if not reexec:
        env["PICAS_NO_REEXEC"] = "1"
    pilot = subprocess.Popen([sys.executable, "-S", "-B", PICAS, "run", "--grace", "1", "--",
                              str(task)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert wait_for(started.exists, timeout=30)
        with open("/proc/%d/cmdline" % pilot.pid, "rb") as fh:
            argv = fh.read().split(b"\0")[:-1]
    finally:
        pilot.terminate()
        out, err = pilot.communicate(timeout=30)
    assert pilot.returncode == 143, err                  # the same process, its handlers
    assert argv[1:3] == [b"-S", b"-B"]                    # interpreter options kept
    if reexec:
        assert argv[3] == b"-c" and argv[5:] == [PICAS.encode(), b"run", b"--grace", b"1",
                                                  b"--", str(task).encode()]
    else:
        assert argv[3:5] == [PICAS.encode(), b"run"]
    assert states(db) == {"t-1": "todo"}


@pytest.mark.parametrize("no_bytecode", [False, True], ids=["cache", "-B"])
def test_a_new_copy_writes_its_bytecode_cache_before_going_on_as_a_module(couch, db, tmp_path,
                                                                         no_bytecode):
    """A fresh sandbox's copy: the script writes the cache before the re-exec, so that the
    import loads it instead of compiling in the long-lived pilot (whose memory would keep the
    compiler's peak; the figure is in docs/performance.md). -B means no cache at all."""
    import shutil
    from helpers import ensure_views
    ensure_views(db)
    work = tmp_path / "sandbox"
    work.mkdir()
    shutil.copy(PICAS, str(work / "picas.py"))
    env = couch.env(db.name)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONVERBOSE"] = "1"            # the import system says where each module came from
    argv = [sys.executable] + (["-B"] if no_bytecode else []) + ["picas.py", "run", "--", "true"]
    done = subprocess.run(argv, cwd=str(work), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 3, done.stderr             # no work: exit 3
    cache = work / "__pycache__"
    if no_bytecode:
        assert not cache.exists()
    else:
        names = os.listdir(str(cache))
        assert len(names) == 1 and names[0].startswith("picas.") and names[0].endswith(".pyc")
        # The pilot (after the re-exec) loaded the cache; it did not compile picas.py itself.
        loaded = "code object from '%s'" % (cache / names[0])
        assert loaded in done.stderr.decode("utf-8", "replace"), done.stderr[-2000:]


def test_demo_command(tmp_path):
    """The README's demo: a server, the quick example, a pilot, the status."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "demo finished: 3 tokens done, server stopped" in out
    assert "todo 0  locked 0  done 3  error 0" in out
