"""Incremental checkpoints: tensors whose bytes did not change since the checkpoint before the newest are linked
from it, not written; decided by content, so a frozen tensor edited in place is saved anew. The newest two
checkpoints never share a file, so one damaged file costs at most the newest. Every checkpoint stays complete on
its own: it loads, verifies, survives retention of the ones it shares bytes with, and plain DCP reads it without
project code."""
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import run_main
from conftest import ROOT
from helpers import flip_byte
from torch import nn

from dcp_resume import CheckpointManager, dcp_io
from dcp_resume.storage import open_storage
from dcp_resume.incremental import _device_digest, fingerprint

FROZEN_BYTES = 256 * 256 * 4


class Frozen(nn.Module):
    """A frozen 'LM' (256x256, 256 KiB) and a small trainable head: the shape of LatentWire's state."""

    def __init__(self):
        super().__init__()
        self.lm = nn.Linear(256, 256)
        self.lm.requires_grad_(False)
        self.head = nn.Linear(256, 4)


def train(model, opt, steps=1):
    for _ in range(steps):
        model.head(model.lm(torch.randn(8, 256))).square().mean().backward()
        opt.step()
        opt.zero_grad()


def state_files(ckpt) -> dict[str, tuple[int, int]]:
    """state/ file -> (size, inode)."""
    d = os.path.join(ckpt, "state")
    return {n: (os.path.getsize(os.path.join(d, n)), os.stat(os.path.join(d, n)).st_ino) for n in os.listdir(d)}


def plain_dcp_models(ckpts, out_dir) -> list[dict]:
    """Each checkpoint's model as plain DCP reads it, in one process that cannot import dcp_resume."""
    outs = [os.path.join(out_dir, f"plain{i}.pt") for i in range(len(ckpts))]
    code = ("import sys; sys.modules['dcp_resume'] = None\n"
            "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
            + "".join(f"dcp_to_torch_save({os.path.join(c, 'state')!r}, {o!r})\n" for c, o in zip(ckpts, outs)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, timeout=120)
    return [torch.load(o, weights_only=False)["model"] for o in outs]


cli = run_main  # `dcp-resume ...` in this process (the console script itself: tests/unit/test_cli.py)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = Frozen()
    opt = torch.optim.AdamW(model.head.parameters(), lr=0.01)
    return model, opt, tmp_path / "run"


def inodes(ckpt) -> set[int]:
    return {inode for _, inode in state_files(ckpt).values()}


def test_frozen_tensors_are_written_twice_and_the_newest_two_checkpoints_share_no_file(trained, tmp_path):
    """Unchanged bytes are written by the first two saves, then each save links them from the one before the
    newest: the kept checkpoints alternate between two copies, and no two consecutive ones share an inode."""
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        for step in (1, 2, 3, 4):
            train(model, opt)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
    files = {s: state_files(run / f"step_{s}") for s in (1, 2, 3, 4)}
    for s in (1, 2):
        assert files[s]["__0_0.distcp"][0] > FROZEN_BYTES  # the first two saves write everything
    for later, base in ((3, 1), (4, 2)):
        assert files[later]["__0_0.distcp"][0] < FROZEN_BYTES / 4  # only the head, its optimizer state, counters
        assert files[later][f"ref.step_{base}.__0_0.distcp"] == files[base]["__0_0.distcp"]  # a hard link
    for s in (1, 2, 3):
        assert not inodes(run / f"step_{s}") & inodes(run / f"step_{s + 1}"), s  # independent copies
    meta = json.loads((run / "step_3" / "metadata.json").read_text())
    assert meta["files"]["state/ref.step_1.__0_0.distcp"] == \
        json.loads((run / "step_1" / "metadata.json").read_text())["files"]["state/__0_0.distcp"]
    assert meta["fingerprints"]["model.lm.weight@0,0"].startswith("xxh3_64:")
    plain = plain_dcp_models([run / f"step_{s}" for s in (1, 2, 3, 4)], tmp_path)  # no project code
    assert all(torch.equal(p["lm.weight"], model.lm.weight) for p in plain)
    assert torch.equal(plain[-1]["head.weight"], model.head.weight)
    verify = cli("verify", run)
    assert verify.returncode == 0 and "4 checkpoint directories: 4 OK" in verify.stdout, verify.stdout
    copy = tmp_path / "elsewhere" / "step_4"  # one checkpoint copied on its own (cp -r) is complete
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(run / "step_4"), str(copy)], check=True)
    assert cli("verify", copy).returncode == 0
    back = Frozen()
    CheckpointManager(copy.parent).load_checkpoint(str(copy), state={"model": back})
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("edit", ["no_grad", "data"])
def test_a_frozen_tensor_edited_in_place_is_saved_anew(trained, edit):
    """Decided by content: `.data` edits do not even bump the tensor's version counter."""
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        mgr.save_checkpoint({"model": model}, step=1)
        mgr.save_checkpoint({"model": model}, step=2)
        if edit == "no_grad":
            with torch.no_grad():
                model.lm.weight[3, 7] += 1.0
        else:
            model.lm.weight.data[3, 7] += 1.0
        mgr.save_checkpoint({"model": model}, step=3)  # would link the weight from step_1
    assert state_files(run / "step_3")["__0_0.distcp"][0] > FROZEN_BYTES  # the edited weight, written again
    back = Frozen()
    CheckpointManager(run).load_checkpoint(str(run / "step_3"), state={"model": back})
    assert torch.equal(back.lm.weight, model.lm.weight)  # the edit came back
    old = Frozen()
    CheckpointManager(run).load_checkpoint(str(run / "step_1"), state={"model": old})
    assert not torch.equal(old.lm.weight, model.lm.weight)  # step_1 keeps the bytes it had


