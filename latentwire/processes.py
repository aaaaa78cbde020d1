"""Starting train.py runs and killing them for real: SIGKILL of the launcher and of every worker it started
(torchrun starts each worker in a session of its own, so killing its process group alone leaves them running)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), TRAIN]


def children(pid: int) -> list[int]:
    """Direct children of pid (torchrun's workers are its children)."""
    try:
        return sorted(p.pid for p in psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return []


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid. torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave the workers running."""
    try:
        return sorted(p.pid for p in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL pid, its process group and every descendant (workers in their own sessions included)."""
    victims = descendants(pid)
    for target in (lambda: os.killpg(pid, signal.SIGKILL), *[(lambda p=p: os.kill(p, signal.SIGKILL))
                                                               for p in [pid, *victims]]):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def run_until_killed(cmd: list[str], kill_after: str, env: dict | None = None, echo: bool = False) -> str:
    """Start cmd in its own process group; SIGKILL it and all its descendants (launcher and workers) once
    its output shows `kill_after`. Returns the output up to then; raises if the run ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if echo:
                print(line, end="")
            if kill_after in line:
                kill_tree(proc.pid)
                break
        else:
            raise RuntimeError(f"run ended before printing {kill_after!r}:\n{''.join(seen)[-4000:]}")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    return "".join(seen)
