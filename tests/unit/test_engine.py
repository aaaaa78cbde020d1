"""Single-process engine behaviour: exact round trips, the on-disk contract, retention, artifacts."""
import json
import os

import pytest
import torch
from common import Tiny, full_state, make_training, train_steps
from helpers import assert_same

from dcp_resume import CheckpointManager

PLAIN = {"step": 100, "lr": 0.25, "name": "run-a", "nested": {"a": [1, 2, 3], "b": {"c": "d"}}, "flags": [True, None]}


def _checkpoints(save_dir):
    """The save_dir's entries but the writer's lock file (held until the manager closes)."""
    return sorted(n for n in os.listdir(save_dir) if n != ".dcp-resume.lock")


def _trained(wrap=None):
    model, opt, sched = make_training(seed=0, wrap=wrap)
    train_steps(model, opt, sched, 3)
    return model, opt, sched


def test_plain_module_round_trip_is_bit_exact(tmp_path, checker):
    model, opt, sched = _trained()
    mgr = CheckpointManager(tmp_path, verbose=False)
    path = mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched, **PLAIN}, step=100, epoch=2,
                               metrics={"loss": 0.5}, best_metric=0.5)
    model2, opt2, sched2 = make_training(seed=1)
    got = mgr.load_checkpoint(state={"model": model2, "optimizer": opt2, "scheduler": sched2,
                                     "step": 0, "lr": 0.0, "name": "", "nested": {}, "flags": []})
    assert_same(full_state(model, opt), full_state(model2, opt2))
    assert sched2.state_dict() == sched.state_dict()
    assert {k: got[k] for k in PLAIN} == PLAIN
    # Training continues identically from both.
    train_steps(model, opt, sched, 2, seed=5)
    train_steps(model2, opt2, sched2, 2, seed=5)
    assert_same(full_state(model, opt), full_state(model2, opt2))

    meta = json.load(open(os.path.join(path, "metadata.json")))
    for key in ("format_version", "step", "epoch", "timestamp", "world_size", "kind", "is_best", "metrics",
                "best_metric", "files"):
        assert key in meta
    assert (meta["step"], meta["epoch"], meta["kind"], meta["world_size"]) == (100, 2, "step", 1)
    assert meta["metrics"] == {"loss": 0.5} and meta["best_metric"] == 0.5
    assert meta["timestamp"].endswith("+00:00")
    assert set(meta["files"]) == {"config.json", "training_stats.json", "state/.metadata", "state/__0_0.distcp"}
    assert all(os.path.getsize(os.path.join(path, f)) == v["size"] for f, v in meta["files"].items())
    assert mgr.loaded_metadata["step"] == 100
    out = checker(tmp_path)
    assert out.returncode == 0 and "step_100: complete step=100 kind=step" in out.stdout, out.stdout


def test_load_without_state_returns_whole_dict(tmp_path):
    model, opt, sched = _trained()
    mgr = CheckpointManager(tmp_path, verbose=False)
    mgr.save_checkpoint({"model": model.state_dict(), **PLAIN}, step=100)  # the seed guide's form
    loaded = CheckpointManager(tmp_path, verbose=False).load_checkpoint()
    assert_same(dict(model.state_dict()), loaded["model"])
    assert {k: loaded[k] for k in PLAIN} == PLAIN
    # A dict of tensors given as state is loaded in place, as with plain DCP.
    fresh = Tiny()
    mgr.load_checkpoint(state={"model": fresh.state_dict()})
    assert_same(dict(model.state_dict()), dict(fresh.state_dict()))


@pytest.mark.parametrize("wrapper", ["compile", "accelerate"])
def test_wrapped_models_save_plain_keys_and_cross_load(tmp_path, wrapper):
    if wrapper == "compile":
        model, opt, sched = _trained(wrap=lambda m: torch.compile(m, backend="eager"))
    else:
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        model, opt, sched = acc.prepare(*make_training(seed=0))
        train_steps(model, opt, sched, 3)
    mgr = CheckpointManager(tmp_path, verbose=False)
    mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched}, step=3)
    keys = set(mgr.load_checkpoint()["model"])
    assert keys == set(Tiny().state_dict()), keys  # no module. / _orig_mod. prefixes
    plain, popt, psched = make_training(seed=1)
    mgr.load_checkpoint(state={"model": plain, "optimizer": popt, "scheduler": psched})
    assert_same(full_state(model, opt), full_state(plain, popt))


