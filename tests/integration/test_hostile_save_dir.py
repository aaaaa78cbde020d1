"""A save_dir with a good step_2 and a damaged newer checkpoint: the files a checkpoint names may be FIFOs,
symlinks to /dev/zero or out of the save_dir, garbage steps or absurdly nested JSON. Every reader skips the
damaged one and falls back to step_2: no hang, no memory blow-up, no traceback, nothing read outside."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from common import Tiny
from conftest import ROOT, WORKERS
from helpers import env

from dcp_resume import CheckpointManager

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals

SHARD = "state/__0_0.distcp"


def _fifo(path):
    os.remove(path)
    os.mkfifo(path)


def _link(target):
    def damage(path):
        os.remove(path)
        os.symlink(target, path)
    return damage


def _metadata(**changes):
    def damage(path):
        meta = json.load(open(path))
        meta.update(changes)
        open(path, "w").write(json.dumps(meta).replace('"__inf__"', "1e400"))
    return damage


def _link_to_outside_copy(path):
    outside = path + ".outside"  # stands for a file outside the save_dir: same bytes, so hashes match
    shutil.move(path, outside)
    os.symlink(outside, path)


class _Alloc:
    """Unpickles as bytearray(n): n bytes allocated by the act of reading the metadata."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return bytearray, (self.n,)


def _bytearray_in_metadata(path):
    """A real DCP .metadata carrying bytearray(2 GiB) in planner_data, re-hashed into metadata.json (a crafted
    checkpoint, not an accident), so only the unpickler's bound stands between it and 2 GiB of memory."""
    import pickle

    from dcp_resume import hashing
    from dcp_resume.dcp_io import read_metadata
    from dcp_resume.storage import open_storage

    state_dir = os.path.dirname(path)
    meta = read_metadata(open_storage(state_dir), state_dir)
    meta.planner_data = {**(meta.planner_data or {}), "x": _Alloc(2 << 30)}
    open(path, "wb").write(pickle.dumps(meta))
    commit = os.path.join(os.path.dirname(state_dir), "metadata.json")
    files = json.load(open(commit))
    files["files"]["state/.metadata"] = hashing.file_info(open_storage(path), path)
    json.dump(files, open(commit, "w"))


def _rewrite_index(change):
    """Apply change(meta) to step_4's DCP .metadata and re-hash it into metadata.json, as a crafted checkpoint
    would: only the engine's checks of the index's contents stand between it and the reader."""
    def damage(path):
        import pickle

        from dcp_resume import hashing
        from dcp_resume.dcp_io import read_metadata
        from dcp_resume.storage import open_storage

        meta = read_metadata(open_storage(path), os.path.dirname(path))
        open(path, "wb").write(pickle.dumps(change(meta, path)))
        commit = os.path.join(os.path.dirname(os.path.dirname(path)), "metadata.json")
        files = json.load(open(commit))
        files["files"]["state/.metadata"] = hashing.file_info(open_storage(path), path)
        json.dump(files, open(commit, "w"))
    return damage


def _victim(index_path):
    """A FIFO outside the save_dir standing for a file there: a reader that opens it blocks (the test's
    deadline catches it), so 'nothing read outside' is checked, not assumed."""
    save_dir = os.path.dirname(os.path.dirname(os.path.dirname(index_path)))
    victim = f"{save_dir}.victim.distcp"
    os.mkfifo(victim)
    return victim, os.path.relpath(victim, os.path.dirname(index_path))


def _shards_at(where):
    def change(meta, path):
        absolute, relative = _victim(path)
        for info in meta.storage_data.values():
            info.relative_path = absolute if where == "absolute" else relative
        return meta
    return change


def _first_tensor(meta):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return next(md for md in meta.state_dict_metadata.values() if isinstance(md, TensorStorageMetadata))


def _huge_shape(meta, path):
    import torch

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = next(md for md in meta.state_dict_metadata.values()
              if isinstance(md, TensorStorageMetadata) and len(md.size) == 2)
    md.size = torch.Size([1 << 20] * 2)
    md.chunks[0].sizes = md.size
    return meta


def _relative_path_int(meta, path):
    next(iter(meta.storage_data.values())).relative_path = 5
    return meta


def _dtype_string(meta, path):
    _first_tensor(meta).properties.dtype = "float32"
    return meta


def _listed_size(value):
    def damage(path):
        meta = json.load(open(path))
        meta["files"][SHARD]["size"] = value
        json.dump(meta, open(path, "w"))
    return damage


def _deep(path):
    open(path, "w").write("[" * 200_000 + "]" * 200_000)


