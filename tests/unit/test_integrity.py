"""Content hashes: every file's size and xxh3_64 in metadata.json. A damaged checkpoint is detected; resume
(auto) falls back to the newest one that verifies, with a warning naming the checkpoint and the file; an
explicit path errors naming the file."""
import gc
import json
import pickle
import re
import sys

import pytest
import xxhash
from common import Tiny
from conftest import run
from helpers import flip_byte

from dcp_resume import CheckpointManager, IncompleteCheckpointError, dcp_io, hashing, verified_read
from dcp_resume.errors import CorruptCheckpointError
from dcp_resume.storage import open_storage

SHARD = "state/__0_0.distcp"
HEX = "[0-9a-f]{16}"


@pytest.fixture
def run_dir(tmp_path):
    """step_1 and step_2, each with its own tag so a load shows which one it read. Not incremental, so each
    holds its own files (damage to files checkpoints share: test_incremental.py)."""
    d = tmp_path / "run"
    with CheckpointManager(d, keep_last_n=None, verbose=False, incremental=False) as mgr:
        for step in (1, 2):
            mgr.save_checkpoint({"model": Tiny(), "tag": f"step {step}"}, step=step)
    return d


SHARD_FLIPPED = (rf"{SHARD} content hash mismatch in bytes \d+\.\.\d+ \(xxh3_64 of those bytes is {HEX}, "
                 rf"metadata.json records {HEX}\)")
DAMAGE = {  # how step_2 is damaged -> (what the warning says after "Skipping checkpoint <path>: ", error type)
    "bit flip in a shard": (lambda c: flip_byte(c / SHARD), SHARD_FLIPPED, CorruptCheckpointError),
    "bit flip in DCP .metadata": (lambda c: flip_byte(c / "state/.metadata"),
                                  r"state/.metadata content hash mismatch \(xxh3_64 ", CorruptCheckpointError),
    "truncated shard": (lambda c: (c / SHARD).write_bytes((c / SHARD).read_bytes()[:-100]),
                        rf"size mismatch: {SHARD} is \d+ bytes, metadata.json says \d+", IncompleteCheckpointError),
    "deleted shard": (lambda c: (c / SHARD).unlink(), rf"listed file missing: {SHARD}", IncompleteCheckpointError),
    "garbage metadata.json": (lambda c: (c / "metadata.json").write_text("{not json"),
                              r"metadata.json does not parse \(JSONDecodeError\)", IncompleteCheckpointError),
}


def test_every_file_records_its_size_and_xxh3_64(run_dir):
    ckpt = run_dir / "step_2"
    files = json.loads((ckpt / "metadata.json").read_text())["files"]
    assert set(files) == {"config.json", "training_stats.json", "state/.metadata", SHARD}
    items = files[SHARD].pop("xxh3_64_items")  # a shard also records the hash of each DCP item's bytes
    for rel, info in files.items():
        data = (ckpt / rel).read_bytes()
        assert info == {"size": len(data), "xxh3_64": xxhash.xxh3_64(data).hexdigest()}, rel
    data, ends = (ckpt / SHARD).read_bytes(), 0
    for offset, length, digest in items:  # DCP's items, back to back
        assert offset == ends and digest == xxhash.xxh3_64(data[offset:offset + length]).hexdigest()
        ends = offset + length
    assert ends == len(data)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_detected_auto_resume_falls_back_explicit_errors(run_dir, damage, caplog):
    hurt, reason, error = DAMAGE[damage]
    bad = run_dir / "step_2"
    hurt(bad)
    caplog.set_level("WARNING", logger="dcp_resume")
    mgr = CheckpointManager(run_dir, verbose=False)

    found = mgr.find_latest_checkpoint()  # cheap: a shard's bytes are first read (and checked) by the load
    assert found == str(run_dir / ("step_2" if damage == "bit flip in a shard" else "step_1"))
    if found == str(run_dir / "step_1"):
        assert re.search(rf"Skipping checkpoint {re.escape(str(bad))}: {reason}", caplog.text), caplog.text
    caplog.clear()
    assert mgr.load_checkpoint(found)["tag"] == "step 1" and mgr.loaded_path == str(run_dir / "step_1")
    if found == str(bad):  # found damaged as it loaded: every rank falls back, with the same warning
        assert re.search(rf"Skipping checkpoint {re.escape(str(bad))}: {reason}", caplog.text), caplog.text
    caplog.clear()
    fresh = CheckpointManager(run_dir, verbose=False)
    assert fresh.load_checkpoint()["tag"] == "step 1" and fresh.loaded_metadata["step"] == 1  # auto-resume
    assert re.search(rf"Skipping checkpoint {re.escape(str(bad))}: {reason}", caplog.text), caplog.text

    expected = (rf"^{re.escape(str(bad))} fails verification: {reason}" if error is CorruptCheckpointError
                else rf"^{re.escape(str(bad))} is not a complete checkpoint \({reason}")
    with pytest.raises(error, match=expected):
        CheckpointManager(run_dir, verbose=False).load_checkpoint(str(bad))  # named, not discovered: no fallback
    assert issubclass(error, ValueError)


