"""Disk guards. A full disk cannot be made here without root mounts, so the shortage is simulated in the
storage layer (free_bytes, or a write failing with ENOSPC); everything else is real files."""
import errno
import os

import pytest
from common import Tiny

from dcp_resume import CheckpointManager, CheckpointSaveError, storage


def _mgr(path, **kw):
    return CheckpointManager(path, verbose=False, enable_preemption_handling=False, **kw)


def test_low_space_skips_a_periodic_save_but_attempts_a_preemption_save(tmp_path, monkeypatch, caplog):
    mgr = _mgr(tmp_path)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)  # simulated: 1 kB left
    caplog.set_level("WARNING", logger="dcp_resume")
    assert mgr.save_checkpoint({"model": Tiny()}, step=2) is None
    assert "LOW DISK SPACE: skipping the step checkpoint" in caplog.text and "0.00 GB free in" in caplog.text
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["step_1"]  # nothing written
    assert mgr.save_checkpoint({"model": Tiny()}, step=3, kind="preemption") == str(tmp_path / "step_3")
    assert "Attempting the preemption checkpoint anyway" in caplog.text
    mgr.close()


def test_low_space_with_fail_policy_raises_naming_the_path(tmp_path, monkeypatch):
    mgr = _mgr(tmp_path, low_disk_policy="fail")
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointSaveError, match=r"not saving .*step_2: only 0.00 GB free in .*low_disk_policy='fail'"):
        mgr.save_checkpoint({"model": Tiny()}, step=2)
    assert not (tmp_path / "step_2").exists()
    with pytest.raises(ValueError, match="low_disk_policy='never' must be one of skip, fail"):
        _mgr(tmp_path, low_disk_policy="never")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_enospc_mid_write_removes_the_partial_directory_and_keeps_the_rest(tmp_path, monkeypatch, async_save):
    mgr = _mgr(tmp_path, async_save=async_save, keep_last_n=1)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    mgr.wait()
    before = {n: open(tmp_path / "step_1" / n, "rb").read() for n in ("metadata.json", "config.json")}
    real = storage.write_bytes_durably

    def full_disk(path, data):
        if "step_2" in path and path.endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, data)

    monkeypatch.setattr(storage, "write_bytes_durably", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"step 2 .*No space left on device"):
        mgr.save_checkpoint({"model": Tiny()}, step=2, extra_artifacts={"encoder": Tiny().state_dict()})
        mgr.wait()
    assert not (tmp_path / "step_2").exists()  # removed at once, not left for the next commit
    assert {n: open(tmp_path / "step_1" / n, "rb").read() for n in before} == before
    assert mgr.find_latest_checkpoint() == str(tmp_path / "step_1")
    mgr.close()
