import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")
CHECKER = os.path.join(os.path.dirname(ROOT), "shared", "tools", "check_save_dir.py")
sys.path.insert(0, WORKERS)


def run(cmd, timeout=240, check=True, env=None, **kw):
    """Run a real process; on failure show its output in the assertion."""
    from helpers import env as child_env

    full_env = child_env(**(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc, script, *args, **kw):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(_free_port()), os.path.join(WORKERS, script), *map(str, args)], **kw)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checker():
    """The contract's own checker, ../shared/tools/check_save_dir.py; tests that use it skip without it."""
    if not os.path.isfile(CHECKER):
        pytest.skip(f"{CHECKER} is absent: these tests check save_dirs with the shared contract checker, which "
                    "lives beside this repository (../shared)")

    def check(save_dir, deep=True):
        return run([sys.executable, CHECKER, str(save_dir)] + (["--deep"] if deep else []), check=False)
    return check


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """reference_run(nproc, kind, *extra): the save_dir of an uninterrupted, synchronously saving trainer run
    with trainer_runs.BASE flags; made once per session for each launch and shared by the resume tests."""
    from trainer_runs import BASE, launcher, train

    made = {}

    def get(nproc: int, kind: str, *extra: str):
        key = (nproc, kind, extra)
        if key not in made:
            save_dir = tmp_path_factory.mktemp("reference")
            train(launcher(nproc, kind), *BASE, *extra, "--save_dir", save_dir, "--no_async_save")
            made[key] = save_dir
        return made[key]

    return get
