"""The trainer under accelerate launch, and resumes that change the batch size or the world size:
the epoch goes on from the same sample position, every sample seen exactly once."""
import glob
import re
from collections import Counter

import pytest
from trainer_runs import final_state, launcher, train, train_until_killed

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals

SHORT = ["--tiny", "--samples", "48", "--save_every", "3", "--epochs", "1"]


def test_accelerate_launch_saves_resumes_and_extends_epochs(tmp_path):
    cmd = launcher(2, "accelerate")
    first = train(cmd, *SHORT, "--batch_size", "4", "--save_dir", tmp_path).stdout
    assert f"Saved checkpoint: {tmp_path}/step_3" in first and f"Saved checkpoint: {tmp_path}/step_6" in first
    state, meta = final_state(tmp_path)
    assert (meta["kind"], meta["step"], meta["world_size"]) == ("final", 6, 2)

    more = train(cmd, *SHORT[:-1], "2", "--batch_size", "4", "--save_dir", tmp_path, "--auto_resume").stdout
    assert f"Resuming from checkpoint: {tmp_path}/step_6 (step 6, epoch 1)" in more
    state, meta = final_state(tmp_path)
    assert (meta["kind"], meta["step"], meta["epoch"]) == ("final", 12, 2)
    assert state["counters"]["global_step"] == 12 and state["counters"]["samples_seen"] == 96


def _seen(trace_prefix, up_to_step=None, after_step=None):
    """Sample ids per (epoch) from the per-rank trace files, restricted to a range of steps."""
    ids = Counter()
    for path in glob.glob(f"{trace_prefix}.rank*"):
        for line in open(path):
            epoch, step, _, batch = line.split()
            if epoch == "0" and (up_to_step is None or int(step) <= up_to_step) \
                    and (after_step is None or int(step) > after_step):
                ids.update(int(i) for i in batch.split(","))
    return ids


@pytest.mark.parametrize("first,second", [
    ((1, "python", 4), (1, "python", 6)),      # the guide's OOM scenario: resume with another batch size
    ((2, "torchrun", 4), (1, "python", 4)),    # world size 2 -> 1
], ids=["batch_4_to_6", "world_2_to_1"])
def test_resume_with_other_batch_or_world_size_sees_every_sample_once(tmp_path, first, second):
    (n1, kind1, b1), (n2, kind2, b2) = first, second
    save_dir, t1, t2 = tmp_path / "run", str(tmp_path / "t1"), str(tmp_path / "t2")
    train_until_killed(launcher(n1, kind1), *SHORT, "--batch_size", b1, "--save_dir", save_dir,
                       kill_after=f"Saved checkpoint: {save_dir}/step_3", extra_env={"LATENTWIRE_TRACE": t1})
    out = train(launcher(n2, kind2), *SHORT, "--batch_size", b2, "--save_dir", save_dir, "--auto_resume",
                extra_env={"LATENTWIRE_TRACE": t2}).stdout
    resumed = int(re.search(r"Resuming from checkpoint: \S+ \(step (\d+), epoch 0\)", out).group(1))
    assert resumed == 3
    assert f"Batch size {b1}x{n1} ranks -> {b2}x{n2} ranks: continuing epoch 0 at sample {3 * b1 * n1} of 48; " \
           "no sample is repeated or skipped" in out
    before, after = _seen(t1, up_to_step=resumed), _seen(t2, after_step=resumed)
    assert sum(before.values()) == 3 * b1 * n1
    assert before + after == Counter(range(48)), "a sample was repeated or skipped"
    state, meta = final_state(save_dir)
    assert meta["kind"] == "final" and state["counters"]["samples_seen"] == 48
