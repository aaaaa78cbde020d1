"""Simulated nodes on one machine: each node is a torchrun launcher in namespaces of its own.

- `unshare -u` and `hostname hostN`: a host of its own (the name rank 0 records in the save_dir lock and names in
  errors). `--local_addr 127.0.0.1`, because a changed host name does not resolve: without it the rendezvous hangs.
- with `private`, also `unshare -m --propagation private` and a tmpfs mounted at that path: a node-local disk,
  which only this node sees, at the same path on every node.
The launchers meet at a c10d rendezvous on 127.0.0.1. c10d, not the launch order, decides which node holds global
rank 0, and a restart may place the ranks differently. torchrun starts each worker in a session of its own, so a
node is killed as a whole process tree (kill_tree)."""
import functools
import shlex
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ROOT, _free_port
from helpers import env
from trainer_runs import TRAIN, kill_tree


@functools.cache
def _refused() -> str | None:
    """Why namespaces (or a mount inside one) cannot be made here, or None; probed once."""
    with tempfile.TemporaryDirectory() as where:
        try:
            proc = subprocess.run(["unshare", "-m", "-u", "--propagation", "private", "bash", "-c",
                                   f"hostname probe-host && mount -t tmpfs tmpfs {shlex.quote(where)}"],
                                  capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            return "unshare (util-linux) is not installed"
    if proc.returncode != 0:
        return f"unshare -m -u with a tmpfs mount is not allowed here: {proc.stderr.strip() or proc.returncode}"
    return None


def need_namespaces() -> None:
    """Skip the calling test, with the reason, where simulated nodes cannot be made."""
    reason = _refused()
    if reason is not None:
        pytest.skip(f"simulated nodes need mount and UTS namespaces: {reason}")


def nodes(hosts: list[str], nproc: int, *args, private: str | None = None,
          listing: str | None = None) -> list[list[str]]:
    """One launcher command per host, meeting at a fresh rendezvous, each running latentwire/train.py with args.
    `private`: each node mounts its own tmpfs there first. `listing`: after torchrun exits, each node writes
    what it sees under `private` to `{listing}.{host}` (a path outside the private mount)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc_per_node",
                str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "nodes",
                "--local_addr", "127.0.0.1", TRAIN, *map(str, args)]
    out = []
    for host in hosts:
        script = f"hostname {host}"
        if private is not None:
            script += f" && mount -t tmpfs tmpfs {shlex.quote(private)}"
        if listing is None:
            script += f" && exec {shlex.join(launcher)}"
        else:
            script += (f" && {{ {shlex.join(launcher)}; rc=$?; (cd {shlex.quote(private)} && find . | sort) > "
                       f"{shlex.quote(f'{listing}.{host}')}; exit $rc; }}")
        namespaces = ["-u"] if private is None else ["-m", "-u", "--propagation", "private"]
        out.append(["unshare", *namespaces, "bash", "-c", script])
    return out


def run_nodes(logs_dir, commands: list[list[str]], kill_after: str | None = None, timeout: float = 300,
              extra_env: dict | None = None) -> tuple[list[int | None], list[str]]:
    """Run the nodes to the end, or SIGKILL every node's process tree once any output shows `kill_after` (as a
    node failure or a scheduler's hard kill). Returns each node's exit status (None: killed) and output."""
    logs = [logs_dir / f"node{n}.log" for n in range(len(commands))]
    procs = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                              env=env(**(extra_env or {})), start_new_session=True)
             for cmd, log in zip(commands, logs)]
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            texts = [log.read_text() for log in logs]
            if kill_after is not None and any(kill_after in t for t in texts):
                for p in procs:
                    kill_tree(p.pid)
                return [None] * len(procs), texts
            if all(p.poll() is not None for p in procs):
                assert kill_after is None, f"the nodes ended before printing {kill_after!r}:\n{texts}"
                return [p.returncode for p in procs], [log.read_text() for log in logs]
            time.sleep(0.05)
        raise AssertionError(f"the nodes did not finish in {timeout} s:\n" + "\n".join(t[-3000:] for t in texts))
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait()


HOLDER = """
import sys, time
from dcp_resume import savedir_lock
from dcp_resume.storage import open_storage
savedir_lock.acquire(open_storage(sys.argv[1]), sys.argv[1], lease_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(host: str, save_dir, lease_s: float) -> subprocess.Popen:
    """A live job on `host` holding save_dir's lock and renewing its lease, until the caller kills its tree."""
    script = f"hostname {host} && exec {shlex.join([sys.executable, '-c', HOLDER, str(save_dir), str(lease_s)])}"
    proc = subprocess.Popen(["unshare", "-u", "bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env(), start_new_session=True)
    line = proc.stdout.readline()
    if line != "held\n":
        kill_tree(proc.pid)
        raise AssertionError(f"the lock holder did not start: {line}{proc.stdout.read()}")
    return proc
