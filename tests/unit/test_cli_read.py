"""`dcp-resume ls / latest / verify / inspect`, the real console script, on a save_dir written by a real 2-rank
(FSDP2) run, with a corrupt checkpoint (step_12: a flipped byte in a shard) and an incomplete one (step_15)."""
import json
import os
import re

import pytest
from cli_helpers import SHARD, cli_many, copy_run, damage, run_main, trained_runs

from dcp_resume import hashing
from latentwire.model import LatentWire, ModelConfig
from latentwire.recipe import TINY

HEX = "[0-9a-f]{16}"
MODEL_KEYS = len(LatentWire(ModelConfig(**TINY)).state_dict())  # the trainer's --tiny model
SUBPROCESS = {  # name -> argv, with {d} the damaged save_dir and {m} the mangled one: the real script
    "ls": ["ls", "{d}"],
    "latest": ["latest", "{d}"],
    "verify": ["verify", "{d}"],
    "inspect": ["inspect", "{d}/epoch1", "--depth", "3"],
}
IN_PROCESS = {  # variants of the commands above, through main() in this process
    "ls_verify": ["ls", "{d}", "--verify"],
    "ls_json": ["ls", "{d}", "--json", "--verify"],
    "ls_quick": ["ls", "{d}", "--quick"],
    "verify_quick": ["verify", "{d}", "--quick"],
    "verify_one_ok": ["verify", "{d}/step_9"],
    "verify_one_incomplete": ["verify", "{d}/step_15"],
    "verify_mangled": ["verify", "{m}"],
    "inspect_json": ["inspect", "{d}/epoch1", "--json"],
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    runs = trained_runs(str(tmp_path_factory.getbasetemp() / "cli_runs"))
    return damage(copy_run(runs["fsdp2_ws2"], tmp_path_factory.mktemp("cli_read") / "run"))


@pytest.fixture(scope="module")
def mangled(damaged, tmp_path_factory):
    """Damage that only sizes and DCP's index show: a truncated shard and a stray one in step_3, a deleted
    shard in step_9."""
    d = copy_run(damaged, tmp_path_factory.mktemp("cli_mangled") / "run")
    shard = os.path.join(d, "step_3", "state", "__1_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with open(os.path.join(d, "step_3", "state", "__7_0.distcp"), "wb") as f:
        f.write(b"\0" * 64)
    os.remove(os.path.join(d, "step_9", SHARD))
    return d


@pytest.fixture(scope="module")
def out(damaged, mangled):
    """Every command run once: the real script (all at once), then the variants in this process."""
    def argv(template):
        return [a.format(d=damaged, m=mangled) for a in template]

    found = dict(zip(SUBPROCESS, cli_many([argv(t) for t in SUBPROCESS.values()])))
    found.update({name: run_main(*argv(t)) for name, t in IN_PROCESS.items()})
    return found


def test_ls_verify_table(out, damaged):
    r = out["ls_verify"]
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line and line.split()[0] in
            ("step_3", "epoch1", "step_9", "step_12", "step_15")}
    assert list(rows) == ["step_3", "epoch1", "step_9", "step_12", "step_15"]  # by step
    assert r.stdout.splitlines()[0].split() == ["NAME", "STEP", "EPOCH", "KIND", "TIME", "(UTC)", "RANKS", "SIZE",
                                                "BEST", "STATUS"]
    assert re.match(r"epoch1 +6 +1 +epoch +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +2 +\d+\.\d MB +best +complete$",
                    rows["epoch1"])
    assert rows["step_9"].endswith("complete  <- latest")
    assert re.search(rf"final .* CORRUPT: {SHARD} content hash mismatch \(xxh3_64 of the file is {HEX}, "
                     rf"metadata.json records {HEX}\)$", rows["step_12"])
    assert re.match(r"step_15 +- +- +- +- +- +\d+\.\d MB +INCOMPLETE: no metadata.json", rows["step_15"])
    assert re.search(r"5 checkpoint directories \(3 complete, 1 corrupt, 1 incomplete\), \d+\.\d MB in total; "
                     r"[\d.]+ [kMGT]?B free on this filesystem", r.stdout)
    assert "latest: step_9, what --auto_resume loads" in r.stdout
    assert "checked: sizes, DCP's index and the content hash of every file (--verify)" in r.stdout
    assert r.stderr == ""  # the skipped checkpoint is in the table, not repeated as a warning


def test_ls_reads_no_shard_by_default_and_says_so(out, damaged, monkeypatch):
    r = out["ls"]  # the real script
    assert r.returncode == 0, r.stderr
    assert re.search(r"^step_12 .* complete  <- latest$", r.stdout, re.M)  # its flipped byte is in a shard
    assert re.search(r"^step_9 .* complete$", r.stdout, re.M)
    assert "latest: step_12, what --auto_resume tries first" in r.stdout
    assert ("checked: sizes, DCP's index and its hash; no shard was read: a resume checks each byte it reads, "
            "`ls --verify` or `dcp-resume verify` hash them all") in r.stdout
    hashed = []  # a spy (the real function runs): which files ls reads in full
    real = hashing.file_digests
    monkeypatch.setattr(hashing, "file_digests", lambda store, p, *a: hashed.append(p) or real(store, p, *a))
    assert run_main("ls", damaged).returncode == 0
    assert hashed and all(p.endswith("/state/.metadata") for p in hashed), hashed


def test_ls_json_has_every_field(out, damaged):
    r = out["ls_json"]
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    rows = {c["name"]: c for c in found["checkpoints"]}
    assert found["latest"] == os.path.join(damaged, "step_9") and found["latest_verified"] is True
    assert found["checks"] == "verify"
    assert found["total_bytes"] == sum(c["size_bytes"] for c in rows.values()) and found["free_bytes"] > 0
    on_disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(damaged, "epoch1"))
                  for f in fs)
    assert rows["epoch1"] == {
        "name": "epoch1", "path": os.path.join(damaged, "epoch1"), "step": 6, "epoch": 1, "kind": "epoch",
        "timestamp": rows["epoch1"]["timestamp"], "world_size": 2, "size_bytes": on_disk, "status": "complete",
        "complete": True, "reason": "", "is_best": True, "best": True, "latest": False}
    assert rows["step_12"]["status"] == "corrupt" and rows["step_12"]["complete"] is True
    assert rows["step_12"]["reason"].startswith(f"{SHARD} content hash mismatch")
    assert rows["step_15"]["status"] == "incomplete" and not rows["step_15"]["complete"]
    assert [c["latest"] for c in found["checkpoints"]].count(True) == 1


