"""Every flag of the seed guide, run for real through latentwire/train.py, each proven by its effect.

One base run (BASE: 48 samples, batch 4, 2 epochs, a checkpoint every 3 steps) is shared; the runs
that resume from it, and the independent ones, go two at a time (one per core) so the file stays short.
"""
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run
from helpers import assert_same, content_snapshot
from trainer_runs import BASE, final_state, launcher, train

from dcp_resume import CheckpointManager
from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: the real trainer, run once per flag combination

PY = launcher(1, "python")
STEPS = 2 * math.ceil(48 / 4)  # --epochs x ceil(--samples / --batch_size)
TRAINABLE = ("encoder.", "pooler.", "adapter_llama.", "adapter_qwen.")
SQUAD_QUESTIONS = 7


# -- the runs -----------------------------------------------------------------------------------------

def squad_file(path):
    """A SQuAD-v1 JSON file: 7 answered questions in 2 articles, plus one unanswered (skipped)."""
    facts = [("The capital of Avalon is Ashford.", "What is the capital of Avalon?", "Ashford"),
             ("Greta works as a pilot.", "What does Greta work as?", "pilot"),
             ("The lamp in the attic is blue.", "What color is the lamp in the attic?", "blue"),
             ("Hiro's favorite animal is the otter.", "What is Hiro's favorite animal?", "otter")]
    articles = []
    for a in range(2):
        qas = [{"id": f"{a}-{i}", "question": q, "answers": [{"text": ans, "answer_start": c.index(ans)}]}
               for i, (c, q, ans) in enumerate(facts[: 4 - a])]
        articles.append({"title": f"article {a}", "paragraphs": [{"context": " ".join(f[0] for f in facts),
                                                                   "qas": qas}]})
    articles[1]["paragraphs"][0]["qas"].append({"id": "x", "question": "Who?", "answers": []})
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def fails(*args):
    return run(PY + list(map(str, args)), check=False)


class Runs:
    """Named runs on a two-worker pool; runs[name] waits for one and returns (or raises) its result."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures = {}

    def start(self, name, fn):
        self.futures[name] = self.pool.submit(fn)

    def __getitem__(self, name):
        return self.futures[name].result()

    def dir(self, name):
        return self.tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("flags"))
    base, t = r.dir("base"), r.tmp

    def after_base(fn):
        def go():
            r["base"]  # noqa: B018  (wait for the checkpoints to resume from)
            return fn()
        return go

    def copy_of_base(name):
        shutil.copytree(base, r.dir(name))
        return r.dir(name)

    def bad_resumes():
        """Three refused resumes into a copy of a real save_dir (with an interrupted save in it)."""
        target = copy_of_base("target")
        incomplete = target / "step_27"
        shutil.copytree(base / "step_21", incomplete)
        os.remove(incomplete / "metadata.json")
        out = {}
        for name, path, extra in [("missing", target / "step_99", []), ("incomplete", incomplete, []),
                                  ("reset_same_dir", target / "step_21", ["--reset_epoch"])]:
            before = content_snapshot(target)
            proc = fails(*BASE, "--resume_from", path, "--save_dir", target, *extra)
            out[name] = (path, proc, before, content_snapshot(target))
        return out

    def already_complete():
        d = copy_of_base("complete")
        before = content_snapshot(d, skip_logs=True)
        return train(PY, *BASE, "--save_dir", d, "--auto_resume"), before, content_snapshot(d, skip_logs=True)

    # Independent runs first (FIFO: 'base' starts before anything that waits for it).
    r.start("base", lambda: train(PY, *BASE, "--save_dir", base, extra_env={"LATENTWIRE_TRACE": f"{t}/base.trace"}))
    # (--save_every 0 where only the final state matters: saving must not change the training anyway)
    r.start("seed7", lambda: train(PY, *BASE, "--save_every", "0", "--seed", "7", "--save_dir", r.dir("seed7")))
    r.dir("fresh").mkdir()
    r.start("fresh", lambda: train(PY, *BASE, "--save_every", "0", "--save_dir", r.dir("fresh"), "--auto_resume"))
    r.start("squad", lambda: train(PY, "--tiny", "--dataset", squad_file(t / "squad.json"), "--batch_size", "4",
                                   "--epochs", "1", "--save_every", "0", "--save_dir", r.dir("squad"),
                                   extra_env={"LATENTWIRE_TRACE": f"{t}/squad.trace"}))
    r.start("unknown", lambda: fails("--tiny", "--dataset", "foo", "--save_dir", r.dir("unknown")))
    # Runs that resume from the base run's checkpoints.
    r.start("resume_from", after_base(lambda: train(PY, *BASE, "--resume_from", base / "epoch1",
                                                    "--save_dir", r.dir("resume_from"))))
    r.start("no_opt", after_base(lambda: train(PY, *BASE, "--resume_from", base / "step_21", "--no_load_optimizer",
                                               "--save_dir", r.dir("no_opt"))))
    r.start("no_sched", after_base(lambda: train(PY, *BASE, "--resume_from", base / "step_21",
                                                 "--no_load_lr_scheduler", "--save_dir", r.dir("no_sched"))))
    # --lr 0: the restarted schedule never moves the weights, so the run ends on the weights it loaded
    # (from its first step on: the restored optimizer must not step at the checkpoint's LR).
    r.start("reset", after_base(lambda: train(PY, *BASE, "--resume_from", base / "step_21", "--reset_epoch",
                                              "--lr", "0", "--save_dir", r.dir("reset"),
                                              extra_env={"LATENTWIRE_TRACE": f"{t}/reset.trace"})))
    r.start("extend", after_base(lambda: train(PY, *BASE, "--epochs", "3", "--auto_resume",
                                               "--save_dir", copy_of_base("extend"))))
    r.start("complete", after_base(already_complete))
    r.start("bad", after_base(bad_resumes))
    yield r
    r.pool.shutdown(wait=True)


def saved(stdout):
    return re.findall(r"^Saved checkpoint: (.*)$", stdout, re.M)


def trace(prefix):
    """[(epoch, step, [ids])] per training step, from LATENTWIRE_TRACE's rank-0 file."""
    rows = [line.split() for line in open(f"{prefix}.rank0")]
    return [(int(e), int(s), [int(i) for i in ids.split(",")]) for e, s, _, ids in rows]


