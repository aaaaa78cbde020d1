"""No code runs from a checkpoint. A real `__reduce__` payload (it would create a marker file) inside DCP's
.metadata or in a non-tensor item, with metadata.json re-signed so the checkpoint passes its hash check, is
refused with a clear error through load_checkpoint, the trainer's --resume_from and the CLI, and the marker
never appears. Plain Python values still round-trip (they load with torch.load(weights_only=True))."""
import collections
import json
import logging
import os
import random
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed.checkpoint as dcp
from common import Tiny, make_training, train_steps
from conftest import run
from trainer_runs import TRAIN

from dcp_resume import CheckpointManager, dcp_io, hashing
from dcp_resume.storage import open_storage
from dcp_resume.errors import CheckpointNotFoundError, UnsafeCheckpointError

REFUSED = "that dcp-resume will not load: unpickling it could run code"


class Payload:
    """Unpickling this runs `touch <marker>`: a stand-in for any command a hostile checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))

    def __deepcopy__(self, memo):  # the writer's staging copy must not run it (only unpickling should)
        return self


def resign(ckpt):
    """What an attacker does after editing files: record their new sizes and hashes in metadata.json."""
    meta_path = ckpt / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"] = {rel: hashing.file_info(open_storage(ckpt), str(ckpt / rel)) for rel in meta["files"]}
    meta_path.write_text(json.dumps(meta))


def with_hostile_metadata(ckpt, marker):
    """Put the payload inside the checkpoint's real DCP .metadata (planner_data, which plain DCP unpickles)."""
    md = dcp_io.read_metadata(open_storage(ckpt), str(ckpt / "state"))  # our own fresh file
    md.planner_data["payload"] = Payload(marker)
    (ckpt / "state" / ".metadata").write_bytes(__import__("pickle").dumps(md))
    resign(ckpt)
    return ckpt


@pytest.fixture
def hostile(tmp_path):
    """save_dir 'meta' (payload in .metadata) and 'item' (payload as a saved value: written by DCP itself, so
    metadata.json is signed by the save), each a single checkpoint step_1, and the marker's path."""
    marker = tmp_path / "PWNED"
    for name, extra in (("meta", {}), ("item", {"evil": Payload(marker)})):
        with CheckpointManager(tmp_path / name, verbose=False) as mgr:
            mgr.save_checkpoint({"model": Tiny(), "note": "hi", **extra}, step=1)
    with_hostile_metadata(tmp_path / "meta" / "step_1", marker)
    return tmp_path / "meta" / "step_1", tmp_path / "item" / "step_1", marker


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_payloads_are_real_plain_dcp_runs_them(hostile):
    """The reason for all this: plain DCP unpickles both without restriction, and the payload runs."""
    meta_ckpt, item_ckpt, marker = hostile
    dcp.FileSystemReader(str(meta_ckpt / "state")).read_metadata()
    assert marker.exists()
    marker.unlink()
    dcp.load({"evil": None}, storage_reader=dcp.FileSystemReader(str(item_ckpt / "state")), no_dist=True)
    assert marker.exists()


def test_hostile_metadata_is_refused_by_load_checkpoint(hostile):
    meta_ckpt, _, marker = hostile
    mgr = CheckpointManager(meta_ckpt.parent, verbose=False)
    # Its hashes match (it was re-signed), but discovery checks state/ as verify does: never picked.
    assert mgr.find_latest_checkpoint() is None
    with pytest.raises(CheckpointNotFoundError):
        mgr.load_checkpoint()
    expected = f"^{meta_ckpt}/state/.metadata holds a pickled object of type posix.system {REFUSED}"
    with pytest.raises(UnsafeCheckpointError, match=expected):  # named explicitly: refused, with the reason
        mgr.load_checkpoint(str(meta_ckpt))
    with pytest.raises(UnsafeCheckpointError, match=expected):
        mgr.load_checkpoint(str(meta_ckpt), state={"model": Tiny()})
    assert not marker.exists()


