"""A hung rank (SIGSTOP: alive, holding its sockets, never answering) ends the job in bounded time with the
step named, whatever the other ranks were waiting in: DDP's gradient all-reduce on the default group (whose
timeout is --collective_timeout_s too) or a save's collectives. The checkpoints already committed stay."""
import re
import signal

import pytest
from trainer_runs import BASE, launcher, signal_after

from dcp_resume import CheckpointManager

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals

TIMEOUT_S = 8


def _stop_rank1_after(save_dir, after: str, *extra) -> tuple[int, str, float]:
    """Run 2 ranks until stdout shows `after`, SIGSTOP rank 1; (exit status, output, seconds to exit)."""
    cmd = launcher(2) + BASE + ["--save_dir", save_dir, "--collective_timeout_s", TIMEOUT_S, *extra]
    return signal_after(list(map(str, cmd)), after=after, sig=signal.SIGSTOP, target="rank=1", timeout=240)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_rank_stopped_mid_training_ends_the_job_with_the_step_named(tmp_path, mode):
    save_dir = str(tmp_path / "run")
    extra = ["--no_async_save"] if mode == "sync" else []
    code, out, took = _stop_rank1_after(save_dir, f"Saved checkpoint: {save_dir}/step_3", *extra)
    assert code != 0, out[-3000:]
    # rank 0 was waiting in DDP's gradient all-reduce (async: or the save's collectives) for the stopped rank
    assert f"Another rank has died or hung (collectives wait at most collective_timeout_s={TIMEOUT_S}s)" in out
    assert "[rank0]: Traceback" not in out, out[-4000:]  # one sentence, not a traceback
    assert re.search(r"(step \d+|save of step \d+ to \S+) failed on rank 0", out), out[-4000:]
    assert took < 120, f"took {took:.0f} s to end after the rank stopped"
    mgr = CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False)
    assert mgr.find_latest_checkpoint() == f"{save_dir}/step_3"  # what was committed stays
