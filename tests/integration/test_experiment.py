"""The seed guide's MAIN_EXPERIMENT side: ExperimentCheckpointer in-process, and
latentwire/main_experiment.py run for real (killed with SIGKILL, resumed with --resume)."""
import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from common import full_state, make_training, train_steps
from conftest import ROOT, run
from helpers import assert_same, content_snapshot, flip_byte, stat_snapshot
from trainer_runs import train_until_killed

from dcp_resume import ExperimentCheckpointer

pytestmark = pytest.mark.slow  # integration: real main_experiment.py runs, killed and resumed

MAIN = [sys.executable, os.path.join(ROOT, "latentwire", "main_experiment.py")]
FLAGS = ["--tiny", "--samples", "60", "--epochs", "2", "--batch-size", "4", "--save-interval", "3",
         "--compression-type", "linear"]
VARIANTS = ("telepathy", "meanpool")  # linear: the runs above


# -- ExperimentCheckpointer ---------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    save_dir: str
    save_interval: int = 5
    keep_last_n: int = 2
    verbose: bool = False
    lr: float = 0.01


def make_config(kind, save_dir):
    fields = dict(save_dir=str(save_dir), save_interval=5, keep_last_n=2, verbose=False, lr=0.01)
    if kind == "dict":
        return fields
    if kind == "dataclass":
        return Config(**fields)
    return argparse.Namespace(**fields)


@pytest.mark.parametrize("kind", ["dict", "dataclass", "namespace"])
def test_checkpointer_save_then_resume_is_exact(tmp_path, kind):
    save_dir = tmp_path / "ckpt"
    ckpt = ExperimentCheckpointer(make_config(kind, save_dir))
    assert (ckpt.manager.save_dir, ckpt.manager.save_interval, ckpt.manager.keep_last_n) == (str(save_dir), 5, 2)
    model, opt, sched = make_training(seed=0)
    train_steps(model, opt, sched, 3)
    path = ckpt.save_training_state(model, opt, sched, epoch=1, step=3, metrics={"loss": 0.25}, best_metric=0.25)
    ckpt.close()
    assert path == os.path.join(str(save_dir), "step_3")
    config = json.loads((save_dir / "step_3" / "config.json").read_text())
    assert config["save_dir"] == str(save_dir) and config["lr"] == 0.01  # the whole config is recorded

    model2, opt2, sched2 = make_training(seed=1)  # other initial weights: the restore must overwrite them
    assert "differs" in _mismatch(full_state(model, opt), full_state(model2, opt2))
    again = ExperimentCheckpointer(make_config(kind, save_dir))
    assert again.resume_training(model2, opt2, sched2) == (1, 3, 0.25, {"loss": 0.25})
    again.close()
    assert_same(full_state(model, opt), full_state(model2, opt2))
    assert sched2.last_epoch == sched.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    # ... and training goes on identically from there (moments, step counts and LR all restored)
    train_steps(model, opt, sched, 2, seed=5)
    train_steps(model2, opt2, sched2, 2, seed=5)
    assert_same(full_state(model, opt), full_state(model2, opt2))


def _mismatch(a, b):
    try:
        assert_same(a, b)
    except AssertionError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("config", [{}, {"save_dir": ""}, argparse.Namespace(save_dir=None, lr=1.0),
                                    dataclasses.make_dataclass("NoDir", [("lr", float, 1.0)])()],
                         ids=["dict", "empty", "namespace", "dataclass"])
def test_checkpointer_without_save_dir_is_a_value_error_naming_it(config):
    with pytest.raises(ValueError, match="save_dir"):
        ExperimentCheckpointer(config)


def test_checkpointer_with_nothing_to_resume_returns_zeros_and_touches_nothing(tmp_path):
    save_dir = tmp_path / "empty"
    ckpt = ExperimentCheckpointer({"save_dir": str(save_dir), "verbose": False})
    model, opt, sched = make_training(seed=0)
    before = full_state(model, opt)
    assert ckpt.resume_training(model, opt, sched) == (0, 0, None, {})
    ckpt.close()
    assert_same(before, full_state(model, opt))
    assert sched.last_epoch == 0
    assert not save_dir.exists()


# -- latentwire/main_experiment.py --------------------------------------------------------------------

def experiment(*args, check=True):
    return run(MAIN + list(map(str, args)), check=check)