def test_retention_keeps_last_n_plus_best(tmp_path):
    model = Tiny()
    mgr = CheckpointManager(tmp_path, keep_last_n=2, verbose=False)
    for step in range(1, 6):
        mgr.save_checkpoint({"model": model}, step=step, is_best=(step == 2))
    assert _checkpoints(tmp_path) == ["step_2", "step_4", "step_5"]
    mgr.save_checkpoint({"model": model}, step=6, epoch=1, kind="epoch", is_best=True)
    assert _checkpoints(tmp_path) == ["epoch1", "step_5"]
    assert mgr.find_latest_checkpoint() == os.path.join(str(tmp_path), "epoch1")


def test_latest_is_highest_complete_step_and_ignores_damaged(tmp_path):
    model = Tiny()
    mgr = CheckpointManager(tmp_path, keep_last_n=None, verbose=False, incremental=False)  # own shards each
    for step in (10, 20, 30):
        mgr.save_checkpoint({"model": model}, step=step)
    os.remove(tmp_path / "step_30" / "metadata.json")
    shard = tmp_path / "step_20" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated: the recorded size no longer matches
    (tmp_path / "step_99").mkdir()  # a stray directory without metadata.json
    assert mgr.find_latest_checkpoint() == str(tmp_path / "step_10")


def test_extra_artifacts_written_and_listed(tmp_path):
    from safetensors.torch import load_file

    model = Tiny()
    arts = {"encoder": {k: v for k, v in model.state_dict().items() if k.startswith("inp.")},
            "eval": {"acc": 0.75}, "notes.txt": "hello", "blob.bin": b"\x00\x01"}
    path = CheckpointManager(tmp_path, verbose=False).save_checkpoint({"model": model}, step=1, extra_artifacts=arts)
    assert_same(arts["encoder"], load_file(os.path.join(path, "encoder.safetensors")))
    assert json.load(open(os.path.join(path, "eval.json"))) == {"acc": 0.75}
    assert open(os.path.join(path, "notes.txt")).read() == "hello"
    assert open(os.path.join(path, "blob.bin"), "rb").read() == b"\x00\x01"
    files = json.load(open(os.path.join(path, "metadata.json")))["files"]
    assert {"encoder.safetensors", "eval.json", "notes.txt", "blob.bin"} <= set(files)


def test_should_save_and_epoch_directories(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval=100, verbose=False)
    assert [s for s in (0, 50, 100, 150, 200) if mgr.should_save(s)] == [100, 200]
    assert mgr.should_save(7, force=True)
    assert not CheckpointManager(tmp_path, save_interval=0, verbose=False).should_save(100)
    path = mgr.save_checkpoint({"model": Tiny()}, step=500, epoch=5, kind="epoch")
    assert path == os.path.join(str(tmp_path), "epoch5")


def test_context_manager_and_wait(tmp_path):
    with CheckpointManager(tmp_path, verbose=False) as mgr:
        mgr.save_checkpoint({"model": Tiny()}, step=1)
        mgr.wait()
    assert os.path.exists(tmp_path / "step_1" / "metadata.json")


def test_saved_checkpoint_log_line(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="dcp_resume")
    CheckpointManager(tmp_path).save_checkpoint({"model": Tiny()}, step=1)
    assert f"Saved checkpoint: {tmp_path / 'step_1'} (" in caplog.text and " MB, " in caplog.text
    caplog.clear()
    CheckpointManager(tmp_path / "q", verbose=False).save_checkpoint({"model": Tiny()}, step=1)
    assert "Saved checkpoint" not in caplog.text
