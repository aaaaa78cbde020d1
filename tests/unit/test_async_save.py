"""Async saves: the caller waits only for the copy into staging buffers; the checkpoint holds the state
as of the call, errors surface at the next save/wait/close with the step named, one save in flight."""
import threading

import torch
from common import Tiny, full_state, make_training, train_steps
from helpers import assert_same

from dcp_resume import CheckpointManager, dcp_io


def _manager(path, **kw):
    return CheckpointManager(path, async_save=True, verbose=False, enable_preemption_handling=False, **kw)


def test_async_round_trip_and_later_mutation_does_not_leak(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 3)
    ref = full_state(model, opt)
    with _manager(tmp_path) as mgr:
        path = mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched, "step": 3}, step=3)
        train_steps(model, opt, sched, 2)  # mutate right after the save returned
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0)
    model2, opt2, sched2 = make_training(seed=9)
    got = _manager(tmp_path).load_checkpoint(path, state={"model": model2, "optimizer": opt2, "scheduler": sched2,
                                                          "step": None})
    assert_same(ref, full_state(model2, opt2))
    assert got["step"] == 3


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real_save = dcp_io.save

    def slow_first(store, payload, state_dir, group):
        if "step_1" in state_dir:
            started.set()
            assert release.wait(30)
        return real_save(store, payload, state_dir, group)

    monkeypatch.setattr(dcp_io, "save", slow_first)
    mgr = _manager(tmp_path)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    assert started.wait(30) and not (tmp_path / "step_1" / "metadata.json").exists()
    threading.Timer(0.5, release.set).start()
    mgr.save_checkpoint({"model": Tiny()}, step=2)  # must wait for step 1 to commit first
    assert (tmp_path / "step_1" / "metadata.json").exists()
    mgr.close()
    assert (tmp_path / "step_2" / "metadata.json").exists()


def test_staging_buffers_are_reused_not_regrown(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 1)
    mgr = _manager(tmp_path, keep_last_n=2)
    identities = []
    for step in range(1, 8):
        train_steps(model, opt, sched, 1)
        mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched}, step=step)
        identities.append({k: (id(b), b.data_ptr()) for k, b in mgr._staging.buffers.items()})
    mgr.close()
    assert len(identities[0]) == len(full_state(model, opt)["model"]) + len(full_state(model, opt)["optim"])
    assert all(ids == identities[0] for ids in identities[1:])