def results(save_dir):
    return json.loads((save_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("exp") / "uninterrupted"
    out = experiment(*FLAGS, "--save-dir", save_dir).stdout
    return save_dir, out


def kill_then_resume(save_dir, step):
    """Killed with SIGKILL right after its step_<step> checkpoint, then rerun with --resume."""
    killed = train_until_killed(MAIN, *FLAGS, "--save-dir", save_dir,
                                kill_after=f"Saved checkpoint: {save_dir}/step_{step}")
    assert "phase train" in killed and "phase evaluate" not in killed
    assert not (save_dir / "results.json").exists()
    return experiment(*FLAGS, "--save-dir", save_dir, "--resume").stdout


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("exp") / "interrupted"
    return save_dir, kill_then_resume(save_dir, 6)


def test_uninterrupted_run_writes_results_for_both_lms(reference):
    save_dir, out = reference
    r = results(save_dir)
    assert r["compression_type"] == "linear" and r["epochs"] == 2 and r["eval_examples"] == 12  # last 20% of 60
    assert set(r["lms"]) == {"llama", "qwen"}
    for lm in r["lms"].values():
        assert math.isfinite(lm["loss"]) and lm["loss"] > 0 and 0.0 <= lm["accuracy"] <= 1.0 and lm["tokens"] > 0
    # 48 training examples / batch 4 = 12 steps per epoch; every 3rd step, the epoch's end (step 12)
    # included, and the final one at step 24.
    saved = re.findall(r"^Saved checkpoint: (.*)$", out, re.M)
    assert saved == [f"{save_dir}/step_{s}" for s in (3, 6, 9, 12, 15, 18, 21, 24)]
    assert out.index("phase train") < out.index("phase evaluate") < out.index(f"Wrote {save_dir}/results.json")


def test_kill9_then_resume_writes_the_same_results(reference, interrupted):
    save_dir, resumed = interrupted
    m = re.search(rf"^Resuming from checkpoint: {re.escape(str(save_dir))}/step_(\d+) \(step (\d+), epoch 0\)$",
                  resumed, re.M)
    assert m and m.group(1) == m.group(2) and 6 <= int(m.group(1)) < 12, resumed
    assert "phase train\n" in resumed
    assert results(save_dir) == results(reference[0])


def test_kill9_after_the_checkpoint_at_an_epoch_end_then_resume_writes_the_same_results(reference, tmp_path):
    save_dir = tmp_path / "at_epoch_end"
    resumed = kill_then_resume(save_dir, 12)
    assert f"Resuming from checkpoint: {save_dir}/step_12 (step 12, epoch 0)" in resumed
    assert re.findall(r"^Saved checkpoint: (.*)$", resumed, re.M)[0] == f"{save_dir}/step_15"
    assert results(save_dir) == results(reference[0])


def test_resume_after_everything_finished_does_nothing(interrupted):
    save_dir, _ = interrupted
    before = content_snapshot(save_dir)
    proc = experiment(*FLAGS, "--save-dir", save_dir, "--resume")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"All phases done: {save_dir}/results.json"
    assert content_snapshot(save_dir) == before


def test_other_variants_run_and_no_checkpoints_saves_none(tmp_path):
    def variant(name):
        return experiment("--tiny", "--samples", "20", "--epochs", "1", "--batch-size", "4", "--save-interval", "1",
                          "--compression-type", name, "--no-checkpoints", "--save-dir", tmp_path / name).stdout

    with ThreadPoolExecutor(max_workers=2) as pool:  # one per core
        outs = dict(zip(VARIANTS, pool.map(variant, VARIANTS)))
    for name, out in outs.items():
        r = results(tmp_path / name)
        assert r["compression_type"] == name and set(r["lms"]) == {"llama", "qwen"}
        assert all(math.isfinite(lm["loss"]) for lm in r["lms"].values())
        assert "Saved checkpoint" not in out
        assert sorted(os.listdir(tmp_path / name)) == ["results.json"]  # --save-interval 1 would save every step


def test_a_fresh_run_into_a_finished_save_dir_is_refused_untouched(reference):
    save_dir, _ = reference
    before = content_snapshot(save_dir)
    proc = experiment(*FLAGS, "--save-dir", save_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"save_dir {save_dir} already holds" in lines[0] and "Traceback" not in proc.stderr
    assert "phase train" not in proc.stdout
    assert content_snapshot(save_dir) == before


def test_resume_into_a_save_dir_whose_checkpoints_all_fail_is_refused_untouched(reference, tmp_path):
    """Every shard's content damaged (found only as the load reads it): --resume refuses in one line after its
    load, which only reads, and changes nothing: no lock, no results.json."""
    save_dir = tmp_path / "damaged"
    subprocess.run(["cp", "-a", str(reference[0]), str(save_dir)], check=True)  # -a: linked files stay linked
    (save_dir / "results.json").unlink()  # else --resume says every phase is done
    flipped = set()
    for shard in sorted(save_dir.glob("*/state/*.distcp")):
        if shard.stat().st_ino not in flipped:  # a file two checkpoints link: flipped once
            flipped.add(shard.stat().st_ino)
            flip_byte(shard)
    before = stat_snapshot(save_dir)
    proc = experiment(*FLAGS, "--save-dir", save_dir, "--resume", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: save_dir {save_dir} holds committed checkpoints and none of them loads: ")
    assert "phase train" not in proc.stdout and stat_snapshot(save_dir) == before
