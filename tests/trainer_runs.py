"""Helpers to run latentwire/train.py for real (python, torchrun, accelerate) and kill it with SIGKILL."""
import os
import signal
import subprocess
import sys

from conftest import ROOT, _free_port

from dcp_resume import CheckpointManager

TRAIN = os.path.join(ROOT, "latentwire", "train.py")
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


def env(**extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def train(cmd: list[str], *args, timeout=300, extra_env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd + list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                          env=env(**(extra_env or {})), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd + list(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_until_killed(cmd: list[str], *args, kill_after: str, timeout=300, extra_env=None) -> str:
    """Start a run in its own process group and SIGKILL the whole group (launcher and workers) as soon
    as stdout shows `kill_after` (e.g. 'Saved checkpoint: .../step_6'). Returns the output so far."""
    proc = subprocess.Popen(cmd + list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(**(extra_env or {})), cwd=ROOT, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if kill_after in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError(f"run ended before printing {kill_after!r}:\n{''.join(seen)[-4000:]}")
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return "".join(seen)


def final_state(save_dir) -> dict:
    """Everything in the latest checkpoint, read back from its state/ (single process)."""
    mgr = CheckpointManager(save_dir, verbose=False)
    return mgr.load_checkpoint(), mgr.loaded_metadata
