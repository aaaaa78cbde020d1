"""save_dir on an S3-compatible object store, through fsspec/s3fs, with the local guarantees.

The endpoint is moto's S3 emulator on 127.0.0.1 (tests/s3_emulator.py), not AWS. Every process these
tests start loads tests/netguard (PYTHONPATH), which refuses connections to anything but 127.0.0.1; the
test process installs the same guard for the module.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import torch  # noqa: E402
from common import Tiny  # noqa: E402
from conftest import ROOT, torchrun  # noqa: E402
from helpers import assert_same  # noqa: E402
import s3_emulator  # noqa: E402
from trainer_runs import BASE, final_state, launcher, train, train_until_killed  # noqa: E402

from dcp_resume import CheckpointManager, CorruptCheckpointError, SaveDirLockedError, StorageError  # noqa: E402
from latentwire.exactness import COMPARED  # noqa: E402

pytestmark = pytest.mark.slow  # integration: a moto S3 server and real trainer runs against it


@pytest.fixture(scope="module")
def s3():
    with s3_emulator.running() as emu:
        yield emu


def checkpoints(fs, url: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("s3://"), detail=False)
                  if p.rsplit("/", 1)[-1].startswith(("step_", "epoch")))


def tiny_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_two_rank_training_on_s3_killed_and_resumed_is_bit_identical(s3, reference_run):
    url = f"s3://{s3.new_bucket()}/run1"
    cmd = launcher(2, "torchrun")
    ref = reference_run(2, "torchrun")  # local disk, sync, never interrupted
    out = train_until_killed(cmd, *BASE, "--save_dir", url, kill_after=f"Saved checkpoint: {url}/step_3")
    assert "Training complete" not in out
    resumed = train(cmd, *BASE, "--save_dir", url, "--auto_resume").stdout
    assert f"Resuming from checkpoint: {url}/step_" in resumed

    (a, meta_a), (b, meta_b) = final_state(str(ref)), final_state(url)
    assert meta_a["kind"] == meta_b["kind"] == "final" and meta_a["step"] == meta_b["step"]
    assert meta_b["world_size"] == 2
    for key in COMPARED:
        assert_same(a[key], b[key], key)
    # Retention on the bucket: keep_last_n=3 (the default) plus nothing else; the final one is among them.
    kept = checkpoints(s3.fs(), url)
    assert len(kept) == 3 and f"step_{meta_b['step']}" in kept, kept


def test_interrupted_upload_never_counts_as_complete(s3, tmp_path):
    url = f"s3://{s3.new_bucket()}/run"
    proc = torchrun(2, "kill_before_commit.py", url, tmp_path, check=False, env=s3.env)
    assert proc.returncode != 0
    fs = s3.fs()
    half = url.removeprefix("s3://") + "/step_2"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(half))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(names) and "metadata.json" not in names

    mgr = CheckpointManager(url, verbose=False, enable_preemption_handling=False)
    assert mgr.find_latest_checkpoint() == f"{url}/step_1"
    model = Tiny()
    mgr.load_checkpoint(state={"model": model})
    assert_same(torch.load(tmp_path / "step1.pt"), dict(model.state_dict()))
    mgr.save_checkpoint({"model": model}, step=3)  # the writer's first save removes the leftover prefix
    assert checkpoints(fs, url) == ["step_1", "step_3"]
    mgr.close()


def test_discovery_retention_and_a_corrupt_object(s3, caplog):
    url = f"s3://{s3.new_bucket()}/run"
    fs = s3.fs()
    with CheckpointManager(url, keep_last_n=2, verbose=False, enable_preemption_handling=False) as mgr:
        saved = {}
        for step in (1, 2, 3):
            state = tiny_state(step)
            mgr.save_checkpoint(state, step=step)
            saved[step] = {k: v.clone() for k, v in state["model"].state_dict().items()}
        assert checkpoints(fs, url) == ["step_2", "step_3"]  # retention ran after step_3's commit

    # A prefix holding shards but no metadata.json (an upload that never committed) is not a checkpoint.
    bucket_path = url.removeprefix("s3://")
    for obj in fs.find(f"{bucket_path}/step_3"):
        if not obj.endswith("/metadata.json"):
            fs.copy(obj, obj.replace("/step_3/", "/step_9/"))
    reader = CheckpointManager(url, verbose=False, enable_preemption_handling=False)
    assert reader.find_latest_checkpoint() == f"{url}/step_3"

    # Flip one byte of step_3's shard (same size): detected by its content hash, resume falls back.
    shard = f"{bucket_path}/step_3/state/__0_0.distcp"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    assert reader.find_latest_checkpoint() == f"{url}/step_3"  # cheap: the shard is first read by the load
    model = Tiny()
    reader.load_checkpoint(state={"model": model})
    assert "step_3" in caplog.text and "state/__0_0.distcp content hash mismatch" in caplog.text
    assert reader.loaded_path == f"{url}/step_2"
    assert_same(saved[2], dict(model.state_dict()))
    named = CheckpointManager(url, verbose=False, enable_preemption_handling=False)
    with pytest.raises(CorruptCheckpointError, match="step_3 fails verification: state/__0_0.distcp"):
        named.load_checkpoint(f"{url}/step_3", state={"model": Tiny()})

    # The command line takes the same URL (endpoint here from --storage-options only).
    cli = [sys.executable, "-m", "dcp_resume.cli"]
    opts = ["--storage-options", json.dumps({"endpoint_url": s3.endpoint})]
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    latest = subprocess.run(cli + ["latest", url] + opts, capture_output=True, text=True, env=env, timeout=120)
    assert (latest.returncode, latest.stdout.strip()) == (0, f"{url}/step_2")
    verify = subprocess.run(cli + ["verify", url] + opts, capture_output=True, text=True, env=env, timeout=120)
    assert verify.returncode == 1
    assert "BAD  step_3/state/__0_0.distcp: content hash mismatch" in verify.stdout
    assert "OK   step_2" in verify.stdout and "INCOMPLETE  step_9" in verify.stdout
    missing = subprocess.run(cli + ["ls", "s3://no-such-bucket/run"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "dcp-resume: error: s3://no-such-bucket/run: bucket no-such-bucket does not exist or these credentials "
        "cannot see it. Create it first (e.g. `aws s3 mb s3://no-such-bucket`) or fix the URL"]


def test_second_writer_on_the_same_bucket_prefix_is_refused(s3):
    url = f"s3://{s3.new_bucket()}/run"
    with CheckpointManager(url, verbose=False, enable_preemption_handling=False) as mgr:
        mgr.save_checkpoint(tiny_state(0), step=1)  # takes the lock with a conditional PUT
        code = (f"import torch; from dcp_resume import CheckpointManager\n"
                f"CheckpointManager({url!r}, enable_preemption_handling=False, lock_wait_s=0)"
                ".save_checkpoint({'w': torch.zeros(2)}, step=2)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode != 0
        assert SaveDirLockedError.__name__ in proc.stderr and f"{url} is in use by another writer" in proc.stderr
    assert not s3.fs().exists(url.removeprefix("s3://") + "/.dcp-resume.lock")  # released by close()


def test_bad_url_or_missing_bucket_is_one_clear_error(s3, tmp_path):
    mgr = CheckpointManager("s3://no-such-bucket/run")  # no I/O when built: the bucket is checked at first use
    for first_use in (mgr.start_run, mgr.find_latest_checkpoint, lambda: mgr.save_checkpoint({"w": 1}, step=1)):
        with pytest.raises(StorageError, match=r"save_dir s3://no-such-bucket/run: bucket no-such-bucket does not "
                                               r"exist or these credentials cannot see it"):
            first_use()
    with pytest.raises(StorageError, match=r"save_dir nosuchscheme://x/run: cannot open this URL \(Protocol not "
                                           r"known: nosuchscheme\)"):
        CheckpointManager("nosuchscheme://x/run")
    with pytest.raises(ValueError, match="storage_options were given but save_dir="):
        CheckpointManager(tmp_path, storage_options={"anon": True})
    proc = subprocess.run([sys.executable, "latentwire/train.py", "--tiny", "--save_dir", "s3://no-such-bucket/r"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: save_dir s3://no-such-bucket/r: bucket no-such-bucket does not exist or these credentials cannot "
        "see it. Create it first (e.g. `aws s3 mb s3://no-such-bucket`) or fix the URL"]


def test_storage_options_reach_fsspec_and_are_never_recorded(s3, tmp_path):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/run"
    secret = "SECRET-value-never-to-be-written"
    options = {"key": "testing", "secret": secret, "client_kwargs": {"endpoint_url": s3.endpoint}}
    proc = train([sys.executable, "latentwire/train.py"], "--tiny", "--samples", "16", "--batch_size", "8",
                 "--epochs", "1", "--save_dir", url, "--storage_options", json.dumps(options),
                 extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})  # only the options reach the emulator
    assert f"Saved checkpoint: {url}/step_2" in proc.stdout
    assert secret not in proc.stdout + proc.stderr
    fs = s3.fs()
    objects = fs.find(bucket)
    assert any(o.endswith("/metadata.json") for o in objects)
    for obj in objects:
        assert secret.encode() not in fs.cat_file(obj), obj
    config = json.loads(fs.cat_file(f"{bucket}/run/step_2/config.json"))
    assert config["storage_options"] == {"key": "<not recorded>", "secret": "<not recorded>",
                                         "client_kwargs": "<not recorded>"}


def test_any_fsspec_url_works_in_process_memory_store():
    """memory:// (fsspec's in-process store): the path for schemes without buckets or conditional PUTs."""
    import fsspec

    url = "memory://dcp-resume-test/run"
    with CheckpointManager(url, keep_last_n=1, verbose=False, enable_preemption_handling=False) as mgr:
        for step in (1, 2):
            state = tiny_state(step)
            mgr.save_checkpoint(state, step=step, is_best=step == 1)
        assert fsspec.filesystem("memory").exists("/dcp-resume-test/run/.dcp-resume.lock")
        model = Tiny()
        mgr.load_checkpoint(state={"model": model})
        assert_same(dict(state["model"].state_dict()), dict(model.state_dict()))
        names = sorted(p.rsplit("/", 1)[-1] for p in fsspec.filesystem("memory").ls("/dcp-resume-test/run", detail=False))
        assert names == [".dcp-resume.lock", "step_1", "step_2"]  # keep_last_n=1 plus the best
    assert not fsspec.filesystem("memory").exists("/dcp-resume-test/run/.dcp-resume.lock")