def test_retention_keeping_one_leaves_a_complete_latest(trained):
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=1, verbose=False) as mgr:
        for step in range(1, 6):
            train(model, opt)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
    assert sorted(n for n in os.listdir(run) if n.startswith("step_")) == ["step_5"]
    assert "ref.step_1.__0_0.distcp" in state_files(run / "step_5")  # step_1 is gone; its bytes are not
    assert cli("verify", run).returncode == 0
    back = Frozen()
    CheckpointManager(run).load_checkpoint(state={"model": back})
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_a_damaged_shared_file_costs_only_the_newest_checkpoint_and_is_never_linked_again(trained, caplog):
    """step_4 links the frozen weight from step_2. Damage to those bytes fails both, by name; resume loads step_3,
    one save older. The run then saves step_4 again: step_2's damaged file is not linked, the bytes are written."""
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        for step in (1, 2, 3, 4):
            train(model, opt)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
    index = dcp_io.read_metadata(open_storage(str(run)), str(run / "step_4" / "state"))
    shared = next(w for w in index.storage_data.values() if w.relative_path == "ref.step_2.__0_0.distcp")
    flip_byte(run / "step_2" / "state" / "__0_0.distcp", at=shared.offset + shared.length // 2)  # a byte both use
    verify = cli("verify", run)
    assert verify.returncode == 1
    assert "BAD  step_2/state/__0_0.distcp: content hash mismatch" in verify.stdout
    assert "BAD  step_4/state/ref.step_2.__0_0.distcp: content hash mismatch" in verify.stdout
    assert "OK   step_3:" in verify.stdout and "OK   step_1:" in verify.stdout
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        assert mgr.load_checkpoint(state={"model": model, "optimizer": opt}) is not None
        assert mgr.loaded_path == str(run / "step_3")
        assert f"Skipping checkpoint {run / 'step_4'}: state/ref.step_2.__0_0.distcp content hash mismatch" \
            in caplog.text
        train(model, opt)
        mgr.save_checkpoint({"model": model, "optimizer": opt}, step=4)
    again = state_files(run / "step_4")
    assert not any(name.startswith("ref.step_2.") for name in again)  # the damaged bytes are not linked
    assert again["__0_0.distcp"][0] > FROZEN_BYTES  # written anew
    assert cli("verify", run / "step_4").returncode == 0
    assert not inodes(run / "step_3") & inodes(run / "step_4")


def test_incremental_false_and_older_checkpoints_write_everything(trained):
    """A base without fingerprints (incremental=False, or written before them) is never linked from."""
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False, incremental=False) as mgr:
        mgr.save_checkpoint({"model": model}, step=1)
        mgr.save_checkpoint({"model": model}, step=2)
    assert "fingerprints" not in json.loads((run / "step_1" / "metadata.json").read_text())
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        for step in (3, 4, 5):
            mgr.save_checkpoint({"model": model}, step=step)
    for step in (2, 3, 4):  # step_3 and step_4 would link from step_1 and step_2
        assert [n for n in state_files(run / f"step_{step}") if n.startswith("ref.")] == []
    assert "ref.step_3.__0_0.distcp" in state_files(run / "step_5")


def test_async_saves_stage_only_what_changed(trained):
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False, async_save=True) as mgr:
        staged = []
        for step in (1, 2, 3):
            train(model, opt)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
            mgr.wait()
            staged.append(mgr._staging.nbytes())
    assert staged[0] > FROZEN_BYTES and staged[1] > FROZEN_BYTES  # the first two saves write everything
    assert staged[2] < FROZEN_BYTES / 4  # the frozen weight's buffer is freed
    assert state_files(run / "step_3")["__0_0.distcp"][0] < FROZEN_BYTES / 4
    back = Frozen()
    CheckpointManager(run).load_checkpoint(state={"model": back})
    assert torch.equal(back.head.weight, model.head.weight) and torch.equal(back.lm.weight, model.lm.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int8, torch.float64])
