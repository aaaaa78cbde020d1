"""Train LatentWire with checkpoints that resume exactly (see `--help`).

Works unchanged under `python latentwire/train.py`, `torchrun --nproc_per_node N latentwire/train.py`
and `accelerate launch --multi_gpu --num_processes N latentwire/train.py`.
"""
from __future__ import annotations

import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentwire.extra import require_transformers  # noqa: E402

require_transformers("latentwire/train.py")  # before anything imports it: one line, not a traceback

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dcp_resume import (  # noqa: E402
    PREEMPTED_EXIT_CODE,
    CheckpointExistsError,
    CheckpointManager,
    CheckpointSaveError,
    RankFailureError,
    ResumableSampler,
    RNGState,
    StorageError,
    exit_preempted,
    rank_failures_named,
)
from dcp_resume.storage import open_storage  # noqa: E402
from latentwire.args import parse_args  # noqa: E402
from latentwire.data import collate, load_examples  # noqa: E402
from latentwire.model import LatentWire, ModelConfig, trainable_state, unwrap  # noqa: E402
from latentwire.progress import TrainState, checkpoint_after_step  # noqa: E402
from latentwire.recipe import TINY, align_lr_with_schedule, rank_seed, seed_everything, warmup_cosine  # noqa: E402
from latentwire.runtime import log_to_file, setup_logging, start, wrap  # noqa: E402

EVAL_SAMPLES = 32


def recorded_config(args) -> dict:
    """The run's flags as config.json records them: storage options may hold credentials, so only their
    names are kept."""
    config = dict(vars(args))
    if config.get("storage_options"):
        config["storage_options"] = {k: "<not recorded>" for k in config["storage_options"]}
    return config


def _same_place(a: str, b: str) -> bool:
    return open_storage(a).identity(a) == open_storage(b).identity(b)


