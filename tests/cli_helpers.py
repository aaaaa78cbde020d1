"""Shared by the tests of the `dcp-resume` console script: real training runs (built once per test session),
damaged copies of them, and the CLI run in subprocesses, several at a time (each one imports torch: ~4 s of
CPU), or in this process through main() for the variants of a command already shown in a subprocess."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading

from conftest import ROOT
from helpers import env, flip_byte
from trainer_runs import BASE, launcher

CLI = [sys.executable, "-m", "dcp_resume.cli"]
SHARD = "state/__0_0.distcp"
_runs: dict[str, str] = {}
_lock = threading.Lock()


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return cli_many([list(args)], **kw)[0]


def cli_many(argvs: list[list[str]], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run `dcp-resume <argv>` for each argv at once; results in order (stdout, stderr, returncode)."""
    procs = [subprocess.Popen(CLI + [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(), cwd=ROOT) for argv in argvs]
    out = []
    for argv, proc in zip(argvs, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return out


def run_main(*args) -> subprocess.CompletedProcess:
    """`dcp-resume <args>` through dcp_resume.cli.main in this process: the same code without the startup."""
    from dcp_resume.cli import main

    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, its own usage errors
            code = e.code
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def trained_runs(base_dir) -> dict[str, str]:
    """Two real latentwire/train.py runs, started together, once per test session:
    'fsdp2_ws2': torchrun, 2 ranks, FSDP2, keep_last_n 10 -> step_3, epoch1 (is_best), step_9, step_12 (final)
    'ws1': plain python, 1 rank -> step_4 (final)."""
    with _lock:
        if not _runs:
            want = {
                "fsdp2_ws2": launcher(2) + BASE + ["--fsdp", "--keep_last_n", "10"],
                "ws1": launcher(1, "python") + ["--tiny", "--samples", "16", "--batch_size", "4", "--epochs", "1",
                                                "--save_every", "0"],
            }
            procs = {name: subprocess.Popen(cmd + ["--save_dir", os.path.join(base_dir, name)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=env(), cwd=ROOT) for name, cmd in want.items()}
            for name, proc in procs.items():
                output = proc.communicate(timeout=300)[0]
                assert proc.returncode == 0, f"{want[name]} exited {proc.returncode}:\n{output[-5000:]}"
                _runs[name] = os.path.join(base_dir, name)
        return dict(_runs)


def copy_run(src: str, dst) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
    return str(dst)


def damage(save_dir: str) -> str:
    """The run plus the two failures a 3 a.m. save_dir shows: step_12 corrupt (a byte flipped in a shard,
    same size) and step_15 incomplete (a save killed before its commit: no metadata.json)."""
    shutil.copytree(os.path.join(save_dir, "step_12"), os.path.join(save_dir, "step_15"))
    os.remove(os.path.join(save_dir, "step_15", "metadata.json"))
    flip_byte(os.path.join(save_dir, "step_12", SHARD))
    return save_dir
