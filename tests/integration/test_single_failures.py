"""No single failure loses or blocks the run, as a user of the trainer sees it: a flipped byte or a missing file
anywhere in the newest checkpoint costs at most that checkpoint, and the resumed run still ends bit-identical to
one that never stopped; a save_dir whose committed checkpoints all fail is refused at start in one line (exit 2)
and left exactly as it was, never started over; nothing is written outside save_dir through a planted link or
into a FIFO; and a missing transformers is one line, not a traceback."""
import os
import re
import subprocess

import pytest
from conftest import ROOT, run
from helpers import assert_same, flip_byte, refused_at_start, stat_snapshot
from trainer_runs import BASE, final_state, launcher, train

from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: real trainer runs

PYTHON = launcher(1, "python")
NEWEST = "step_15"  # the stopped run keeps step_9, epoch1 (step 12, the best) and step_15
SHARED = "state/ref.step_3.__0_0.distcp"  # the frozen LMs' bytes, written by step_3, linked by step_9 and step_15
NEWEST_FILES = ["metadata.json", "config.json", "training_stats.json", "state/.metadata", "state/__0_0.distcp",
                SHARED]


def start(*args, cmd=PYTHON, extra_env=None) -> subprocess.CompletedProcess:
    return run(cmd + list(map(str, args)), timeout=300, check=False, env=extra_env)


def inodes(ckpt) -> set[int]:
    return {os.stat(p).st_ino for p in ckpt.glob("state/*")}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 15 of 24 (--max_steps: no final checkpoint), as a kill would leave it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(PYTHON, *BASE, "--max_steps", 15, "--save_dir", run)
    assert sorted(p.name for p in run.iterdir() if p.name != "logs") == ["epoch1", "step_15", "step_9"]
    return run


def damaged_copy(stopped, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped), str(run)], check=True)  # -a keeps hard links: shared stays shared
    return run


def assert_ends_like(reference, run):
    (a, meta_a), (b, meta_b) = final_state(reference), final_state(run)
    assert meta_a["kind"] == meta_b["kind"] == "final" and meta_a["step"] == meta_b["step"]
    for key in COMPARED:
        assert_same(a[key], b[key], key)


def test_the_newest_two_checkpoints_share_no_file(stopped):
    newest = stopped / NEWEST
    assert sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()) == sorted(NEWEST_FILES)
    assert not inodes(newest) & inodes(stopped / "epoch1")  # what a resume falls back to holds its own copy
    assert os.stat(newest / SHARED).st_ino == os.stat(stopped / "step_9" / SHARED).st_ino  # two saves back: shared


@pytest.mark.parametrize("damage,rel", [("flip", rel) for rel in NEWEST_FILES] +
                         [("remove", "state/__0_0.distcp"), ("remove", SHARED)])
def test_damage_to_any_file_of_the_newest_checkpoint_costs_at_most_it(stopped, reference_run, tmp_path, damage,
                                                                      rel):
    """Every file of the newest checkpoint in turn: flipped in its middle (only a content hash can tell), or
    removed (a committed checkpoint with a missing file is damage, not an interrupted save). The resume loads
    the newest or the one before, replaces the damaged one, and the run ends bit-identical."""
    run = damaged_copy(stopped, tmp_path)
    if damage == "flip":
        flip_byte(run / NEWEST / rel)
    else:
        (run / NEWEST / rel).unlink()
    out = train(PYTHON, *BASE, "--save_dir", run, "--auto_resume").stdout
    resumed = re.search(r"Resuming from checkpoint: (\S+) ", out).group(1)
    if rel == "metadata.json":  # not hashed itself: a flip is caught when it breaks the JSON or a recorded value
        assert resumed in (str(run / NEWEST), str(run / "epoch1")), out
    else:
        assert resumed == str(run / "epoch1"), out
    assert_ends_like(reference_run(1, "python"), run)


def test_a_damaged_shared_file_is_named_in_both_checkpoints_and_ls_points_one_save_back(stopped, tmp_path):
    run = damaged_copy(stopped, tmp_path)
    flip_byte(run / NEWEST / SHARED)
    cli = [launcher(1, "python")[0], "-m", "dcp_resume.cli"]
    verify = start("verify", run, cmd=cli)
    assert verify.returncode == 1
    for name in (NEWEST, "step_9"):
        assert f"BAD  {name}/{SHARED}: content hash mismatch" in verify.stdout
    assert "OK   epoch1:" in verify.stdout
    latest = start("latest", run, cmd=cli)
    assert latest.returncode == 0 and latest.stdout.strip() == str(run / "epoch1")


