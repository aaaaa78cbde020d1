"""What bit-exact DDP resumes cost: step time and resume exactness of three DDP setups, side by side.

    python benchmarks/ddp_exactness.py --quick                   # 3 ranks, gloo on CPU, ~2 minutes on 2 cores
    python benchmarks/ddp_exactness.py --nproc 4 --out runs/ddp_exactness.json

The script relaunches itself under `torch.distributed.run` (gloo backend, OMP_NUM_THREADS=1 unless set).

Why: DDP's first backward in each process reduces one bucket holding every parameter, later ones use buckets
rebuilt in gradient-ready order, and a value's position in its bucket decides the order in which the ring
all-reduce adds the ranks' copies. A resumed process starts over with the first layout, so at 3+ ranks it
parts bitwise from the uninterrupted run. Modes:
  plain                   default DDP (inexact resume at 3+ ranks)
  exact_ddp               dcp_resume.exact_ddp: DDP(find_unused_parameters=True), buckets never rebuilt
  exact_gradient_sync     dcp_resume.exact_gradient_sync: a comm hook that all-reduces each gradient alone

Models: `latentwire/train.py --tiny`'s LatentWire (0.1 M params, 37 tensors) and a 12-layer transformer LM
(24 M params, 149 tensors): the hook pays one all-reduce's latency per tensor, plain DDP one per bucket.

Measured: ms per training step (forward, backward, grad clip, AdamW step), the median over interleaved rounds
(each round runs every mode, rotated order, so machine noise hits all modes alike; every round in the JSON),
after warm-up steps; per round the slowest rank's mean. Exactness: K steps uninterrupted vs k steps, then a
new DDP wrapper (as a new process builds) around a fresh model loaded with the weights and AdamW state, then
K - k more steps; "bit-exact" means every final weight is bitwise equal on every rank.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dcp_resume import exact_ddp, exact_gradient_sync  # noqa: E402

MODES = ("plain", "exact_ddp", "exact_gradient_sync")
ARGV_ENV = "DDP_EXACTNESS_ARGV"  # the launcher's flags, handed to the workers


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "exact_ddp":
        return exact_ddp(model)
    return exact_gradient_sync(DDP(model)) if mode == "exact_gradient_sync" else DDP(model)


class TransformerLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.1, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        return self.head(self.norm(x))


class LatentWireTask:
    """The model and batches of `latentwire/train.py --tiny` (8 synthetic examples per rank per step)."""
    name = "latentwire_tiny"

    def __init__(self, a, rank: int, world: int):
        from latentwire.data import collate, load_examples
        from latentwire.model import ModelConfig
        self.cfg = ModelConfig(compression="telepathy", d_model=32, n_layers=1, num_latents=4, d_z=32,
                               max_context_bytes=96, max_answer_tokens=8)
        self.examples = load_examples("synthetic", 64, seed=0)
        self.collate, self.rank, self.world, self.bs = collate, rank, world, 8
        self.batches: dict[int, dict] = {}  # collated once, outside the timed steps

    def build(self) -> nn.Module:
        from latentwire.model import LatentWire
        torch.manual_seed(0)
        return LatentWire(self.cfg)

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        start = (step * self.world + self.rank) * self.bs % len(self.examples)
        if start not in self.batches:
            picked = [self.examples[(start + j) % len(self.examples)] for j in range(self.bs)]
            self.batches[start] = self.collate(picked, self.cfg.max_context_bytes, self.cfg.max_answer_tokens)
        return model(self.batches[start])["loss"]


class TransformerTask:
    """A 12-layer transformer LM on random tokens (different per rank and step)."""

    def __init__(self, a, rank: int, world: int):
        self.vocab, self.d, self.layers, self.seq, self.bs = 4096, a.d_model, a.layers, a.seq, a.batch
        self.rank, self.world = rank, world
        self.name = f"transformer_{a.layers}L_d{a.d_model}"

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return TransformerLM(self.vocab, self.d, self.layers, self.seq)

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step * self.world + self.rank)
        tokens = torch.randint(self.vocab, (self.bs, self.seq + 1), generator=g)
        return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


class Run:
    """One training run: model (fresh, or loaded from `state`), DDP wrapper in `mode`, AdamW."""

    def __init__(self, task, mode: str, rank: int, state: dict | None = None):
        model = task.build()
        if state is not None:
            model.load_state_dict(state["model"])
        self.task, self.rank, self.ddp = task, rank, wrap(model, mode)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.01)
        if state is not None:
            self.opt.load_state_dict(state["opt"])
        self.step_no = 0 if state is None else state["step"]

    def step(self) -> None:
        torch.manual_seed(1000 * self.step_no + self.rank)  # dropout: the same per step, resumed or not
        self.task.loss(self.ddp, self.step_no).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1

    def train(self, steps: int) -> "Run":
        for _ in range(steps):
            self.step()
        return self

    def state(self) -> dict:
        return copy.deepcopy({"model": self.ddp.module.state_dict(), "opt": self.opt.state_dict(),
                              "step": self.step_no})


def exactness(task, mode: str, rank: int, total: int, at: int) -> dict:
    full = Run(task, mode, rank).train(total)
    saved = Run(task, mode, rank).train(at).state()
    resumed = Run(task, mode, rank, saved).train(total - at)  # a new DDP object: its reducer starts afresh
    a, b = full.ddp.module.state_dict(), resumed.ddp.module.state_dict()
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    stats = torch.tensor([len(differ), max([(a[n] - b[n]).abs().max().item() for n in differ], default=0.0)],
                         dtype=torch.float64)
    dist.all_reduce(stats, dist.ReduceOp.MAX)
    return {"bit_exact": stats[0].item() == 0, "tensors_differing_max_rank": int(stats[0].item()),
            "max_abs_diff": stats[1].item(), "steps": total, "resumed_after": at}, a


def timing(task, rank: int, warmup: int, rounds: int, steps: int) -> dict:
    runs = {m: Run(task, m, rank).train(max(2, warmup)) for m in MODES}  # plain rebuilds buckets at step 2
    per_round = {m: [] for m in MODES}
    for r in range(rounds):
        for m in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            dist.barrier()
            t0 = time.perf_counter()
            runs[m].train(steps)
            ms = torch.tensor([(time.perf_counter() - t0) / steps * 1e3])
            dist.all_reduce(ms, dist.ReduceOp.MAX)  # the slowest rank's mean step
            per_round[m].append(ms.item())
    model = runs[MODES[0]].ddp.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"ms_per_step": {m: statistics.median(v) for m, v in per_round.items()}, "rounds_ms": per_round,
            "trainable_params": sum(p.numel() for p in trainable), "trainable_tensors": len(trainable)}


def worker(a) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results, rows = [], []
    tasks = {"latentwire": LatentWireTask, "transformer": TransformerTask}
    for key in a.models:
        task = tasks[key](a, rank, world)
        scale = a.transformer_scale if key == "transformer" else 1.0  # its steps are ~100x longer
        steps = max(2, round(a.steps * scale))
        t0 = time.perf_counter()
        exact, final = {}, {}
        for m in MODES:
            exact[m], final[m] = exactness(task, m, rank, a.exact_steps, a.exact_steps // 2)
            # sanity: each mode trains the same model as plain, up to rounding
            exact[m]["max_abs_diff_vs_plain"] = max((final[m][n] - final["plain"][n]).abs().max().item()
                                                    for n in final[m])
        del final
        t1 = time.perf_counter()
        tm = timing(task, rank, a.warmup, a.rounds, steps)
        t2 = time.perf_counter()
        base = tm["ms_per_step"]["plain"]
        for m in MODES:
            ms = tm["ms_per_step"][m]
            rows.append((m, task.name, ms, ms / base, "yes" if exact[m]["bit_exact"] else "no"))
        results.append({"model": task.name, "trainable_params": tm["trainable_params"],
                        "trainable_tensors": tm["trainable_tensors"], "timed_steps_per_round": steps,
                        "ms_per_step": tm["ms_per_step"], "rounds_ms": tm["rounds_ms"], "exactness": exact,
                        "exactness_s": t1 - t0, "timing_s": t2 - t1})
    if rank == 0:
        print(f"\nDDP exactness benchmark: {world} ranks, gloo, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s)/rank, warmup {a.warmup}, {a.rounds} rounds x "
              f"{a.steps} steps ({max(2, round(a.steps * a.transformer_scale))} for the transformer), resume check {a.exact_steps} steps "
              f"resumed after {a.exact_steps // 2}\n")
        for r in results:
            print(f"- {r['model']}: {r['trainable_params'] / 1e6:.2f} M trainable params in "
                  f"{r['trainable_tensors']} tensors")
        print("\n| mode | model | ms/step | ratio vs plain | resume bit-exact |\n|---|---|---:|---:|---|")
        for m, name, ms, ratio, ok in rows:
            print(f"| {m} | {name} | {ms:.2f} | {ratio:.3f} | {ok} |")
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump({"world_size": world, "backend": "gloo", "torch": torch.__version__,
                           "args": vars(a), "results": results}, f, indent=2)
            print(f"\nJSON: {a.out}")
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=3, help="ranks (3+ shows plain DDP's inexact resume)")
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps (~2 minutes on 2 cores)")
    p.add_argument("--models", nargs="+", choices=("latentwire", "transformer"),
                   default=["latentwire", "transformer"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode per round (latentwire)")
    p.add_argument("--transformer-scale", type=float, default=0.25, help="its share of --steps")
    p.add_argument("--exact-steps", type=int, default=6, help="K; the resume happens after K // 2")
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="transformer sequences per rank per step")
    p.add_argument("--out", help="write the results as JSON here")
    is_worker = sys.argv[1:] == ["--worker"]
    argv = json.loads(os.environ[ARGV_ENV]) if is_worker else sys.argv[1:]  # torchrun would misread --nproc
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.rounds, a.steps, a.exact_steps = 2, 3, 12, 2
    if is_worker:
        worker(a)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), ARGV_ENV: json.dumps(argv)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           os.path.abspath(__file__), "--worker"]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    print(f"wall time {time.perf_counter() - t0:.1f} s ({a.nproc} ranks, rc {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