def test_resume_reads_each_byte_once_and_checks_it(run_dir, monkeypatch):
    """find_latest_checkpoint reads DCP's small index, not the shard; the load reads and hashes the index once,
    and each item once as it reads it, and nothing in a separate pass. A byte flipped after a good load is
    caught by the next one."""
    # A spy (the real function runs; it is only counted): how often bytes are hashed cannot be seen otherwise.
    whole, items = [], []
    real_file, real_digest = hashing.file_digest, hashing.digest
    monkeypatch.setattr(hashing, "file_digest", lambda store, p, *a: whole.append(p) or real_file(store, p, *a))
    monkeypatch.setattr(hashing, "digest", lambda data, *a: items.append(len(data)) or real_digest(data, *a))
    mgr = CheckpointManager(run_dir, verbose=False)
    path = mgr.find_latest_checkpoint()
    assert path == str(run_dir / "step_2") and whole == [str(run_dir / "step_2" / "state/.metadata")]
    whole.clear()
    items.clear()
    mgr.load_checkpoint(path)
    listed = json.loads((run_dir / "step_2" / "metadata.json").read_text())["files"]
    assert sorted(whole) == [str(run_dir / "step_2" / rel) for rel in ("config.json", "training_stats.json")]
    shard_items = sum(1 for _ in listed[SHARD]["xxh3_64_items"])
    assert sum(n == listed["state/.metadata"]["size"] for n in items) == 1  # the index: read once by the load
    assert len(items) - items.count(listed["state/.metadata"]["size"]) == shard_items  # each item once
    assert mgr.load_stats.hashed_bytes >= listed[SHARD]["size"] - 2 * 4096
    flip_byte(run_dir / "step_2" / SHARD)  # rewritten after a good load: the next load sees it
    with pytest.raises(CorruptCheckpointError, match=SHARD_FLIPPED):
        CheckpointManager(run_dir, verbose=False).load_checkpoint(path)  # named: no fallback
    assert mgr.load_checkpoint(path)["tag"] == "step 1"  # what find_latest_checkpoint returned: it falls back


def test_discovery_and_load_parse_the_index_once_and_only_the_same_bytes(run_dir, monkeypatch):
    """find_latest_checkpoint parses and checks DCP's index; the load reuses that object only while the file holds
    the same bytes (the load still hashes it against metadata.json). A rewritten index, even one that checks,
    is parsed again: the object the load uses is always the one its bytes give."""
    parsed = []
    real = dcp_io._SafeMetadata._parse_checked
    monkeypatch.setattr(dcp_io._SafeMetadata, "_parse_checked",
                        staticmethod(lambda path, data: parsed.append(path) or real(path, data)))
    mgr = CheckpointManager(run_dir, verbose=False)
    path = mgr.find_latest_checkpoint()
    assert mgr.load_checkpoint(path)["tag"] == "step 2" and len(parsed) == 1
    assert dcp_io._shared_index == {}  # dropped after the load: an index of a huge model is large

    index = run_dir / "step_2" / "state" / ".metadata"
    meta = dcp_io.read_metadata(open_storage(str(run_dir)), str(index.parent))
    meta.planner_data = {**meta.planner_data, "unused": ("unused",)}  # other bytes, still a valid index
    index.write_bytes(pickle.dumps(meta))
    commit = json.loads((run_dir / "step_2" / "metadata.json").read_text())
    commit["files"]["state/.metadata"] = hashing.file_info(open_storage(str(index)), str(index))
    (run_dir / "step_2" / "metadata.json").write_text(json.dumps(commit))
    parsed.clear()
    assert mgr.find_latest_checkpoint() == path  # the new bytes: parsed, and reused by the load
    assert mgr.load_checkpoint(path)["tag"] == "step 2" and len(parsed) == 1
    parsed.clear()
    assert mgr.find_latest_checkpoint() == path
    flip_byte(index)  # after discovery: the load hashes the bytes, refuses them and falls back
    assert mgr.load_checkpoint(path)["tag"] == "step 1" and mgr.loaded_path == str(run_dir / "step_1")


def test_loads_run_without_the_cyclic_collector_and_restore_its_setting(run_dir, monkeypatch):
    """A load allocates ~10^5 objects that all live until it ends: collections during it free nothing and
    each walks the whole heap. Off during discovery and the load, back as the caller had it afterwards."""
    seen = []
    real = verified_read.VerifiedRead.read_data
    monkeypatch.setattr(verified_read.VerifiedRead, "read_data",
                        lambda self, plan, planner: seen.append(gc.isenabled()) or real(self, plan, planner))
    mgr = CheckpointManager(run_dir, verbose=False)
    assert gc.isenabled()
    mgr.load_checkpoint(mgr.find_latest_checkpoint())
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        flip_byte(run_dir / "step_2" / SHARD)  # loads that fall back or fail leave it as they found it too
        assert mgr.load_checkpoint(mgr.find_latest_checkpoint())["tag"] == "step 1" and not gc.isenabled()
        with pytest.raises(CorruptCheckpointError):
            CheckpointManager(run_dir, verbose=False).load_checkpoint(str(run_dir / "step_2"))
        assert not gc.isenabled() and seen == [False, False, False, False]
    finally:
        gc.enable()