def test_lost_shards_in_every_checkpoint_refuse_a_fresh_start_and_change_nothing(tmp_path):
    """The issue's case: a 2-rank run keeps step_2 and step_4; rank 1's shards are lost from both (a node-local
    disk, an over-eager cleanup). --auto_resume used to start over and replace them."""
    run, torchrun = tmp_path / "run", launcher(2)
    flags = ["--tiny", "--samples", 48, "--batch_size", 4, "--save_every", 2, "--keep_last_n", 3]
    train(torchrun, *flags, "--max_steps", 4, "--save_dir", run)
    for shard in run.glob("step_*/state/__1_*.distcp"):
        shard.unlink()
    before = stat_snapshot(run)
    want = (f"error: save_dir {run} holds committed checkpoints and none of them loads: step_4 (listed file "
            "missing: state/__1_0.distcp); step_2 (listed file missing: state/__1_0.distcp). Nothing in it was "
            "changed. Resume from a checkpoint elsewhere (--resume_from PATH), train into a new --save_dir, or see "
            f"every damaged file with `dcp-resume verify {run}`")
    assert refused_at_start(start(*flags, "--epochs", 2, "--save_dir", run, "--auto_resume")) == want
    assert refused_at_start(start(*flags, "--epochs", 2, "--save_dir", run)) == want  # nor a fresh run without it
    proc = start(*flags, "--epochs", 2, "--save_dir", run, "--auto_resume", cmd=torchrun)
    assert proc.returncode != 0 and proc.stderr.count(want) == 2, proc.stderr[-3000:]  # each rank, one line
    assert "Resuming from checkpoint" not in proc.stdout and "epoch 1/" not in proc.stderr
    assert stat_snapshot(run) == before


def test_content_damage_in_every_checkpoint_refuses_the_resume_after_its_load_and_changes_nothing(stopped, tmp_path):
    run = damaged_copy(stopped, tmp_path)
    for shard in run.glob("*/state/*.distcp"):
        if not shard.name.startswith("ref."):
            flip_byte(shard)
    flip_byte(run / NEWEST / SHARED)  # step_9's too (the same file); epoch1 holds the other copy
    flip_byte(next((run / "epoch1" / "state").glob("ref.*")))
    before = stat_snapshot(run)
    line = refused_at_start(start(*BASE, "--save_dir", run, "--auto_resume"))
    assert re.match(rf"error: save_dir {re.escape(str(run))} holds committed checkpoints and none of them loads: "
                    rf"{NEWEST} \(state/\S+ content hash mismatch .*\); epoch1 \(.*\); step_9 \(.*\)\. Nothing in "
                    "it was changed.", line), line
    assert stat_snapshot(run) == before  # no lock, no train.log line: the resume claims save_dir after its load


@pytest.mark.parametrize("planted", ["train.log -> outside file", "logs -> outside dir", "train.log FIFO"])
def test_the_log_is_never_written_through_a_link_or_into_a_fifo(tmp_path, planted):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "train.log").write_text("someone else's file\n")
    (run / "logs").parent.mkdir()
    if planted == "logs -> outside dir":
        (run / "logs").symlink_to(outside)
        what = f"{run}/logs is a symlink to {outside}; train.log is written only inside save_dir"
    else:
        (run / "logs").mkdir()
        if planted == "train.log FIFO":
            os.mkfifo(run / "logs" / "train.log")
            what = f"{run}/logs/train.log is a FIFO, not a regular file; refusing to write through it"
        else:
            (run / "logs" / "train.log").symlink_to(outside / "train.log")
            what = (f"{run}/logs/train.log is a symlink to {outside}/train.log, not a regular file; refusing to "
                    "write through it")
    line = refused_at_start(start(*BASE, "--save_dir", run))
    assert line.startswith(f"error: cannot log to {run}/logs/train.log: {what}"), line
    assert (outside / "train.log").read_text() == "someone else's file\n" and os.listdir(outside) == ["train.log"]


def test_without_transformers_the_trainer_says_what_to_install_in_one_line(tmp_path):
    hidden = {"PYTHONPATH": os.path.join(ROOT, "tests", "no_transformers")}
    proc = start(*BASE, "--save_dir", tmp_path / "run", extra_env=hidden)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: latentwire/train.py needs transformers for its frozen LMs, which this "
                                   "install lacks: pip install 'transformers>=4.50' (a dependency of dcp-resume: "
                                   "pip install -e . installs it)")
    assert not (tmp_path / "run").exists()