def adam_steps(state):
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


# -- --epochs --batch_size --samples --dataset --seed ---------------------------------------------------

def test_epochs_batch_size_and_samples_set_the_schedule(runs):
    runs["base"]
    state, meta = final_state(runs.dir("base"))
    assert state["counters"] == {**state["counters"], "epoch": 2, "global_step": STEPS, "samples_seen": 2 * 48,
                                 "batch_size": 4, "world_size": 1}
    assert (meta["kind"], meta["step"], meta["epoch"]) == ("final", STEPS, 2)
    steps = trace(runs.tmp / "base.trace")
    assert [s for _, s, _ in steps] == list(range(1, STEPS + 1))
    assert all(len(ids) == 4 for _, _, ids in steps)
    for epoch in (0, 1):  # each epoch: 12 batches covering the 48 samples exactly once, in a new order
        ids = [i for e, _, batch in steps if e == epoch for i in batch]
        assert sorted(ids) == list(range(48))
    assert [i for e, _, b in steps if e == 0 for i in b] != [i for e, _, b in steps if e == 1 for i in b]


def test_dataset_path_trains_on_a_squad_v1_file(runs):
    out = runs["squad"].stdout
    state, meta = final_state(runs.dir("squad"))
    steps = trace(runs.tmp / "squad.trace")
    # 7 answered questions (the unanswered one is skipped), not the synthetic default of 1000
    assert [len(ids) for _, _, ids in steps] == [4, 3]
    assert sorted(i for _, _, ids in steps for i in ids) == list(range(SQUAD_QUESTIONS))
    assert state["counters"]["global_step"] == math.ceil(SQUAD_QUESTIONS / 4) == meta["step"]
    assert state["counters"]["samples_seen"] == SQUAD_QUESTIONS and meta["kind"] == "final"
    assert saved(out) == [f"{runs.dir('squad')}/step_2"]  # --save_every 0: only the final checkpoint
    config = json.loads((runs.dir("squad") / "step_2" / "config.json").read_text())
    assert config["dataset"] == str(runs.tmp / "squad.json")


