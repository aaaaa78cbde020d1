"""Bounded waiting: a rank that dies during a save makes the survivors fail with a clear error naming
the step (within collective_timeout_s), and the previous checkpoint stays the latest."""
import os
import subprocess
import sys

from conftest import ROOT, WORKERS, _free_port

from dcp_resume import CheckpointManager

TIMEOUT_S = 30


def test_rank_killed_during_save_fails_survivor_with_step_named(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(WORKERS, "rank_dies.py"), str(tmp_path), str(TIMEOUT_S)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    # The subprocess bound is the collective timeout plus start-up, not a measured duration.
    out0, err0 = procs[0].communicate(timeout=TIMEOUT_S + 120)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 3, out0 + err0
    assert f"rank 0 error: save of step 2 to {tmp_path}/step_2 failed on rank 0:" in err0
    assert "collective_timeout_s=30s" in err0 and "the previous checkpoint stays the latest" in err0
    mgr = CheckpointManager(tmp_path, verbose=False, enable_preemption_handling=False)
    assert mgr.find_latest_checkpoint() == str(tmp_path / "step_1")
