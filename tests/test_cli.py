"""The real `dcp-resume` console script in a subprocess."""
import json
import os
import sys

from common import Tiny
from conftest import run

from dcp_resume import CheckpointManager

CLI = [sys.executable, "-m", "dcp_resume.cli"]


def test_ls_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, verbose=False)
    for step in (1, 2):
        mgr.save_checkpoint({"model": Tiny()}, step=step)
    (tmp_path / "step_3" / "state").mkdir(parents=True)
    out = run(CLI + ["ls", str(tmp_path), "--json"]).stdout
    rows = {r["name"]: r for r in json.loads(out)["checkpoints"]}
    assert rows["step_2"]["latest"] and rows["step_2"]["complete"] and not rows["step_1"]["latest"]
    assert not rows["step_3"]["complete"] and "no metadata.json" in rows["step_3"]["reason"]
    table = run(CLI + ["ls", str(tmp_path)]).stdout
    assert "step_2" in table and "<- latest" in table and "INCOMPLETE" in table
    assert run(CLI + ["latest", str(tmp_path)]).stdout.strip() == os.path.join(str(tmp_path), "step_2")


def test_exit_codes(tmp_path):
    empty = run(CLI + ["latest", str(tmp_path)], check=False)
    assert empty.returncode == 1 and f"No checkpoint found to resume in {tmp_path}" in empty.stderr
    missing = run(CLI + ["ls", str(tmp_path / "nope")], check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"dcp-resume: error: SAVE_DIR {tmp_path / 'nope'} is not a directory"