def test_unknown_dataset_exits_2_with_one_line_listing_the_choices(runs):
    proc = runs["unknown"]
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --dataset 'foo': not 'synthetic' and no such file; choices: "
                                        "synthetic, squad, or a PATH to a SQuAD-v1 .json/.jsonl file"]
    assert not [n for n in (os.listdir(runs.dir("unknown")) if runs.dir("unknown").exists() else []) if n != "logs"]


def test_same_seed_gives_identical_weights_and_another_seed_does_not(runs):
    runs["fresh"], runs["seed7"]
    (a, _), (same, _), (other, _) = (final_state(runs.dir(n)) for n in ("base", "fresh", "seed7"))
    for key in COMPARED:
        assert_same(a[key], same[key], key)
    trainable = [k for k in a["model"] if k.startswith(TRAINABLE)]
    assert len(trainable) > 30
    differing = [k for k in trainable if not a["model"][k].equal(other["model"][k])]
    assert differing == trainable, f"same after training with --seed 7: {sorted(set(trainable) - set(differing))}"
    assert other["sampler"]["seed"] == 7 and a["sampler"]["seed"] == 42


# -- --save_dir --save_every ------------------------------------------------------------------------------

def test_save_dir_holds_the_committed_checkpoints_with_retention(runs, checker):
    out, base = runs["base"].stdout, runs.dir("base")
    # every 3rd step; at an epoch's end the epoch checkpoint (epoch1/) or the final one takes its place
    assert saved(out) == [f"{base}/{n}" for n in ("step_3", "step_6", "step_9", "epoch1", "step_15", "step_18",
                                                  "step_21", "step_24")]
    # keep_last_n 3 (default) keeps the newest three plus the best one (epoch1, the only is_best save)
    assert sorted(os.listdir(base)) == ["epoch1", "logs", "step_18", "step_21", "step_24"]
    kinds = {n: json.loads((base / n / "metadata.json").read_text())["kind"]
             for n in ("epoch1", "step_18", "step_21", "step_24")}
    assert kinds == {"epoch1": "epoch", "step_18": "step", "step_21": "step", "step_24": "final"}
    weights = {"encoder.safetensors", "adapter_llama.safetensors", "adapter_qwen.safetensors"}
    assert weights <= set(os.listdir(base / "step_24")) and weights <= set(os.listdir(base / "epoch1"))
    assert not weights & set(os.listdir(base / "step_21"))
    assert (base / "logs" / "train.log").read_text().count("Saved checkpoint:") == 8
    assert checker(base, deep=False).returncode == 0


# -- --auto_resume --resume_from ---------------------------------------------------------------------------

def test_auto_resume_with_an_empty_save_dir_starts_fresh(runs):
    out, d = runs["fresh"].stdout, runs.dir("fresh")
    assert f"No checkpoint found to resume in {d}; starting fresh" in out.splitlines()
    assert "Resuming" not in out and f"Training complete: {STEPS} steps, 2 epochs" in out
    assert final_state(d)[1]["step"] == STEPS  # and bit-identical to the base run: see the --seed test


def test_resume_from_a_chosen_checkpoint(runs):
    out, base, d = runs["resume_from"].stdout, runs.dir("base"), runs.dir("resume_from")
    assert f"Resuming from checkpoint: {base}/epoch1 (step 12, epoch 1)" in out
    assert saved(out)[0] == f"{d}/step_15"  # goes on from step 12, into the new --save_dir
    (a, _), (b, meta) = final_state(base), final_state(d)
    assert meta["step"] == STEPS
    for key in COMPARED:  # not the latest checkpoint (step_24), the chosen one: ends where the base run did
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize("case", ["missing", "incomplete"])
def test_resume_from_a_bad_path_exits_2_and_leaves_the_save_dir_alone(runs, case):
    path, proc, before, after = runs["bad"][case]
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], proc.stderr
    assert "Resuming" not in proc.stdout and "Saved checkpoint" not in proc.stdout
    assert after == before


