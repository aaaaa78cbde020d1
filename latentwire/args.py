"""train.py's command line: the established resume flags (README.md) plus the trainer's own."""
from __future__ import annotations

import argparse
import os

from dcp_resume.storage import open_storage, options_from_json

from .model import COMPRESSIONS


EXAMPLES = """examples:
  python latentwire/train.py --epochs 10 --save_dir runs/exp1 --save_every 100
  python latentwire/train.py --auto_resume --save_dir runs/exp1          # continue where it stopped
  python latentwire/train.py --resume_from runs/exp1/step_1500 --batch_size 32
  torchrun --nproc_per_node 8 latentwire/train.py --auto_resume --save_dir runs/exp1
  accelerate launch --multi_gpu --num_processes 2 latentwire/train.py --auto_resume --save_dir runs/exp1

exit codes: 0 finished, 143 preempted (resumable), anything else failed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentwire/train.py", description="Train LatentWire with exact resume.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and schedule")
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--batch_size", type=int, default=8, help="per rank")
    g.add_argument("--samples", type=int, default=None, help="use the first N examples")
    g.add_argument("--dataset", default="synthetic",
                   help="'synthetic', 'squad' (SQuAD v1.1 through Hugging Face datasets, cached or reachable) or a "
                        "SQuAD-v1 .json/.jsonl PATH")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup_steps", type=int, default=5)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--compression", choices=COMPRESSIONS, default="telepathy")
    g.add_argument("--tiny", action="store_true", help="a much smaller model, for tests and smoke runs")
    for lm, family in (("llama", "Llama"), ("qwen", "Qwen2")):
        g.add_argument(f"--{lm}_model", metavar="DIR", default=None,
                       help=f"a local Hugging Face {family} model directory (weights and tokenizer, loaded with "
                            f"from_pretrained, never downloaded) for the frozen {lm} LM; default: a small "
                            f"{family} randomly initialised from a fixed seed")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop (without a final checkpoint) after this global step; for experiments")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save_dir", default="runs/latentwire",
                   help="a directory, or a URL (s3://bucket/run, gs://..., memory://...) written through fsspec")
    c.add_argument("--storage_options", type=options_from_json, default=None, metavar="JSON",
                   help='fsspec options for a URL --save_dir, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; '
                        "credentials otherwise come from the library's environment (AWS_*). Never written to "
                        "config.json or logs")
    c.add_argument("--log_dir", default=None,
                   help="where train.log goes (default: <save_dir>/logs for a local --save_dir; none for a URL)")
    c.add_argument("--save_every", type=int, default=100, help="steps between checkpoints; 0: only epoch/final")
    c.add_argument("--keep_last_n", type=int, default=3)
    c.add_argument("--async_save", dest="async_save", action="store_true", default=True,
                   help="(default) training waits only for a copy of the state; writing and the commit run "
                        "in the background")
    c.add_argument("--no_async_save", dest="async_save", action="store_false", help="wait for whole saves")
    c.add_argument("--no_incremental", dest="incremental", action="store_false", default=True,
                   help="write every tensor at every save (default: the frozen LMs and anything else unchanged "
                        "since the previous checkpoint are linked from it)")
    c.add_argument("--collective_timeout_s", type=float, default=600.0,
                   help="how long any collective (gradient sync, save, preemption agreement) waits for other "
                        "ranks before the run fails with the step named: a hung or dead rank ends the job")
    c.add_argument("--lock_wait_s", type=float, default=30.0,
                   help="how long to wait at start for another holder of the save_dir lock (e.g. `dcp-resume "
                        "prune`) before refusing")
    c.add_argument("--lock_lease_s", type=float, default=60.0,
                   help="the save_dir lock's lease: renewed every lock_lease_s/4 while this job runs; a requeued "
                        "job on other hosts takes the lock over once it goes unrenewed this long")
    c.add_argument("--auto_resume", action="store_true", help="resume from the latest complete checkpoint")
    c.add_argument("--resume_from", metavar="PATH", help="resume from this checkpoint")
    c.add_argument("--no_load_optimizer", action="store_true", help="fresh optimizer state on resume")
    c.add_argument("--no_load_lr_scheduler", action="store_true", help="fresh LR schedule on resume")
    c.add_argument("--reset_epoch", action="store_true",
                   help="on resume keep the weights (and optimizer) but restart epoch, step, data position "
                        "and LR schedule; needs a new --save_dir")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.save_every < 0:
        parser.error(f"--save_every {args.save_every}: must be >= 0 (0 saves only at epoch ends and the end)")
    if args.keep_last_n < 1:
        parser.error(f"--keep_last_n {args.keep_last_n}: must be >= 1")
    if args.auto_resume and args.resume_from:
        parser.error("--auto_resume and --resume_from both given; pick one")
    if args.storage_options is not None and not open_storage(args.save_dir).remote:
        parser.error(f"--storage_options apply to a URL --save_dir (s3://...), not the local path {args.save_dir}")
    for lm in ("llama", "qwen"):
        where = getattr(args, f"{lm}_model")
        if where is not None and not os.path.isfile(os.path.join(where, "config.json")):
            parser.error(f"--{lm}_model {where}: no config.json there; pass a local Hugging Face model directory "
                         "(one save_pretrained() wrote, or a downloaded snapshot)")
    if args.reset_epoch and not (args.auto_resume or args.resume_from):
        parser.error("--reset_epoch only makes sense with --resume_from PATH (or --auto_resume)")
    return args
