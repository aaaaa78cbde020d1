"""The trainer's promise: killed with SIGKILL mid-epoch and resumed with --auto_resume, a run ends
bit-identical to one that never stopped (model, optimizer, scheduler, data position, counters), with
incremental checkpoints: the frozen LMs are linked from earlier checkpoints, not written again."""
import json

import pytest
from helpers import assert_same
from trainer_runs import BASE, final_state, launcher, train, train_until_killed

from dcp_resume import dcp_io
from dcp_resume.storage import open_storage
from latentwire.exactness import COMPARED

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


@pytest.mark.parametrize("nproc,kind,extra", [(1, "python", []), (2, "torchrun", []), (2, "torchrun", ["--fsdp"])],
                         ids=["python", "torchrun_ddp", "torchrun_fsdp2"])
def test_kill9_mid_epoch_then_auto_resume_is_bit_identical(tmp_path, nproc, kind, extra, checker, reference_run):
    cmd = launcher(nproc, kind)
    flags = BASE + extra
    ref, run = reference_run(nproc, kind, *extra), tmp_path / "run"  # sync reference; the killed run saves async
    # 48 samples / (4 x nproc) per step: step_3 is mid-epoch at either world size.
    out = train_until_killed(cmd, *flags, "--save_dir", run, kill_after=f"Saved checkpoint: {run}/step_3")
    assert "Training complete" not in out
    resumed = train(cmd, *flags, "--save_dir", run, "--auto_resume").stdout
    assert f"Resuming from checkpoint: {run}/step_" in resumed

    (a, meta_a), (b, meta_b) = final_state(ref), final_state(run)
    assert meta_a["kind"] == meta_b["kind"] == "final" and meta_a["step"] == meta_b["step"]
    for key in COMPARED:
        assert_same(a[key], b[key], key)
    assert a["counters"]["epoch"] == 2 and a["counters"]["world_size"] == nproc
    assert checker(run).returncode == 0
    final = run / f"step_{meta_b['step']}"
    index = dcp_io.read_metadata(open_storage(final), str(final / "state"))
    stored = {i.fqn: where.relative_path for i, where in index.storage_data.items()}
    frozen = [fqn for fqn in stored if fqn.startswith(("model.lm_llama.", "model.lm_qwen."))]
    assert frozen and all(stored[f].startswith("ref.") for f in frozen)  # linked from an earlier checkpoint
    assert all(not p.startswith("ref.") for f, p in stored.items() if f.startswith("model.adapter_"))
    configs = [json.load(open(d / f"step_{meta_a['step']}" / "config.json")) for d in (ref, run)]
    assert [c["async_save"] for c in configs] == [False, True]
    log = (run / "logs" / "train.log").read_text()
    assert log.count("Resuming from checkpoint:") == 1 and log.count("Training complete") == 1
