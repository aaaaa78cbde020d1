"""launch/: run_with_resume.sh restarts a killed trainer and stops on a forwarded preemption signal; slurm.sbatch
passes USR1 to its srun step and requeues exactly on exit 143; torchrun.sh builds a c10d command; the accelerate
CPU config starts two processes; every script answers --help with an example."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from conftest import ROOT, _free_port
from helpers import assert_same, env
from trainer_runs import BASE, children, final_state, train, train_and_signal

from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: the launch wrappers and SLURM scripts around real trainer runs

LAUNCH = os.path.join(ROOT, "launch")
WRAPPER = os.path.join(LAUNCH, "run_with_resume.sh")
SBATCH = os.path.join(LAUNCH, "slurm.sbatch")
TORCHRUN = os.path.join(LAUNCH, "torchrun.sh")
TRAIN_PY = os.path.join(ROOT, "latentwire", "train.py")


@pytest.fixture(scope="module")
def reference(reference_run):
    return final_state(reference_run(1, "python"))[0]


def _same_as(reference, save_dir):
    resumed = final_state(save_dir)[0]
    for key in COMPARED:
        assert_same(reference[key], resumed[key], key)


def _write(path, text, mode=0o755):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(mode)
    return str(path)


def _wait_for(path, proc, timeout=60):
    """Poll until `path` exists (a stand-in says it is running); fail if the process ended first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"exited {proc.returncode} before {path} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# -- run_with_resume.sh ----------------------------------------------------------------------------------

def _training_child(wrapper_pid):
    """The python process the wrapper runs (its other child is the tee that writes the log)."""
    for pid in children(wrapper_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"train.py" in f.read():
                return pid
    raise AssertionError(f"no train.py child under {wrapper_pid}")


def test_wrapper_restarts_a_kill_9_with_auto_resume_and_ends_exact(tmp_path, reference):
    # Started from another directory with a relative --save-dir: paths are the caller's, the repo is found
    # from the script's location.
    proc = subprocess.Popen(["bash", WRAPPER, "train", "--save-dir", "run", "--max-restarts", "2", *BASE],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=env(PYTHON=sys.executable), start_new_session=True)
    seen, killed = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            if killed is None and "Saved checkpoint: run/step_3" in line:
                killed = _training_child(proc.pid)
                os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(seen)
    assert killed and proc.returncode == 0, out[-4000:]
    log = (tmp_path / "run" / "logs" / "run_with_resume.log").read_text()
    assert "program exited with 137 (killed by SIGKILL); restart 1 of 2 with --auto_resume" in log
    assert "restart 2 of 2" not in log and "finished (exit 0)" in log
    attempt2 = next(line for line in log.splitlines() if "attempt 2 of at most 3:" in line)
    assert f"{TRAIN_PY} --save_dir run --auto_resume --tiny" in attempt2
    assert "Resuming from checkpoint: run/step_" in log
    _same_as(reference, tmp_path / "run")


@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "launcher"), (signal.SIGINT, "group")],
                         ids=["sigterm_to_wrapper", "ctrl_c_to_process_group"])
