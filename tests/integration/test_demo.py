"""README's main job runs end to end and reports an exact resume."""
import sys

import pytest
from conftest import run

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


def test_demo_reports_exact_resume(tmp_path):
    out = run([sys.executable, "-m", "latentwire.demo", "--save_dir", str(tmp_path / "demo"), "--", "--tiny"]).stdout
    assert f"Saved checkpoint: {tmp_path}/demo/interrupted/step_5" in out
    assert f"Resuming from checkpoint: {tmp_path}/demo/interrupted/step_5 (step 5, epoch 0)" in out
    assert "demo: resume was EXACT" in out