def test_ls_quick_marks_latest_by_sizes(out):
    r = out["ls_quick"]
    assert r.returncode == 0
    assert re.search(r"step_12 .* complete  <- latest$", r.stdout, re.M)
    assert "latest: step_12, what --auto_resume tries first" in r.stdout and "checked: sizes only (--quick)" in r.stdout


def test_latest_skips_the_corrupt_one_with_a_warning(out, damaged):
    r = out["latest"]
    assert r.returncode == 0 and r.stdout == os.path.join(damaged, "step_9") + "\n"
    assert re.fullmatch(rf"dcp-resume: warning: Skipping checkpoint {re.escape(damaged)}/step_12: {SHARD} content "
                        rf"hash mismatch \(xxh3_64 of the file is {HEX}, metadata.json records {HEX}\)\n", r.stderr)


def _counts(ckpt) -> tuple[int, int]:
    """(files metadata.json lists, shard files in state/): what verify's OK line and inspect report. A
    trainer checkpoint after the first also holds links to the shards of earlier ones (incremental.py)."""
    listed = json.load(open(os.path.join(ckpt, "metadata.json")))["files"]
    return len(listed), sum(rel.endswith(".distcp") for rel in listed)


def test_verify_save_dir_names_the_bad_file(out, damaged):
    r = out["verify"]
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["OK", "step_3:"], ["OK", "epoch1:"], ["OK", "step_9:"], ["BAD", f"step_12/{SHARD}:"], ["BAD", "step_12:"],
        ["INCOMPLETE", "step_15:"]]
    assert re.fullmatch(rf"BAD  step_12/{SHARD}: content hash mismatch \(xxh3_64 of the file is {HEX}, "
                        rf"metadata.json records {HEX}\)", lines[3])
    files, shards = _counts(os.path.join(damaged, "step_9"))
    assert shards > 2  # step_9 links shards of step_3 (the frozen LMs), next to the 2 its ranks wrote
    assert re.fullmatch(rf"OK   step_9: {files} files, \d+\.\d MB, sizes and content hashes match; DCP index covers "
                        rf"{shards} shard file\(s\)", lines[2])
    assert lines[-1] == "5 checkpoint directories: 3 OK, 1 BAD, 1 incomplete (interrupted saves)"