def test_signal_to_wrapper_preempts_child_without_restart_then_resume_is_exact(tmp_path, reference, sig, target):
    """SIGTERM to the wrapper alone is forwarded; Ctrl+C (SIGINT to the terminal's process group) reaches the
    program once, through the wrapper (a second SIGINT would make the trainer exit 130 without saving)."""
    save_dir = tmp_path / "run"
    cmd = ["bash", WRAPPER, "train", "--save-dir", str(save_dir), "--max-restarts", "2"]
    code, out = train_and_signal(cmd, *BASE, after=f"Saved checkpoint: {save_dir}/step_3", sig=sig,
                                 target=target, extra_env={"PYTHON": sys.executable})
    name = signal.Signals(sig).name
    assert code == 143, out[-3000:]
    assert f"received {name}: forwarding it to the program" in out and "Preempted at step" in out
    assert f"program exited with 143 (preempted, or killed by SIGTERM) after {name}: exiting with it, " \
           "not restarting" in out
    log = (save_dir / "logs" / "run_with_resume.log").read_text()
    assert "attempt 2" not in log and "restart 1" not in log
    assert final_state(save_dir)[1]["kind"] == "preemption"
    if sig != signal.SIGTERM:
        return

    # What the requeued job does: --resume continues from the preemption checkpoint.
    again = subprocess.run(cmd + ["--resume", *BASE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=env(PYTHON=sys.executable))
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"Resuming from checkpoint: {save_dir}/step_" in again.stdout
    assert log in (save_dir / "logs" / "run_with_resume.log").read_text()  # appended, not overwritten
    _same_as(reference, save_dir)


def test_max_restarts_is_honoured_and_first_attempt_only_flags_are_dropped(tmp_path):
    """A stand-in python that always fails (exit 2, like a bad --dataset) and records each command line."""
    calls = tmp_path / "calls"
    fake = _write(tmp_path / "python", f"""
        #!/usr/bin/env bash
        echo "$*" >> {calls}
        echo "error: --dataset '/nonexistent': no such file" >&2
        exit 2
        """)
    proc = subprocess.run(["bash", WRAPPER, "train", "--save-dir", str(tmp_path / "run"), "--max-restarts", "2",
                           "--dataset", "/nonexistent", "--resume_from", "old/step_9", "--no_load_optimizer"],
                          capture_output=True, text=True, timeout=60, env=env(PYTHON=fake))
    assert proc.returncode == 2, proc.stdout
    runs = calls.read_text().splitlines()
    assert len(runs) == 3  # the first attempt and exactly 2 restarts
    assert runs[0] == f"{TRAIN_PY} --save_dir {tmp_path}/run --dataset /nonexistent --resume_from old/step_9 " \
                      "--no_load_optimizer"
    assert runs[1] == runs[2] == f"{TRAIN_PY} --save_dir {tmp_path}/run --auto_resume --dataset /nonexistent"
    assert "restart 1 of 2" in proc.stdout and "restart 2 of 2" in proc.stdout and "restart 3" not in proc.stdout
    assert "giving up: the program exited with 2 and all 2 restarts are used up" in proc.stdout
    assert proc.stdout.count("error: --dataset") == 3  # the program's stderr went through the log too
    assert (tmp_path / "run" / "logs" / "run_with_resume.log").read_text() == proc.stdout


@pytest.mark.parametrize("planted", ["log -> outside file", "logs -> outside dir", "log FIFO"])
def test_wrapper_never_appends_through_a_planted_link_or_into_a_fifo(tmp_path, planted):
    """The wrapper's log is a side file in save_dir like train.log: one line, exit 2, nothing run or written."""
    logs, outside = tmp_path / "run" / "logs", tmp_path / "outside"
    outside.mkdir()
    (outside / "run_with_resume.log").write_text("someone else's\n")
    logs.parent.mkdir()
    if planted == "logs -> outside dir":
        logs.symlink_to(outside)
        what = f"{logs} is a symlink to {outside}; the log is written only inside the save_dir: remove it"
    else:
        logs.mkdir()
        if planted == "log FIFO":
            os.mkfifo(logs / "run_with_resume.log")
            what = f"{logs}/run_with_resume.log is not a regular file (a FIFO, device or directory): remove it"
        else:
            (logs / "run_with_resume.log").symlink_to(outside / "run_with_resume.log")
            what = (f"{logs}/run_with_resume.log is a symlink to {outside}/run_with_resume.log; the log is written "
                    "only inside the save_dir: remove it")
    calls = tmp_path / "calls"
    fake = _write(tmp_path / "python", f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
    proc = subprocess.run(["bash", WRAPPER, "train", "--save-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=60, env=env(PYTHON=fake))
    assert proc.returncode == 2 and proc.stderr.splitlines()[0] == f"run_with_resume: error: {what}", proc.stderr
    assert not calls.exists()  # the program never started
    assert os.listdir(outside) == ["run_with_resume.log"]
    assert (outside / "run_with_resume.log").read_text() == "someone else's\n"


def test_leftovers_of_a_killed_attempt_are_killed_before_the_restart(tmp_path):
    """Workers of a torchrun that got kill -9 live on in their own sessions; the wrapper finds them by the tag
    it puts in each attempt's environment. Stand-in python: the first attempt leaves such a process behind
    and dies by SIGKILL, the second records whether that process is still alive and exits 0."""
    orphan = tmp_path / "orphan.pid"
    fake = _write(tmp_path / "python", f"""
        #!/usr/bin/env bash
        if [ ! -f {orphan} ]; then
          setsid sleep 300 < /dev/null > /dev/null 2>&1 &
          echo $! > {orphan}
          kill -9 $$
        fi
        state=$(sed 's/.*) //' /proc/$(cat {orphan})/stat 2>/dev/null | cut -c1)
        echo "orphan state at restart: ${{state:-gone}}"
        """)
    proc = subprocess.run(["bash", WRAPPER, "train", "--save-dir", str(tmp_path / "run"), "--max-restarts", "1"],
                          capture_output=True, text=True, timeout=60, env=env(PYTHON=fake))
    pid = orphan.read_text().strip()
    assert proc.returncode == 0, proc.stdout
    assert f"killing leftover processes of the last attempt: {pid}" in proc.stdout
    assert "orphan state at restart: gone" in proc.stdout or "orphan state at restart: Z" in proc.stdout


# -- slurm.sbatch with stand-ins for srun and scontrol ----------------------------------------------------

@pytest.fixture
def slurm(tmp_path):
    """Runs `bash launch/slurm.sbatch` as SLURM would run the batch step of job 4242 (sbatch itself is not
    installed here). On PATH: a stand-in `srun` that records its argv, env and the signals it receives,
    then runs its command as task 0 of 1 (setting SLURM_PROCID/SLURM_LOCALID) and forwards USR1/TERM/INT
    to it; a stand-in `scontrol` that records its argv and answers `show hostnames` with the node list.
    PYTHON points at a stand-in task that records argv, env and signals and then does what STANDIN_TASK
    says: `exit:N`, or `until_signal` (wait for USR1 or TERM, exit 143 like a preempted trainer)."""
    rec, bindir = tmp_path / "rec", tmp_path / "bin"
    rec.mkdir()
    bindir.mkdir()
    common = f"""
        #!{sys.executable}
        import json, os, signal, subprocess, sys, time
        REC = {str(rec)!r}
        def record(name, line):
            with open(os.path.join(REC, name), "a") as f:
                f.write(line + "\\n")
        """
    _write(bindir / "srun", common + """
        record("srun.json", json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))
        argv = sys.argv[1:]
        while argv and argv[0].startswith("-"):  # srun options (the script uses --opt=value forms)
            argv.pop(0)
        task = subprocess.Popen(argv, env={**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
        def forward(sig, frame):
            record("srun.signals", signal.Signals(sig).name)
            task.send_signal(sig)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        code = task.wait()
        sys.exit(code if code >= 0 else 128 - code)
        """)
    _write(bindir / "scontrol", """
        #!/usr/bin/env bash
        echo "$*" >> "%s/scontrol.calls"
        [ "$1 $2" = "show hostnames" ] && tr , '\\n' <<< "$3"
        exit 0
        """ % rec)
    fake_task = _write(tmp_path / "task", common + """
        record("task.json", json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))
        mode = os.environ["STANDIN_TASK"]
        if mode.startswith("exit:"):
            sys.exit(int(mode[5:]))
        got = []
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda sig, frame: got.append(signal.Signals(sig).name))
        open(os.path.join(REC, "task.ready"), "w").close()
        deadline = time.monotonic() + 120  # a safety net, not a measurement
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        for name in got:
            record("task.signals", name)
        sys.exit(143 if got else 99)
        """)

    started = []

    def start(*args, task="exit:0", **extra):
        e = env(**{"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1",
                   "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_SUBMIT_DIR": ROOT,
                   "SAVE_DIR": str(tmp_path / "run"), "PYTHON": fake_task, "STANDIN_TASK": task, **extra})
        started.append(subprocess.Popen(["bash", SBATCH, *map(str, args)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=e, cwd=tmp_path,
                                        start_new_session=True))
        return started[-1]

    def read(name):
        path = rec / name
        return path.read_text().splitlines() if path.exists() else []

    start.read, start.rec, start.save_dir = read, rec, tmp_path / "run"
    yield start
    for proc in started:  # a failed test must not leave the batch script, srun or the task running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_sbatch_forwards_the_signal_to_srun_and_requeues_on_143(slurm, sig):
    proc = slurm("--epochs", 3, task="until_signal")
    _wait_for(slurm.rec / "task.ready", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    name = signal.Signals(sig).name
    assert slurm.read("srun.signals") == [name] and slurm.read("task.signals") == [name], out
    assert proc.returncode == 0 and slurm.read("scontrol.calls").count("requeue 4242") == 1, out
    assert f"step exited 143 (preempted after {name}, checkpoint saved): requeueing job 4242" in out


def test_sbatch_runs_train_py_with_auto_resume_and_slurm_ranks(slurm):
    proc = slurm("--epochs", 3, "--save_every", 50)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    srun = json.loads(slurm.read("srun.json")[0])
    assert TRAIN_PY in srun["argv"] and "--auto_resume" in srun["argv"]
    task = json.loads(slurm.read("task.json")[0])
    assert task["argv"] == [TRAIN_PY, "--auto_resume", "--save_dir", str(slurm.save_dir),
                            "--epochs", "3", "--save_every", "50"]
    assert {k: task["env"][k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "24242"}
    assert "show hostnames node1" in slurm.read("scontrol.calls")


@pytest.mark.parametrize("code,requeued,script_exit", [(143, True, 0), (0, False, 0), (1, False, 1)])
def test_sbatch_requeues_exactly_when_the_step_exits_143(slurm, code, requeued, script_exit):
    proc = slurm(task=f"exit:{code}")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == script_exit, out
    calls = [c for c in slurm.read("scontrol.calls") if c.startswith("requeue")]
    assert calls == (["requeue 4242"] if requeued else []), out
    assert not slurm.read("srun.signals")


def test_sbatch_with_the_real_trainer_saves_requeues_and_resumes_exactly(slurm, reference):
    """USR1 at the end of the time limit: the trainer commits a preemption checkpoint and exits 143, the
    job asks for a requeue; the requeued job (same script again) resumes and finishes bit-identical."""
    port = str(_free_port())
    real = dict(PYTHON=sys.executable, SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
    proc = slurm(*BASE, **real)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"Saved checkpoint: {slurm.save_dir}/step_3" in line:
            proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=300)
    out = "".join(seen)
    assert proc.returncode == 0 and "Preempted at step" in out, out[-3000:]
    assert slurm.read("scontrol.calls").count("requeue 4242") == 1
    assert final_state(slurm.save_dir)[1]["kind"] == "preemption"

    proc = slurm(*BASE, SLURM_RESTART_COUNT="1", **real)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"Resuming from checkpoint: {slurm.save_dir}/step_" in out, out[-3000:]
    assert slurm.read("scontrol.calls").count("requeue 4242") == 1  # no second requeue
    _same_as(reference, slurm.save_dir)


# -- torchrun.sh, accelerate configs, --help ---------------------------------------------------------------

def test_torchrun_dry_run_prints_a_c10d_command(tmp_path):
    def dry(*args, **extra):
        proc = subprocess.run(["bash", TORCHRUN, "--dry-run", *args], capture_output=True, text=True,
                              timeout=30, cwd=tmp_path, env=env(**extra))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    cmd = dry("--save_dir", "runs/x", CUDA_VISIBLE_DEVICES="0,1")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[3:15] == ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                         "localhost:29500", "--rdzv_id", "latentwire", "--max_restarts", "0"]
    assert cmd[15:] == [TRAIN_PY, "--save_dir", "runs/x"]
    cmd = dry("--nproc-per-node", "4", "--auto_resume", NNODES="2", NPROC_PER_NODE="8", RDZV_ENDPOINT="head:29400",
              SLURM_JOB_ID="77", MAX_RESTARTS="3")
    assert cmd[3:15] == ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                         "head:29400", "--rdzv_id", "77", "--max_restarts", "3"]
    assert not os.path.exists(tmp_path / "runs")  # nothing ran


def test_wrapper_dry_run_uses_torchrun_for_several_processes():
    proc = subprocess.run(["bash", WRAPPER, "main", "--dry-run", "--nproc", "2", "--resume", "--save-dir", "r",
                           "--compression-type", "telepathy"], capture_output=True, text=True, timeout=30,
                          env=env(PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                       os.path.join(ROOT, "latentwire", "main_experiment.py"), "--save-dir", "r",
                                       "--resume", "--compression-type", "telepathy"]


@pytest.mark.parametrize("script", ["run_with_resume.sh", "torchrun.sh", "slurm.sbatch"])
def test_every_script_answers_help_with_an_example(script, tmp_path):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), "--help"], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "Example" in proc.stdout.split("\n\n")[1]
    assert any(f"launch/{script}" in line for line in lines)
    assert not os.listdir(tmp_path)


def test_accelerate_configs():
    cpu = yaml.safe_load(open(os.path.join(LAUNCH, "accelerate_cpu.yaml")))
    gpu = yaml.safe_load(open(os.path.join(LAUNCH, "accelerate_multi_gpu.yaml")))
    assert (cpu["num_processes"], cpu["use_cpu"], cpu["mixed_precision"], cpu["compute_environment"]) == \
        (2, True, "no", "LOCAL_MACHINE")
    assert (gpu["distributed_type"], gpu["num_processes"], gpu["mixed_precision"], gpu["gpu_ids"]) == \
        ("MULTI_GPU", 2, "bf16", "all")


def test_accelerate_cpu_config_starts_two_processes(tmp_path):
    proc = train([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  os.path.join(LAUNCH, "accelerate_cpu.yaml"), "--main_process_port", str(_free_port()), TRAIN_PY],
                 "--tiny", "--samples", "16", "--epochs", "1", "--batch_size", "4", "--save_dir", tmp_path)
    meta = final_state(tmp_path)[1]
    assert (meta["world_size"], meta["step"]) == (2, 2), proc.stdout[-2000:]
