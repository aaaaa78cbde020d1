"""Every bad input gets one clear sentence naming the path or flag, and nothing on disk is lost."""
import json
import os

import pytest
import torch
from common import Tiny, make_training

from dcp_resume import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)


def _listing(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def saved(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", verbose=False)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    return mgr


def test_no_checkpoint_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"^No checkpoint found to resume in .*empty: looked for complete "
                                                      r"step_\*/epoch\* directories"):
        CheckpointManager(tmp_path / "empty", verbose=False).load_checkpoint()
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)
    assert CheckpointManager(tmp_path / "empty", verbose=False).find_latest_checkpoint() is None


def test_missing_path_is_named(saved, tmp_path):
    missing = str(tmp_path / "run" / "step_7")
    with pytest.raises(CheckpointNotFoundError, match=f"^Checkpoint path does not exist: {missing}$"):
        saved.load_checkpoint(missing)


def test_state_file_not_found(saved, tmp_path):
    bad = tmp_path / "run" / "step_2"
    (bad / "state").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match=r"^State file not found: .*step_2/state is missing or empty"):
        saved.load_checkpoint(str(bad))


def test_incomplete_and_save_dir_paths(saved, tmp_path):
    run = tmp_path / "run"
    os.rename(run / "step_1" / "metadata.json", run / "step_1" / "metadata.bak")
    with pytest.raises(IncompleteCheckpointError, match=r"step_1 is not a complete checkpoint \(no metadata.json"):
        saved.load_checkpoint(str(run / "step_1"))
    os.rename(run / "step_1" / "metadata.bak", run / "step_1" / "metadata.json")
    with pytest.raises(CheckpointNotFoundError, match=r"is a save_dir, not a checkpoint.*--auto_resume"):
        saved.load_checkpoint(str(run))


def test_model_mismatch_lists_missing_and_unexpected_keys(saved):
    class Other(Tiny):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)
            del self.out

    with pytest.raises(CheckpointMismatchError) as e:
        saved.load_checkpoint(state={"model": Other()})
    msg = str(e.value)
    assert "state['model'] missing from checkpoint (2): model.extra.bias, model.extra.weight" in msg
    assert "state['model'] unexpected in checkpoint (2): model.out.bias, model.out.weight" in msg

    class Wider(Tiny):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(16, 5)

    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch at model.out.weight: checkpoint \[3, 16\], "
                                                      r"live \[5, 16\]"):
        saved.load_checkpoint(state={"model": Wider()})
    with pytest.raises(CheckpointMismatchError, match=r"top-level keys missing from checkpoint: optimizer "
                                                      r"\(it holds: model\)"):
        model, opt, _ = make_training()
        saved.load_checkpoint(state={"model": model, "optimizer": opt})


@pytest.mark.parametrize("n", [0, -1])
def test_keep_last_n_below_one_is_refused(tmp_path, n):
    with pytest.raises(ValueError, match=rf"keep_last_n={n} must be an integer >= 1"):
        CheckpointManager(tmp_path, keep_last_n=n)


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/b", "..", ""])
def test_artifact_names_that_escape_are_refused_before_writing(saved, tmp_path, name):
    before = _listing(tmp_path)
    with pytest.raises(ValueError, match="would escape the checkpoint directory"):
        saved.save_checkpoint({"model": Tiny()}, step=2, extra_artifacts={name: "x"})
    assert _listing(tmp_path) == before


def test_committed_checkpoint_is_never_overwritten(saved, tmp_path):
    before = _listing(tmp_path)
    with pytest.raises(CheckpointExistsError, match=r"step_1 already holds a committed checkpoint \(step 1"):
        saved.save_checkpoint({"model": Tiny()}, step=1)
    assert _listing(tmp_path) == before


def test_raw_optimizer_state_dict_is_refused_with_a_hint(tmp_path):
    model, opt, _ = make_training()
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    with pytest.raises(TypeError, match=r"non-string key 0.*Pass the optimizer object itself"):
        CheckpointManager(tmp_path, verbose=False).save_checkpoint({"optimizer": opt.state_dict()}, step=1)


def test_optimizer_without_its_model_is_refused(tmp_path):
    _, opt, _ = make_training()
    with pytest.raises(ValueError, match=r"state\['optimizer'\] is an optimizer, but no nn.Module in state"):
        CheckpointManager(tmp_path, verbose=False).save_checkpoint({"optimizer": opt}, step=1)


@pytest.mark.parametrize("async_save", [False, True])
def test_final_save_at_the_step_of_a_committed_checkpoint_marks_it_final(tmp_path, checker, async_save):
    mgr = CheckpointManager(tmp_path, save_interval=5, verbose=False, async_save=async_save,
                            enable_preemption_handling=False)
    model = Tiny()
    path = mgr.save_checkpoint({"model": model}, step=5, metrics={"loss": 2.0})
    mgr.wait()
    state_files = {n: open(os.path.join(path, "state", n), "rb").read() for n in os.listdir(os.path.join(path, "state"))}
    assert mgr.save_checkpoint({"model": model}, step=5, kind="final", metrics={"eval_loss": 1.5},
                               extra_artifacts={"encoder": {"w": torch.ones(2)}}) == path
    mgr.wait()
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert (meta["kind"], meta["step"], meta["metrics"]) == ("final", 5, {"loss": 2.0, "eval_loss": 1.5})
    assert "encoder.safetensors" in meta["files"]
    assert {n: open(os.path.join(path, "state", n), "rb").read() for n in state_files} == state_files
    assert checker(tmp_path).returncode == 0
    assert CheckpointManager(tmp_path, enable_preemption_handling=False).find_latest_checkpoint() == path
    mgr.close()


def test_exact_ddp_refuses_static_graph_naming_why():
    from dcp_resume import exact_ddp

    with pytest.raises(ValueError, match=r"static_graph=True rebuilds DDP's buckets after the first step"):
        exact_ddp(Tiny(), static_graph=True)