def test_fingerprints_see_one_flipped_bit_and_name_dtype_and_shape(dtype):
    t = (torch.arange(1000) % 7).to(dtype)
    edited = t.clone()
    edited.view(torch.uint8)[123] ^= 1
    assert fingerprint(t) == fingerprint(t.clone()) != fingerprint(edited)
    assert fingerprint(t) != fingerprint(t.reshape(10, 100))  # same bytes, another shape
    assert fingerprint(t[::2]) == fingerprint(t[::2].contiguous())  # a strided view: its values' bytes


def test_the_device_fingerprint_is_exact_integer_arithmetic():
    """What non-CPU tensors use, run here on CPU: the same bytes give the same digest, whatever the chunking,
    and one flipped bit (anywhere, including the padded tail) changes it."""
    data = torch.randint(0, 256, (10_003,), dtype=torch.uint8)
    digest = _device_digest(data)
    assert len(digest) == 32 and digest == _device_digest(data.clone())
    for where in (0, 5_000, 10_002):
        flipped = data.clone()
        flipped[where] ^= 0x40
        assert _device_digest(flipped) != digest
    view = torch.arange(1001, dtype=torch.float32)[1:].view(torch.uint8)  # 4000 bytes, 4 bytes into its storage
    assert _device_digest(view) == _device_digest(view.clone())  # no whole int64 words in place: copied first


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_tensors_are_fingerprinted_on_the_device_and_reused():
    t = torch.randn(1024, device="cuda")
    assert fingerprint(t).startswith("wsum128:") and fingerprint(t) == fingerprint(t.clone())
    assert _device_digest(t.view(torch.uint8)) == _device_digest(t.cpu().view(torch.uint8))


def test_dcp_resume_copy_makes_a_verified_self_contained_copy(trained, tmp_path):
    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        for step in (1, 2, 3):
            train(model, opt)
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
    dest = tmp_path / "archive" / "step_3"
    r = cli("copy", run / "step_3", dest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Copied {run / 'step_3'} to {dest} (")
    linked = state_files(run / "step_3")["ref.step_1.__0_0.distcp"]
    assert state_files(dest)["ref.step_1.__0_0.distcp"][0] == linked[0]
    assert state_files(dest)["ref.step_1.__0_0.distcp"][1] != linked[1]  # its own file, no longer a link
    assert (dest / "metadata.json").read_bytes() == (run / "step_3" / "metadata.json").read_bytes()
    assert cli("verify", dest).returncode == 0
    again = cli("copy", run / "step_3", dest)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"dcp-resume: error: {dest} already exists; copy to a new directory")
    flip_byte(run / "step_1" / "state" / "__0_0.distcp")  # the bytes step_3 links: the source is damaged now
    bad = cli("copy", run / "step_3", tmp_path / "second")
    assert bad.returncode == 1 and "state/ref.step_1.__0_0.distcp content hash mismatch" in bad.stderr
    assert not (tmp_path / "second").exists()  # nothing written


def test_a_previous_checkpoint_whose_index_is_wrong_is_not_linked_from(trained, caplog):
    """A crafted base (its DCP index, re-hashed into metadata.json, names a shard that is not there) passes
    the size checks; the next save writes everything rather than link from it, and says so."""
    import dataclasses
    import pickle

    from dcp_resume import dcp_io, hashing
    from dcp_resume.storage import open_storage

    model, opt, run = trained
    with CheckpointManager(run, keep_last_n=None, verbose=False) as mgr:
        mgr.save_checkpoint({"model": model}, step=1)
        mgr.save_checkpoint({"model": model}, step=2)
        state = run / "step_1" / "state"
        index = dcp_io.read_metadata(open_storage(state), str(state))
        index.storage_data = {k: dataclasses.replace(v, relative_path="__9_0.distcp")
                              for k, v in index.storage_data.items()}
        (state / ".metadata").write_bytes(pickle.dumps(index))
        meta = json.loads((run / "step_1" / "metadata.json").read_text())
        meta["files"]["state/.metadata"] = hashing.file_info(open_storage(state), str(state / ".metadata"))
        (run / "step_1" / "metadata.json").write_text(json.dumps(meta))
        caplog.set_level("WARNING", logger="dcp_resume")
        mgr.save_checkpoint({"model": model}, step=3)
    assert (f"Writing every tensor of {run / 'step_3'}: {run / 'step_1'}, which it would link from, fails a check "
            "(state/__0_0.distcp: a shard that state/.metadata does not reference") in caplog.text
    assert [n for n in state_files(run / "step_3") if n.startswith("ref.")] == []
    back = Frozen()
    CheckpointManager(run).load_checkpoint(state={"model": back})
    assert torch.equal(back.lm.weight, model.lm.weight)