# name -> (file of step_4 to damage, how)
DAMAGE = {
    "metadata_fifo": ("metadata.json", _fifo),
    "metadata_dev_zero": ("metadata.json", _link("/dev/zero")),
    "shard_fifo": (SHARD, _fifo),
    "shard_dev_zero": (SHARD, _link("/dev/zero")),
    "config_dev_zero": ("config.json", _link("/dev/zero")),
    "step_six": ("metadata.json", _metadata(step="six")),
    "step_null": ("metadata.json", _metadata(step=None)),
    "step_list": ("metadata.json", _metadata(step=[4])),
    "step_1e400": ("metadata.json", _metadata(step="__inf__")),
    "nested_200k": ("metadata.json", _deep),
    "shard_link_outside": (SHARD, _link_to_outside_copy),
    "dcp_metadata_bytearray_2g": ("state/.metadata", _bytearray_in_metadata),
    "stats_dev_zero": ("training_stats.json", _link("/dev/zero")),
    "listed_size_string": ("metadata.json", _listed_size("12")),
    "shard_path_absolute": ("state/.metadata", _rewrite_index(_shards_at("absolute"))),
    "shard_path_dotdot": ("state/.metadata", _rewrite_index(_shards_at("relative"))),
    "shard_path_int": ("state/.metadata", _rewrite_index(_relative_path_int)),
    "dtype_string": ("state/.metadata", _rewrite_index(_dtype_string)),
    "tensor_2to40_elements": ("state/.metadata", _rewrite_index(_huge_shape)),
    "index_not_metadata": ("state/.metadata", _rewrite_index(lambda meta, path: {"not": "Metadata"})),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    with CheckpointManager(d, verbose=False, enable_preemption_handling=False) as mgr:
        for step in (2, 4):
            mgr.save_checkpoint({"model": Tiny()}, step=step)
    return d


@pytest.fixture(scope="module")
def probes(base, tmp_path_factory):
    """Each damaged save_dir probed by its own process, all at once, each with a deadline."""
    dirs = {}
    for name, (rel, damage) in DAMAGE.items():
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(base, d, dirs_exist_ok=True)
        damage(str(d / "step_4" / rel))
        dirs[name] = d
    procs = {name: subprocess.Popen([sys.executable, os.path.join(WORKERS, "probe_save_dir.py"), d],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                                    preexec_fn=lambda: _cap_memory(4 << 30)) for name, d in dirs.items()}
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr = "TIMED OUT (a hang)\n" + stderr
        out[name] = (dirs[name], proc.returncode, stdout, stderr)
    return out


def _cap_memory(limit):
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # reading /dev/zero must fail here, not the machine


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_by_every_reader(probes, name):
    d, code, stdout, stderr = probes[name]
    assert code == 0, f"{stdout}\n{stderr[-3000:]}"
    assert f"latest {d}/step_2\n" in stdout and "loaded 2\n" in stdout
    assert "ls rc 0\n" in stdout and "latest rc 0\n" in stdout
    assert "Traceback" not in stderr
    assert f"Skipping checkpoint {d}/step_4" in stdout + stderr  # the damage is named, not silent
    # Named explicitly, step_4 is refused with one of the engine's errors, and verify calls it BAD.
    assert "explicit refused" in stdout and "verify rc 1\n" in stdout, stdout
    assert "inspect rc" in stdout and "export rc 1\n" in stdout and "exported False\n" in stdout, stdout


def test_symlinked_checkpoint_dir_is_never_read_nor_written_through(base, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(base / "step_4", outside)
    meta = json.load(open(outside / "metadata.json"))
    json.dump({**meta, "step": 8}, open(outside / "metadata.json", "w"))
    save_dir = tmp_path / "run"
    shutil.copytree(base, save_dir)
    os.symlink(outside, save_dir / "step_8")
    before = sorted((p.name, p.stat().st_size) for p in outside.rglob("*"))
    with CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False) as mgr:
        assert mgr.find_latest_checkpoint() == f"{save_dir}/step_4"
        mgr.save_checkpoint({"model": Tiny()}, step=8)
    assert sorted((p.name, p.stat().st_size) for p in outside.rglob("*")) == before
    assert not os.path.islink(save_dir / "step_8") and (save_dir / "step_8" / "metadata.json").is_file()


@pytest.mark.parametrize("damage", [_metadata(step="six"), _metadata(step=1e30), _deep], ids=["six", "1e30", "deep"])
def test_a_garbage_step_does_not_stop_new_saves(base, tmp_path, damage):
    save_dir = tmp_path / "run"
    shutil.copytree(base, save_dir)
    damage(str(save_dir / "step_4" / "metadata.json"))
    with CheckpointManager(save_dir, verbose=False, enable_preemption_handling=False, keep_last_n=2) as mgr:
        assert mgr.find_latest_checkpoint() == f"{save_dir}/step_2"
        path = mgr.save_checkpoint({"model": Tiny()}, step=6)
        assert mgr.find_latest_checkpoint() == path


def test_a_checkpoint_named_through_a_symlink_still_loads(base, tmp_path):
    os.symlink(base / "step_4", tmp_path / "latest")
    mgr = CheckpointManager(base, verbose=False, enable_preemption_handling=False)
    mgr.load_checkpoint(str(tmp_path / "latest"), state={"model": Tiny()})
    assert mgr.loaded_metadata["step"] == 4


def test_prune_leaves_a_symlinked_checkpoint_dir_and_its_target_alone(base, tmp_path, capsys):
    from dcp_resume.cli import main

    outside = tmp_path / "outside"
    shutil.copytree(base / "step_2", outside)
    save_dir = tmp_path / "run"
    shutil.copytree(base, save_dir)
    os.symlink(outside, save_dir / "step_1")
    def listing():
        return sorted((str(p), p.stat().st_size) for p in outside.rglob("*"))

    before = listing()
    assert main(["prune", str(save_dir), "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "step_1" not in out and "step_2" in out  # the real older checkpoint goes, the link is not one
    assert os.path.islink(save_dir / "step_1") and listing() == before
