"""Helpers to run latentwire/train.py for real (python, torchrun, accelerate) and kill it with SIGKILL."""
import os
import subprocess
import sys
import time

import psutil

from conftest import ROOT, _free_port
from helpers import env

from latentwire.exactness import final_state  # noqa: F401  (re-exported: tests take trainer-run helpers from here)
from latentwire.processes import TRAIN, children, kill_tree, run_until_killed  # noqa: F401

BASE = ["--tiny", "--samples", "48", "--batch_size", "4", "--save_every", "3", "--epochs", "2"]


def launcher(nproc: int, kind: str = "torchrun") -> list[str]:
    if nproc == 1 and kind == "python":
        return [sys.executable, TRAIN]
    if kind == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), TRAIN]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), TRAIN]


def train(cmd: list[str], *args, timeout=300, extra_env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd + list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                          env=env(**(extra_env or {})), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd + list(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_until_killed(cmd: list[str], *args, kill_after: str, extra_env=None) -> str:
    """Run until stdout shows `kill_after`, then SIGKILL launcher and workers; returns the output so far."""
    return run_until_killed(cmd + list(map(str, args)), kill_after, env=env(**(extra_env or {})))


def train_and_signal(cmd: list[str], *args, after: str, sig: int, target: str, extra_env=None,
                     timeout=300) -> tuple[int, str]:
    """Run until stdout shows `after`, then send `sig` to `target`: 'launcher' (the process we started),
    'workers' (each of its children), 'rank0' (its first child), 'rank=N' (the worker whose RANK is N) or
    'group' (the whole process group, like Ctrl+C in a terminal). Returns (exit status of the launcher, full
    output)."""
    code, out, _ = signal_after(cmd, *args, after=after, sig=sig, target=target, extra_env=extra_env,
                                timeout=timeout)
    return code, out


def signal_after(cmd: list[str], *args, after: str, sig: int, target: str, extra_env=None,
                 timeout=300) -> tuple[int, str, float]:
    """train_and_signal, also returning the seconds from the signal to the launcher's exit."""
    proc = subprocess.Popen(cmd + list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(**(extra_env or {})), cwd=ROOT, start_new_session=True)
    seen, sent_at = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            if sent_at is None and after in line:
                sent_at = time.monotonic()
                if target == "group":
                    os.killpg(proc.pid, sig)
                elif target == "launcher":
                    proc.send_signal(sig)
                elif target.startswith("rank="):
                    os.kill(_worker_of_rank(proc.pid, int(target[5:])), sig)
                else:
                    kids = children(proc.pid) or [proc.pid]
                    for pid in (kids[:1] if target == "rank0" else kids):
                        os.kill(pid, sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)  # SIGKILL ends a stopped process too
            proc.wait()
    assert sent_at is not None, f"run ended before printing {after!r}:\n{''.join(seen)[-4000:]}"
    return proc.returncode, "".join(seen), time.monotonic() - sent_at


def _worker_of_rank(launcher_pid: int, rank: int) -> int:
    for pid in children(launcher_pid):
        try:
            if psutil.Process(pid).environ().get("RANK") == str(rank):
                return pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")