class Trainer:
    """One training run: builds everything from args, resumes if asked, trains, checkpoints."""

    def __init__(self, args):
        self.args = args
        self.rt = start(args.collective_timeout_s)
        self.manager = CheckpointManager(args.save_dir, save_interval=args.save_every,
                                         keep_last_n=args.keep_last_n, config=recorded_config(args), verbose=False,
                                         storage_options=args.storage_options,
                                         async_save=args.async_save,
                                         collective_timeout_s=args.collective_timeout_s,
                                         lock_wait_s=args.lock_wait_s, lock_lease_s=args.lock_lease_s,
                                         incremental=args.incremental,
                                         on_commit=lambda path: self.log.info(f"Saved checkpoint: {path}"))
        self.manager.install_preemption_handlers()  # a SIGTERM while loading becomes a preemption save
        self.resume_path = self._resume_path()
        if self.resume_path is None:  # nothing to load: claim save_dir now (see claim())
            self.manager.start_run(None)
        self.log = setup_logging(self.rt)
        self.examples = load_examples(args.dataset, args.samples, seed=args.seed)
        self.cfg = ModelConfig(compression=args.compression, **(TINY if args.tiny else {}))
        self.cfg.llama.pretrained, self.cfg.qwen.pretrained = args.llama_model, args.qwen_model
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = LatentWire(self.cfg)
        self.vocabs = model.vocabs
        self.model = wrap(model, self.rt, args.fsdp)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=args.lr, weight_decay=0.01)
        self.sampler = ResumableSampler(len(self.examples), args.batch_size, self.rt.rank, self.rt.world_size,
                                        seed=args.seed)
        per_epoch = math.ceil(len(self.examples) / (args.batch_size * self.rt.world_size))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(args.warmup_steps,
                                                                                 args.epochs * per_epoch))
        seed_everything(rank_seed(args.seed, self.rt.rank))
        self.rng = RNGState(self.rt.rank)
        self.progress = TrainState(batch_size=args.batch_size, world_size=self.rt.world_size)
        self.stats = {"steps": [], "evals": []}

    # -- resume ---------------------------------------------------------------------------------
    def _resume_path(self) -> str | None:
        """The checkpoint this run resumes from (--resume_from, or the latest for --auto_resume), or None."""
        a = self.args
        path = self.manager.find_latest_checkpoint() if a.auto_resume else a.resume_from
        if path is not None and a.reset_epoch and _same_place(os.path.dirname(path.rstrip("/")), a.save_dir):
            raise ValueError(f"--reset_epoch restarts step numbers, so its checkpoints would mix with those already "
                             f"in --save_dir {a.save_dir}; pass a new --save_dir")
        return path

    def claim(self) -> None:
        """Claim save_dir (writable, locked, nothing newer than where this run starts), then log into it: a busy,
        damaged or mismatched save_dir is refused in one sentence at start, with nothing in it changed. A fresh
        run claimed it before building anything; a resume claims after its load, which only reads, so that a
        save_dir whose every checkpoint fails to load is left as it was. --reset_epoch starts from step 0."""
        a = self.args
        if self.resume_path is not None:
            self.manager.start_run(None if a.reset_epoch else self.manager.loaded_path)
        if a.log_dir is not None or self.manager.storage.remote:  # a URL save_dir: no log file without --log_dir
            log_to_file(self.log, a.log_dir)
        else:
            log_to_file(self.log, os.path.join(a.save_dir, "logs"), save_dir=a.save_dir)

    def resume(self) -> None:
        a = self.args
        path = self.resume_path
        if path is None:
            self.claim()
            if a.auto_resume:
                self.log.info(f"No checkpoint found to resume in {a.save_dir}; starting fresh")
            return
        state = {"model": self.model}
        if not a.no_load_optimizer:
            state["optimizer"] = self.opt
        if not (a.no_load_lr_scheduler or a.reset_epoch):
            state["scheduler"] = self.sched
        if not a.reset_epoch:
            state.update(counters=None, sampler=self.sampler, rng=self.rng)  # counters=None: take the saved values
        # RNG streams are per rank: after a world-size change they have no owner and are reseeded below.
        loaded = self.manager.load_checkpoint(path, state=state, per_rank_policy="fresh")
        path = self.manager.loaded_path  # a damaged --auto_resume choice falls back to the previous checkpoint
        self.claim()
        if ("scheduler" in state) != ("optimizer" in state):  # one of the two is fresh
            align_lr_with_schedule(self.opt, self.sched)
        if a.reset_epoch:
            self.log.info(f"Resuming from checkpoint: {path} (weights only; --reset_epoch restarts at step 0)")
            return
        prog = self.progress
        saved_batch, saved_world = prog.resume_from(loaded["counters"])
        if not self.rng.restored or saved_world != self.rt.world_size:
            seed_everything(rank_seed(a.seed, self.rt.rank, prog.global_step))
            self.log.warning("World size changed: RNG streams are reseeded (data order stays exact)")
        self._load_stats(path, self.manager.loaded_training_stats)
        self.log.info(f"Resuming from checkpoint: {path} (step {prog.global_step}, epoch {prog.epoch})")
        if (saved_batch, saved_world) != (a.batch_size, self.rt.world_size):
            self.log.info(f"Batch size {saved_batch}x{saved_world} ranks -> {a.batch_size}x"
                          f"{self.rt.world_size} ranks: continuing epoch {prog.epoch} at sample "
                          f"{self.sampler.state_dict()['consumed']} of {len(self.examples)}; no sample is "
                          "repeated or skipped")

    def _load_stats(self, path: str, stats) -> None:
        try:
            self.stats = {"steps": list(stats["steps"]), "evals": list(stats["evals"])}
        except (KeyError, TypeError):
            self.log.warning(f"{path}/training_stats.json unreadable; the metrics history restarts here")

    # -- training -------------------------------------------------------------------------------
    def train(self) -> int:
        a, prog = self.args, self.progress
        if prog.epoch >= a.epochs:
            self.log.info(f"Training already complete at epoch {prog.epoch} (step {prog.global_step}); "
                          "pass a larger --epochs to extend it")
            return 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.rt.device.type == "cuda")
        while prog.epoch < a.epochs:
            self.sampler.set_epoch(prog.epoch)
            bar = tqdm(total=len(self.sampler), desc=f"epoch {prog.epoch + 1}/{a.epochs}",
                       disable=not self.rt.is_main, file=sys.stderr, mininterval=1.0)
            for indices in self.sampler:
                batch = collate([self.examples[i] for i in indices], self.cfg.max_context_bytes,
                                self.cfg.max_answer_tokens, self.vocabs)
                with rank_failures_named(f"step {prog.global_step + 1}", a.collective_timeout_s):
                    with autocast:
                        out = self.model(batch)
                    out["loss"].backward()  # DDP/FSDP collectives: a hung rank times out here
                    torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   a.grad_clip)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                prog.global_step += 1
                prog.samples_seen = prog.epoch * len(self.examples) + self.sampler.state_dict()["consumed"]
                self._trace(batch["ids"])
                self.stats["steps"].append({"step": prog.global_step, "epoch": prog.epoch,
                                            "loss": out["loss"].item(), "lr": self.sched.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{self.stats['steps'][-1]['loss']:.3f}")
                epoch_done = len(self.sampler) == 0
                kind = checkpoint_after_step(self.manager, prog.global_step, epoch_done=epoch_done,
                                             run_done=epoch_done and prog.epoch + 1 >= a.epochs, epoch_end_saved=True)
                if kind == "preemption":
                    bar.close()
                    self.save("preemption")
                    self.log.info(f"Preempted at step {prog.global_step}: exiting with {PREEMPTED_EXIT_CODE}; "
                                  "rerun with --auto_resume to continue")
                    return PREEMPTED_EXIT_CODE
                if kind == "step":
                    self.save("step")
                if a.max_steps and prog.global_step >= a.max_steps:
                    bar.close()
                    self.log.info(f"Stopping at --max_steps {a.max_steps} (no final checkpoint)")
                    return 0
            bar.close()
            prog.epoch += 1
            self.sampler.set_epoch(prog.epoch)
            metric = self.evaluate()
            is_best = prog.best_metric is None or metric < prog.best_metric
            prog.best_metric = metric if is_best else prog.best_metric
            if prog.epoch < a.epochs:
                self.save("epoch", is_best=is_best, metrics={"eval_loss": metric})
        self.save("final", metrics={"eval_loss": metric})
        self.manager.wait()  # the final commit lands before we say we are done
        self.log.info(f"Training complete: {prog.global_step} steps, {prog.epoch} epochs, "
                      f"best eval loss {prog.best_metric:.4f}")
        return 0

    def evaluate(self) -> float:
        ev = self.examples[:EVAL_SAMPLES]
        total = tokens = 0.0
        for i in range(0, len(ev), 16):
            batch = collate(ev[i:i + 16], self.cfg.max_context_bytes, self.cfg.max_answer_tokens, self.vocabs)
            r = (unwrap(self.model) if not self.args.fsdp else self.model).evaluate(batch)
            total += r["llama_loss_sum"] + r["qwen_loss_sum"]
            tokens += r["llama_tokens"] + r["qwen_tokens"]
        metric = total / max(tokens, 1)
        self.stats["evals"].append({"step": self.progress.global_step, "epoch": self.progress.epoch,
                                    "eval_loss": metric})
        self.log.info(f"epoch {self.progress.epoch}: eval loss {metric:.4f}")
        return metric

    def save(self, kind: str, is_best: bool = False, metrics: dict | None = None) -> None:
        prog = self.progress
        state = {"model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                 "sampler": self.sampler, "counters": prog.state_dict(), "rng": self.rng}
        artifacts = trainable_state(self.model) if kind in ("epoch", "final") else None
        self.manager.save_checkpoint(state, step=prog.global_step, epoch=prog.epoch, is_best=is_best,
                                     extra_artifacts=artifacts, kind=kind, metrics=metrics,
                                     best_metric=prog.best_metric, training_stats=self.stats)
        # "Saved checkpoint: <path>" is printed by on_commit once the commit lands (async: later).

    def _trace(self, ids: torch.Tensor) -> None:
        """LATENTWIRE_TRACE=FILE: append 'epoch step rank id,id,...' per step (tests check sample coverage)."""
        trace = os.environ.get("LATENTWIRE_TRACE")
        if trace:
            with open(f"{trace}.rank{self.rt.rank}", "a") as f:
                prog = self.progress
                f.write(f"{prog.epoch} {prog.global_step} {self.rt.rank} {','.join(map(str, ids.tolist()))}\n")

    def close(self, failed: bool = False) -> None:
        """After a failure, the save in flight (if any) is the same failure, or one more: logged, not raised."""
        try:
            self.manager.close()
        except Exception as e:
            if not failed:
                raise
            self.log.error(f"while closing after the failure: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        trainer = Trainer(args)
        trainer.resume()
    except (ValueError, FileNotFoundError, FileExistsError, StorageError) as e:  # bad input or a busy save_dir
        print(f"error: {e}", file=sys.stderr)  # one sentence, no traceback, before any training
        return 2
    try:
        code = trainer.train()
    except (CheckpointSaveError, CheckpointExistsError, RankFailureError) as e:
        print(f"error: {e}", file=sys.stderr)  # the step and the cause; the last commit stays the latest
        trainer.close(failed=True)
        return 1
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    if code == PREEMPTED_EXIT_CODE:
        exit_preempted()
    return code


if __name__ == "__main__":
    sys.exit(main())
