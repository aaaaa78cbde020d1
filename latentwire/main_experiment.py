"""The guide's MAIN_EXPERIMENT: phases train -> evaluate for one bridge variant, resumable inside a phase.

    python latentwire/main_experiment.py --compression-type telepathy --save-dir runs/main
    python latentwire/main_experiment.py --compression-type telepathy --save-dir runs/main --resume

Writes <save-dir>/results.json with eval loss and token accuracy for both LMs. With --resume it
continues the train phase from its latest checkpoint and skips phases already finished.
Exit codes: 0 finished, 2 bad arguments, anything else failed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentwire.extra import require_transformers  # noqa: E402

require_transformers("latentwire/main_experiment.py")  # before anything imports it: one line, not a traceback

import torch  # noqa: E402

from dcp_resume import PREEMPTED_EXIT_CODE, ExperimentCheckpointer, StorageError  # noqa: E402
from dcp_resume.storage import open_storage  # noqa: E402
from dcp_resume.preemption import exit_preempted  # noqa: E402
from dcp_resume.rng import RNGState  # noqa: E402
from dcp_resume.sampler import ResumableSampler  # noqa: E402
from latentwire.data import collate, load_examples  # noqa: E402
from latentwire.model import COMPRESSIONS, LatentWire, ModelConfig, trainable_state  # noqa: E402
from latentwire.progress import checkpoint_after_step  # noqa: E402
from latentwire.recipe import TINY, rank_seed, seed_everything, warmup_cosine  # noqa: E402

EVAL_FRACTION = 0.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compression-type", choices=COMPRESSIONS, default="telepathy")
    p.add_argument("--save-dir", default="runs/main_experiment")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--samples", type=int, default=120, help="examples in all; the last 20%% are held out")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tiny", action="store_true", help="a much smaller model, for tests and smoke runs")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --save-dir")
    p.add_argument("--resume-from", metavar="PATH", help="resume from this checkpoint")
    p.add_argument("--save-interval", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--no-checkpoints", action="store_true", help="save nothing (and so resume nothing)")
    args = p.parse_args(argv)
    if args.no_checkpoints and (args.resume or args.resume_from):
        p.error("--no-checkpoints cannot be combined with --resume/--resume-from")
    if args.save_interval < 1:
        p.error(f"--save-interval {args.save_interval}: must be >= 1")
    return args


class Experiment:
    def __init__(self, args):
        self.args = args
        examples = load_examples(args.dataset, args.samples, seed=args.seed)
        n_eval = max(1, int(len(examples) * EVAL_FRACTION))
        self.train_set, self.eval_set = examples[:-n_eval], examples[-n_eval:]
        self.cfg = ModelConfig(compression=args.compression_type, **(TINY if args.tiny else {}))
        torch.manual_seed(args.seed)
        self.model = LatentWire(self.cfg)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)
        self.sampler = ResumableSampler(len(self.train_set), args.batch_size, seed=args.seed)
        total = args.epochs * math.ceil(len(self.train_set) / args.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(2, total))
        seed_everything(rank_seed(args.seed, 0))
        self.rng = RNGState(0)
        self.ckpt = None if args.no_checkpoints else ExperimentCheckpointer(
            {**vars(args), "save_dir": args.save_dir, "save_interval": args.save_interval, "verbose": False})
        self.results_path = os.path.join(args.save_dir, "results.json")

    def _extra(self):
        return {"sampler": self.sampler, "rng": self.rng}

    def run(self) -> int:
        a = self.args
        if a.resume and os.path.exists(self.results_path):
            print(f"All phases done: {self.results_path}")
            return 0
        epoch, step = 0, 0
        path = None
        if a.resume or a.resume_from:
            path = a.resume_from or self.ckpt.manager.find_latest_checkpoint()
        # Claim the save_dir before training: refuse a busy one, a damaged one, or one holding newer checkpoints.
        # A resume claims after its load, which only reads: a save_dir none of whose checkpoints loads is left as is.
        if self.ckpt and path is None:
            self.ckpt.manager.start_run(None)
        if a.resume or a.resume_from:
            if path is None:
                print(f"No checkpoint found to resume in {a.save_dir}; starting fresh")
            else:
                epoch, step, _, _ = self.ckpt.resume_training(self.model, self.opt, self.sched, path,
                                                              extra_state=self._extra())
                self.ckpt.manager.start_run(self.ckpt.manager.loaded_path)
                print(f"Resuming from checkpoint: {self.ckpt.manager.loaded_path} (step {step}, epoch {epoch})")
        if epoch < a.epochs:
            print("phase train")
            if self.train(epoch, step) == PREEMPTED_EXIT_CODE or (self.ckpt and self.ckpt.manager.preempted):
                return PREEMPTED_EXIT_CODE  # --resume skips the finished train phase
        else:
            print("phase train: already finished, skipped")
        print("phase evaluate")
        results = self.evaluate()
        os.makedirs(a.save_dir, exist_ok=True)
        open_storage(self.results_path).commit_json_atomically(self.results_path, results)
        print(f"Wrote {self.results_path}: " + ", ".join(f"{k} loss {v['loss']:.4f} acc {v['accuracy']:.3f}"
                                                          for k, v in results["lms"].items()))
        return 0

    def train(self, epoch: int, step: int) -> int:
        a = self.args
        while epoch < a.epochs:
            self.sampler.set_epoch(epoch)
            for indices in self.sampler:
                out = self.model(collate([self.train_set[i] for i in indices], self.cfg.max_context_bytes,
                                         self.cfg.max_answer_tokens, self.model.vocabs))
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                step += 1
                if not self.ckpt:
                    continue
                epoch_done = len(self.sampler) == 0
                kind = checkpoint_after_step(self.ckpt.manager, step, epoch_done=epoch_done,
                                             run_done=epoch_done and epoch + 1 >= a.epochs, epoch_end_saved=False)
                if kind == "preemption":
                    self._save(epoch, step, "preemption")
                    print(f"Preempted at step {step}: exiting with {PREEMPTED_EXIT_CODE}; rerun with --resume")
                    return PREEMPTED_EXIT_CODE
                if kind == "step":
                    self._save(epoch, step, "step")
            epoch += 1
            self.sampler.set_epoch(epoch)
        if self.ckpt:
            self._save(epoch, step, "final")
        return 0

    def _save(self, epoch: int, step: int, kind: str) -> None:
        path = self.ckpt.save_training_state(self.model, self.opt, self.sched, epoch, step, kind=kind,
                                             extra_state=self._extra())
        if path is not None:  # None: a periodic save skipped for lack of disk space (logged by the engine)
            print(f"Saved checkpoint: {path}", flush=True)

    @torch.no_grad()
    def evaluate(self) -> dict:
        sums = {lm: {"loss_sum": 0.0, "correct": 0, "tokens": 0} for lm in ("llama", "qwen")}
        for i in range(0, len(self.eval_set), 16):
            r = self.model.evaluate(collate(self.eval_set[i:i + 16], self.cfg.max_context_bytes,
                                            self.cfg.max_answer_tokens, self.model.vocabs))
            for lm, s in sums.items():
                s["loss_sum"] += r[f"{lm}_loss_sum"]
                s["correct"] += r[f"{lm}_correct"]
                s["tokens"] += r[f"{lm}_tokens"]
        lms = {lm: {"loss": s["loss_sum"] / max(s["tokens"], 1), "accuracy": s["correct"] / max(s["tokens"], 1),
                    "tokens": s["tokens"]} for lm, s in sums.items()}
        return {"compression_type": self.args.compression_type, "epochs": self.args.epochs,
                "eval_examples": len(self.eval_set), "lms": lms,
                "trainable_parameters": sum(t.numel() for d in trainable_state(self.model).values()
                                            for t in d.values())}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        exp = Experiment(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        code = exp.run()
    except (FileExistsError, FileNotFoundError, StorageError) as e:  # a busy or damaged save_dir, or a collision
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if exp.ckpt:
            exp.ckpt.close()
    if code == PREEMPTED_EXIT_CODE:
        exit_preempted()
    return code


if __name__ == "__main__":
    sys.exit(main())