# -- --no_load_optimizer --no_load_lr_scheduler --reset_epoch ----------------------------------------------

def test_no_load_optimizer_starts_adam_afresh(runs):
    out = runs["no_opt"].stdout
    assert f"Resuming from checkpoint: {runs.dir('base')}/step_21 (step 21, epoch 1)" in out
    (a, _), (b, meta) = final_state(runs.dir("base")), final_state(runs.dir("no_opt"))
    assert meta["step"] == STEPS
    assert adam_steps(a) == {STEPS}
    assert adam_steps(b) == {STEPS - 21}  # per-parameter Adam step count restarted at the resume
    assert b["scheduler"]["last_epoch"] == STEPS  # the schedule itself was restored
    assert not b["optimizer"]["state"]["encoder.embed.weight"]["exp_avg_sq"].equal(
        a["optimizer"]["state"]["encoder.embed.weight"]["exp_avg_sq"])


def test_no_load_lr_scheduler_restarts_the_schedule(runs):
    (a, _), (b, meta) = final_state(runs.dir("base")), final_state(runs.dir("no_sched"))
    assert meta["step"] == STEPS
    assert b["scheduler"]["last_epoch"] == STEPS - 21 and a["scheduler"]["last_epoch"] == STEPS
    assert adam_steps(b) == {STEPS}  # the optimizer was restored
    stats = [json.loads((runs.dir(n) / "step_24" / "training_stats.json").read_text())["steps"]
             for n in ("base", "no_sched")]
    # after the resume at step 21 the LR follows the warmup again, as the base run did from step 1
    assert [s["lr"] for s in stats[1][21:]] == [s["lr"] for s in stats[0][:3]]
    assert [s["lr"] for s in stats[1][:21]] == [s["lr"] for s in stats[0][:21]]


def test_reset_epoch_keeps_weights_and_optimizer_but_restarts_counters_data_and_schedule(runs):
    out, base, d = runs["reset"].stdout, runs.dir("base"), runs.dir("reset")
    assert f"Resuming from checkpoint: {base}/step_21 (weights only; --reset_epoch restarts at step 0)" in out
    assert saved(out)[0] == f"{d}/step_3"
    loaded = CheckpointManager(base, verbose=False).load_checkpoint(base / "step_21")
    (a, _), (b, meta) = final_state(base), final_state(d)
    # --lr 0 from the first step on: ends on exactly the weights it loaded (not fresh ones)
    assert_same(loaded["model"], b["model"], "model")
    assert adam_steps(b) == {21 + STEPS}  # the optimizer came along
    assert b["counters"] == {**a["counters"], "best_metric": b["counters"]["best_metric"]}  # fresh run's counters
    assert meta["step"] == STEPS and b["scheduler"]["last_epoch"] == STEPS and b["scheduler"]["base_lrs"] == [0.0]
    assert trace(runs.tmp / "reset.trace") == trace(runs.tmp / "base.trace")  # data order from the start


def test_reset_epoch_into_the_same_save_dir_is_refused(runs):
    path, proc, before, after = runs["bad"]["reset_same_dir"]
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--save_dir" in lines[0] and str(path.parent) in lines[0], proc.stderr
    assert after == before


# -- --epochs on resume ----------------------------------------------------------------------------------

def test_larger_epochs_on_resume_extends_a_finished_run(runs):
    out, d = runs["extend"].stdout, runs.dir("extend")
    assert f"Resuming from checkpoint: {d}/step_24 (step 24, epoch 2)" in out
    assert saved(out) == [f"{d}/step_{s}" for s in (27, 30, 33, 36)]
    state, meta = final_state(d)
    assert (meta["kind"], meta["step"], meta["epoch"]) == ("final", 36, 3)
    assert state["counters"]["global_step"] == 36 and state["counters"]["samples_seen"] == 3 * 48


def test_same_epochs_on_resume_of_a_finished_run_changes_nothing(runs):
    proc, before, after = runs["complete"]
    assert proc.returncode == 0
    assert f"Training already complete at epoch 2 (step {STEPS}); pass a larger --epochs to extend it" in proc.stdout
    assert "Saved checkpoint" not in proc.stdout
    assert after == before
