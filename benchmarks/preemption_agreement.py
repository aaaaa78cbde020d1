"""Cost of the per-step preemption agreement (one int32 MAX all-reduce on the gloo group).

    torchrun --nproc_per_node 2 benchmarks/preemption_agreement.py [--steps 2000]

Prints the median and p90 microseconds per agreement, measured on the same group the engine uses.
"""
import argparse
import statistics
import time

import torch.distributed as dist

from dcp_resume.distributed import CommitGroup
from dcp_resume.preemption import agree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    dist.init_process_group("gloo")
    group = CommitGroup(timeout_s=60).group
    for _ in range(50):  # warm up
        agree(False, group)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        agree(False, group)
        times.append((time.perf_counter() - t0) * 1e6)
    if dist.get_rank() == 0:
        times.sort()
        print(f"preemption agreement, world size {dist.get_world_size()}, {a.steps} steps: median "
              f"{statistics.median(times):.0f} us, p90 {times[int(0.9 * len(times))]:.0f} us per step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
