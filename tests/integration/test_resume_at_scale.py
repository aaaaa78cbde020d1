"""Verification on resume is spread over the ranks and agreed (FSDP2 under torchrun, gloo, 2 and 4 ranks): a
byte flipped in any one shard of the newest checkpoint is found by the rank that reads it, and every rank
falls back to the previous checkpoint together, restoring it bit for bit; a clean resume has each rank hash
about 1/world of the checkpoint, so rank 0 no longer reads it whole."""
import json
import re

import pytest
import torch
from conftest import torchrun
from helpers import assert_same

from dcp_resume import resume_check
from dcp_resume.layout import CheckpointInfo

pytestmark = pytest.mark.slow  # integration: torchrun with gloo ranks


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def resumed(request, tmp_path_factory):
    """One torchrun launch per world size: save twice, then a clean resume and one per damaged shard."""
    world = request.param
    out = tmp_path_factory.mktemp(f"agreed{world}")
    proc = torchrun(world, "agreed_verify.py", out, timeout=400)
    reports = [json.load(open(out / f"rank{r}.json")) for r in range(world)]
    return world, out, reports, proc.stdout + proc.stderr


def _files(out):
    return json.load(open(out / "run" / "step_2" / "metadata.json"))["files"]


def _assert_every_rank_fell_back(out, reports, log, case: str, mismatch: str):
    """With `case` (a file of step_2) damaged, every rank loaded step_1 bit for bit, skipping step_2, and the log
    names the file and `mismatch` (a regex: what the hash was taken over)."""
    for rank, report in enumerate(reports):
        got = report[case]
        assert got["loaded"] == str(out / "run" / "step_1"), (case, rank)
        assert got["stats"]["skipped"] == [str(out / "run" / "step_2")], (case, rank)
    assert re.search(rf"Skipping checkpoint {re.escape(str(out / 'run' / 'step_2'))}: {case} content hash "
                     rf"mismatch {mismatch}", log), (case, log[-3000:])
    assert_same(torch.load(out / "ref_step_1.pt"), torch.load(out / f"restored_{case.rpartition('/')[2]}.pt"))


def test_a_flipped_byte_in_any_shard_makes_every_rank_fall_back_together(resumed):
    world, out, reports, log = resumed
    for r in range(world):
        _assert_every_rank_fell_back(out, reports, log, f"state/__{r}_0.distcp", r"in bytes \d+\.\.\d+")


def test_a_clean_resume_has_each_rank_verify_about_its_share(resumed):
    world, out, reports, _ = resumed
    files = _files(out)
    total = sum(entry["size"] for entry in files.values())
    shards = {rel: entry["size"] for rel, entry in files.items() if rel.endswith(".distcp")}
    index = files["state/.metadata"]["size"]
    side = total - sum(shards.values()) - index  # config.json, training_stats.json
    assert sum(shards.values()) > 0.9 * total  # the shards hold the bytes
    for rank, report in enumerate(reports):
        clean = report["clean"]
        assert clean["loaded"] == str(out / "run" / "step_2") and clean["stats"]["skipped"] == []
        mine = shards[f"state/__{rank}_0.distcp"]
        # what this rank hashed: its own shard's items, DCP's index each time it is read (ours, then DCP's own),
        # at most the side files, and the few small items every rank reads (optimizer param_groups, in shard 0)
        assert mine <= clean["stats"]["hashed_bytes"] <= mine + 4 * index + side + 0.02 * total, rank
    hashed = [r["clean"]["stats"]["hashed_bytes"] for r in reports]
    assert sum(hashed) >= sum(shards.values()) + side  # every byte verified by some rank
    assert max(hashed) < total / world + 4 * index + side + 0.05 * total  # about 1/world each
    rank0_read = reports[0]["clean"]["rchar"]  # everything rank 0 read (/proc/self/io) over the whole load
    assert rank0_read < total * (0.5 if world == 4 else 0.75), (rank0_read, total)
    assert_same(torch.load(out / "ref_step_2.pt"), torch.load(out / "restored_clean.pt"))


def test_a_side_file_one_rank_finds_damaged_makes_every_rank_fall_back_before_reading(resumed):
    """config.json and training_stats.json are hashed whole before the load, each by one rank (resume_check.shares):
    the rank that finds the flipped byte refuses in DCP's plan exchange, and every rank falls back together."""
    world, out, reports, log = resumed
    files = _files(out)
    _, whole = resume_check.expectations(CheckpointInfo(str(out / "run" / "step_2"), True, meta={"files": files}))
    owners = {rel: r for r, share in enumerate(resume_check.shares(files, whole, world)) for rel in share}
    assert {owners["config.json"], owners["training_stats.json"]} == {0, 1}  # one of them is not the coordinator
    for case in ("config.json", "training_stats.json"):
        _assert_every_rank_fell_back(out, reports, log, case, r"\(xxh3_64 of the file is")


def test_live_objects_that_do_not_fit_on_one_rank_raise_the_same_error_on_every_rank(resumed):
    """Only the last rank's state names a key the checkpoint lacks: its CheckpointMismatchError reaches every rank
    through DCP's plan exchange. Before, that rank raised alone: the others waited in a collective until it exited
    and then raised gloo's "Connection reset by peer" (or waited out the process group's timeout)."""
    world, out, reports, log = resumed
    for rank, report in enumerate(reports):
        got = report["mismatch"]
        assert got["error"] == "CheckpointMismatchError", (rank, got)
        assert got["message"] == ("checkpoint does not match the live objects:\n  top-level keys missing from "
                                  "checkpoint: ema (it holds: model, optimizer)"), (rank, got)