def test_hostile_item_is_refused_and_never_read_unless_asked_for(hostile):
    _, item_ckpt, marker = hostile
    mgr = CheckpointManager(item_ckpt.parent, verbose=False)
    expected = (f"^{item_ckpt}/state/__0_0.distcp holds a pickled object of type posix.system \\(item 'evil'\\) "
                f"{REFUSED}.*torch.serialization.add_safe_globals")
    with pytest.raises(UnsafeCheckpointError, match=expected):
        mgr.load_checkpoint()
    with pytest.raises(UnsafeCheckpointError, match=expected):
        mgr.load_checkpoint(str(item_ckpt), state={"model": Tiny(), "evil": None})
    model = Tiny()
    assert mgr.load_checkpoint(state={"model": model, "note": ""})["note"] == "hi"  # the payload is never read
    assert not marker.exists()


def trainer_checkpoint_with_payload(save_dir, marker):
    """A real latentwire trainer checkpoint (Trainer built in this process, saved before any step) whose
    counters.samples_seen is the payload: what --resume_from reads as a plain value. (Not best_metric: the
    trainer also hands that to save_checkpoint, whose deepcopy of it would run the payload right here.)"""
    from latentwire.args import parse_args
    from latentwire.train import Trainer

    log = logging.getLogger("latentwire")
    handlers = list(log.handlers)
    trainer = Trainer(parse_args(["--tiny", "--samples", "8", "--batch_size", "4", "--save_dir", str(save_dir)]))
    try:
        trainer.progress.samples_seen = Payload(marker)
        trainer.save("step")
    finally:
        trainer.close()
        for h in set(log.handlers) - set(handlers):  # leave the logger as other tests expect it
            log.removeHandler(h)
            h.close()
    return save_dir / "step_0"


def test_trainer_resume_from_a_hostile_checkpoint_exits_2(hostile, tmp_path):
    meta_ckpt, _, marker = hostile
    item_ckpt = trainer_checkpoint_with_payload(tmp_path / "trained", marker)
    args = ["--tiny", "--samples", "8", "--batch_size", "4", "--epochs", "1"]
    with ThreadPoolExecutor(2) as pool:  # one per core
        procs = list(pool.map(lambda c: run([sys.executable, TRAIN, *args, "--save_dir", str(tmp_path / c.parent.name
                                                                                              / "again"),
                                             "--resume_from", str(c)], check=False), (meta_ckpt, item_ckpt)))
    for proc, expected in zip(procs, (
            f"error: {meta_ckpt}/state/.metadata holds a pickled object of type posix.system {REFUSED}",
            f"error: {item_ckpt}/state/__0_0.distcp holds a pickled object of type posix.system (item "
            f"'counters.samples_seen') {REFUSED}")):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert expected in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_cli_never_unpickles(hostile):
    meta_ckpt, item_ckpt, marker = hostile
    cli = [sys.executable, "-m", "dcp_resume.cli"]
    shutil.copytree(item_ckpt, meta_ckpt.parent / "step_0")  # both kinds in one save_dir
    ls = run(cli + ["ls", str(meta_ckpt.parent)])
    assert "step_1" in ls.stdout and "step_0" in ls.stdout
    latest = run(cli + ["latest", str(meta_ckpt.parent)]).stdout.strip()
    assert latest == str(meta_ckpt.parent / "step_0")  # both record step 1; the copy's timestamp is newer
    assert not marker.exists()


def test_plain_python_values_round_trip(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 2)
    plain = {"py_random": random.getstate(), "i": 7, "f": 0.25, "s": "x", "none": None, "yes": True,
             "list": [1, 2.5, "three", None, [4]], "tup": (1, ("a", 2.0)), "nested": {"a": {"b": [1, 2]}},
             "od": collections.OrderedDict(z=1, a=2), "bytes": b"\x00\xff", "big": 2 ** 70, "set": {1, 2},
             "dtype": torch.bfloat16, "size": torch.Size([2, 3])}
    mgr = CheckpointManager(tmp_path, verbose=False)
    mgr.save_checkpoint({"model": model, "optimizer": opt, "scheduler": sched, **plain}, step=1)
    model2, opt2, sched2 = make_training(seed=1)
    got = mgr.load_checkpoint(state={"model": model2, "optimizer": opt2, "scheduler": sched2,
                                     **{k: None for k in plain}})
    assert {k: got[k] for k in plain} == plain
    assert sched2.state_dict() == sched.state_dict() and opt2.state_dict()["param_groups"] == \
        opt.state_dict()["param_groups"]
    assert CheckpointManager(tmp_path, verbose=False).load_checkpoint()["py_random"] == plain["py_random"]