def test_checkpoint_without_hashes_verifies_by_size_with_a_debug_note(run_dir, caplog):
    meta_path = run_dir / "step_2" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {rel: {"size": info["size"]} for rel, info in meta["files"].items()}  # as written before hashes
    meta_path.write_text(json.dumps(meta))
    caplog.set_level("DEBUG", logger="dcp_resume")
    mgr = CheckpointManager(run_dir)  # verbose: debug notes on
    assert mgr.load_checkpoint()["tag"] == "step 2"
    assert (f"{run_dir / 'step_2'}: 4 file(s) carry no content hash (written before dcp-resume recorded them), "
            "checked by size only") in caplog.text
    assert "Skipping" not in caplog.text


def test_a_hash_this_version_does_not_know_is_said_not_silently_skipped(run_dir, caplog):
    meta_path = run_dir / "step_2" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {rel: {"size": info["size"], "blake9": "00"} for rel, info in meta["files"].items()}
    meta_path.write_text(json.dumps(meta))
    caplog.set_level("WARNING", logger="dcp_resume")
    assert CheckpointManager(run_dir).load_checkpoint()["tag"] == "step 2"
    assert (f"{run_dir / 'step_2'}: 4 file(s) carry only hashes this dcp-resume does not know (blake9), checked by "
            "size only: upgrade dcp-resume to check their contents") in caplog.text
    verify = run([sys.executable, "-m", "dcp_resume.cli", "verify", str(run_dir / "step_2")])
    assert ("4 without a recorded hash checked by size (they record blake9, unknown to this dcp-resume: upgrade it "
            "to check their contents)") in verify.stdout


def test_changing_the_recorded_hash_keeps_old_checkpoints_checked_by_content(run_dir, monkeypatch):
    """The registry is keyed by metadata.json's key: after a switch of the algorithm new saves record, a
    checkpoint that records xxh3_64 is still checked by its bytes, not downgraded to sizes."""
    monkeypatch.setitem(hashing.ALGORITHMS, "xxh128", xxhash.xxh3_128)
    monkeypatch.setattr(hashing, "RECORDED", "xxh128")
    mgr = CheckpointManager(run_dir, keep_last_n=None, verbose=False)
    mgr.save_checkpoint({"model": Tiny(), "tag": "step 3"}, step=3)
    mgr.close()
    new = json.loads((run_dir / "step_3" / "metadata.json").read_text())["files"][SHARD]
    assert set(new) == {"size", "xxh128", "xxh128_items"} and len(new["xxh128"]) == 32
    flip_byte(run_dir / "step_2" / SHARD)
    with pytest.raises(CorruptCheckpointError, match=r"in bytes \d+\.\.\d+ \(xxh3_64 of those bytes"):
        CheckpointManager(run_dir).load_checkpoint(str(run_dir / "step_2"))
    flip_byte(run_dir / "step_3" / SHARD)
    with pytest.raises(CorruptCheckpointError, match=r"in bytes \d+\.\.\d+ \(xxh128 of those bytes"):
        CheckpointManager(run_dir).load_checkpoint(str(run_dir / "step_3"))


def test_saving_over_a_corrupt_checkpoint_replaces_it(run_dir, caplog):
    """Resumed from step_1 after step_2 failed its hashes, the run saves step_2 again: the corrupt one is
    replaced (with a warning) instead of blocking the save as an existing committed checkpoint."""
    flip_byte(run_dir / "step_2" / SHARD)
    caplog.set_level("WARNING", logger="dcp_resume")
    with CheckpointManager(run_dir, keep_last_n=None, verbose=False) as mgr:
        assert mgr.load_checkpoint()["tag"] == "step 1"
        mgr.save_checkpoint({"model": Tiny(), "tag": "step 2 again"}, step=2)
    assert re.search(rf"Replacing checkpoint {re.escape(str(run_dir / 'step_2'))}, which fails verification: "
                     rf"{SHARD} content hash mismatch", caplog.text), caplog.text
    assert CheckpointManager(run_dir, verbose=False).load_checkpoint()["tag"] == "step 2 again"


def test_cli_latest_skips_a_corrupt_checkpoint(run_dir):
    flip_byte(run_dir / "step_2" / SHARD)
    out = run([sys.executable, "-m", "dcp_resume.cli", "latest", str(run_dir)])
    assert out.stdout.strip() == str(run_dir / "step_1")
    assert f"Skipping checkpoint {run_dir / 'step_2'}: {SHARD} content hash mismatch" in out.stderr
