"""Disk guards on real small filesystems (a tmpfs and a loop-mounted ext4 image, each mounted for the test;
skipped with the reason where mounting is not allowed): a periodic save skipped when space is short, and a
save that runs out of space mid-write failing with ENOSPC named, its partial directory removed, every older
checkpoint byte-identical, the next save working once space is back."""
import hashlib
import os

import pytest
import torch
from filesystems import KINDS, fill, mounted

from dcp_resume import CheckpointManager, CheckpointSaveError

MB = 1 << 20


class Mlp(torch.nn.Module):
    """About 1 MB of weights: big enough to fill a small filesystem, small enough to be quick."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(512, 512)

    def forward(self, x):
        return self.fc(x)


def _mgr(path, **kw):
    return CheckpointManager(path, verbose=False, enable_preemption_handling=False, **kw)


def _digests(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _with_adam(model):
    """model + Adam state: about three times the model's bytes, so the size estimate (the last checkpoint
    plus 10%) is too low and the disk really runs out mid-write."""
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


@pytest.mark.parametrize("kind", KINDS)
def test_low_space_skips_a_periodic_save_and_the_fail_policy_raises(tmp_path, kind, caplog):
    with mounted(kind, tmp_path, 12) as mnt:
        save_dir = os.path.join(mnt, "run")
        mgr = _mgr(save_dir)
        mgr.save_checkpoint({"model": Mlp()}, step=1)
        fill(mnt, leave_bytes=MB // 2)  # less than the last checkpoint needs
        caplog.set_level("WARNING", logger="dcp_resume")
        assert mgr.save_checkpoint({"model": Mlp()}, step=2) is None
        assert "LOW DISK SPACE: skipping the step checkpoint" in caplog.text and " GB free in " in caplog.text
        assert sorted(n for n in os.listdir(save_dir) if not n.startswith(".")) == ["step_1"]  # nothing written
        strict = _mgr(save_dir, low_disk_policy="fail")
        with pytest.raises(CheckpointSaveError, match=r"not saving .*step_3: only 0.00 GB free in .*"
                                                      r"low_disk_policy='fail'"):
            strict.save_checkpoint({"model": Mlp()}, step=3)
        assert not os.path.exists(os.path.join(save_dir, "step_3"))
        mgr.close()
        strict.close()
    with pytest.raises(ValueError, match="low_disk_policy='never' must be one of skip, fail"):
        _mgr(tmp_path, low_disk_policy="never")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_disk_full_mid_write_names_enospc_and_loses_nothing(tmp_path, kind, async_save):
    with mounted(kind, tmp_path, 12) as mnt:
        save_dir = os.path.join(mnt, "run")
        mgr = _mgr(save_dir, async_save=async_save, keep_last_n=1)
        mgr.save_checkpoint({"model": Mlp()}, step=1)
        mgr.wait()
        before = _digests(os.path.join(save_dir, "step_1"))
        fill(mnt, leave_bytes=int(1.5 * MB))  # above the estimate (1.1x step_1), below what step_2 needs
        with pytest.raises(CheckpointSaveError, match=r"save of step 2 to .*step_2 failed.*no space left on "
                                                      r"device \(ENOSPC\) in .*the previous checkpoint stays"):
            mgr.save_checkpoint(_with_adam(Mlp()), step=2)
            mgr.wait()
        assert not os.path.exists(os.path.join(save_dir, "step_2"))  # removed at once: its space is back
        assert _digests(os.path.join(save_dir, "step_1")) == before
        assert mgr.find_latest_checkpoint() == os.path.join(save_dir, "step_1")
        os.remove(os.path.join(mnt, "filler"))
        assert mgr.save_checkpoint(_with_adam(Mlp()), step=3) == os.path.join(save_dir, "step_3")
        mgr.close()
        assert mgr.find_latest_checkpoint() == os.path.join(save_dir, "step_3")
