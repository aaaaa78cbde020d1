"""Real signals: SIGTERM/SIGUSR1/SIGINT lead every rank to one agreed `preemption` checkpoint, exit 143,
and --auto_resume ends bit-identical to an uninterrupted run."""
import glob
import json
import signal

import pytest
from helpers import assert_same
from trainer_runs import BASE, final_state, launcher, train, train_and_signal

from dcp_resume import PREEMPTED_EXIT_CODE, CheckpointManager
from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


@pytest.fixture(scope="module")
def reference(reference_run):
    return final_state(reference_run(2, "torchrun"))[0]


def _last_step_per_rank(trace):
    return {path[-1]: max(int(line.split()[1]) for line in open(path)) for path in glob.glob(f"{trace}.rank*")}


def _preempted(save_dir, sig, target, trace):
    code, out = train_and_signal(launcher(2, "torchrun"), *BASE, "--save_dir", save_dir, sig=sig, target=target,
                                 after=f"Saved checkpoint: {save_dir}/step_3",
                                 extra_env={"LATENTWIRE_TRACE": trace})
    assert code != 0 and "Preempted at step" in out, out[-3000:]
    kinds = {p: json.load(open(f"{p}/metadata.json"))["kind"] for p in glob.glob(f"{save_dir}/step_*")}
    preemption = [p for p, kind in kinds.items() if kind == "preemption"]
    assert len(preemption) == 1, kinds
    mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
    state = mgr.load_checkpoint(preemption[0])
    step = mgr.loaded_metadata["step"]
    assert _last_step_per_rank(trace) == {"0": step, "1": step}  # both ranks stopped at the agreed step
    assert all("rng" in state["__per_rank__"][r] for r in ("rank0", "rank1")) and state["counters"]["global_step"] == step
    return out


@pytest.mark.parametrize("sig,target", [(signal.SIGTERM, "workers"), (signal.SIGTERM, "launcher"),
                                        (signal.SIGINT, "group")],
                         ids=["sigterm_every_worker", "sigterm_torchrun_only", "sigint_process_group"])
def test_signal_saves_agreed_checkpoint_and_resume_is_exact(tmp_path, reference, sig, target):
    save_dir = tmp_path / "run"
    out = _preempted(save_dir, sig, target, str(tmp_path / "trace"))
    if target == "workers":
        assert out.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") == 2, out[-3000:]
    train(launcher(2, "torchrun"), *BASE, "--save_dir", save_dir, "--auto_resume")
    resumed = final_state(save_dir)[0]
    for key in COMPARED:
        assert_same(reference[key], resumed[key], key)


def test_signal_to_one_rank_still_gives_one_agreed_checkpoint(tmp_path):
    _preempted(tmp_path / "run", signal.SIGUSR1, "rank0", str(tmp_path / "trace"))


def test_single_process_sigterm_exits_143_with_preemption_checkpoint(tmp_path):
    code, out = train_and_signal(launcher(1, "python"), *BASE, "--save_dir", tmp_path, sig=signal.SIGTERM,
                                 target="launcher", after=f"Saved checkpoint: {tmp_path}/step_3")
    assert code == PREEMPTED_EXIT_CODE, out[-2000:]
    state, meta = final_state(tmp_path)
    assert meta["kind"] == "preemption" and f"Preempted at step {meta['step']}: exiting with 143" in out


def test_signal_on_the_last_step_finishes_with_the_final_checkpoint(tmp_path):
    """A signal that lands on the run's last step: the final save serves (no clash at step_<last>)."""
    flags = ["--tiny", "--samples", "8", "--batch_size", "4", "--epochs", "1", "--save_every", "1"]
    code, out = train_and_signal(launcher(1, "python"), *flags, "--save_dir", tmp_path, sig=signal.SIGTERM,
                                 target="launcher", after=f"Saved checkpoint: {tmp_path}/step_1")
    assert code == 0 and "Training complete" in out, out[-2000:]
    assert final_state(tmp_path)[1]["kind"] == "final"