def test_verify_quick_checks_sizes_only(out, damaged):
    r = out["verify_quick"]
    assert r.returncode == 0, r.stdout  # the flipped byte keeps the size: only hashes see it
    files = _counts(os.path.join(damaged, "step_12"))[0]
    assert f"OK   step_12: {files} files" in r.stdout and "sizes match (--quick: contents not read)" in r.stdout
    assert r.stdout.splitlines()[-1] == "5 checkpoint directories: 4 OK, 0 BAD, 1 incomplete (interrupted saves)"


def test_verify_one_checkpoint(out, damaged):
    assert out["verify_one_ok"].returncode == 0
    assert out["verify_one_ok"].stdout.startswith(f"OK   step_9: {_counts(os.path.join(damaged, 'step_9'))[0]} files")
    r = out["verify_one_incomplete"]
    assert r.returncode == 1
    assert r.stdout == "INCOMPLETE  step_15: no metadata.json (save interrupted before its commit)\n"


def test_verify_checks_shards_against_dcp_metadata(out):
    r = out["verify_mangled"]
    assert r.returncode == 1
    bad = [line for line in r.stdout.splitlines() if line.startswith("BAD ")]
    assert re.fullmatch(r"BAD  step_3/state/__1_0.distcp: size mismatch: the file is \d+ bytes, metadata.json "
                        r"says \d+", bad[0])
    assert bad[1] == ("BAD  step_3/state/__7_0.distcp: a shard that state/.metadata does not reference (not "
                      "written by the save that wrote the index); not listed in metadata.json (no recorded size "
                      "or hash covers it)")
    assert bad[2] == "BAD  step_3: 2 bad file(s); resume skips this checkpoint"
    assert bad[3] == f"BAD  step_9/{SHARD}: listed in metadata.json but missing"
    assert r.stdout.splitlines()[-1] == "5 checkpoint directories: 1 OK, 3 BAD, 1 incomplete (interrupted saves)"


def test_inspect(out, damaged):
    r = out["inspect"]
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith(f"epoch1: epoch checkpoint at step 6, epoch 1 ({damaged}/epoch1)\n")
    for pattern in (r"world size   2", r"is_best      True; best_metric \d", r"metrics      eval_loss=\d",
                    r"written by   torch 2\.\d+.*, dcp-resume \d",
                    rf"files        {_counts(os.path.join(damaged, 'epoch1'))[0]} listed in metadata.json",
                    r"config.json  compression=telepathy dataset=synthetic samples=48 epochs=2 .*fsdp=True",
                    r"state: \d+ keys, [\d.]+ MB \(from state/.metadata; nothing loaded\)",
                    rf"\n  model/ +{MODEL_KEYS} keys +[\d.]+ MB\n", r"\n    encoder/ +16 keys",
                    r"\n      pos +\[96, 32\] +float32 +12\.3 kB\n",  # full shape, though FSDP2 sharded it
                    r"\n  optimizer/ +\d+ keys", r"\n  __per_rank__/ +18 keys", r"\n    rank1.rng/",
                    r"\n  sampler/ +4 keys", r"\n    consumed +- +value ", r"\n  scheduler/",
                    r"\n  counters/ +6 keys", r"\n    global_step +- +value "):
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"


def test_inspect_json(out):
    r = out["inspect_json"]
    found = json.loads(r.stdout)
    assert found["metadata"]["step"] == 6 and found["config"]["fsdp"] is True and found["complete"]
    state = {i["key"]: i for i in found["state"]}
    assert state["model.encoder.pos"] == {"key": "model.encoder.pos", "kind": "tensor", "shape": [96, 32],
                                          "dtype": "float32", "bytes": 96 * 32 * 4}
    assert state["counters.global_step"]["kind"] == "value"
    assert any(k.startswith("optimizer.state.encoder.pos.exp_avg") for k in state)
