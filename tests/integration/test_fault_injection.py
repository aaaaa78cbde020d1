"""CI runs the fault-injection suite with K=3 kill -9s (tests/fault_injection.py; K=20 is run by hand)."""
import pytest

import fault_injection

pytestmark = pytest.mark.slow  # integration: real trainer runs, launchers and signals


def test_kill9_at_random_instants_never_corrupts_and_ends_exact(tmp_path, capsys):
    assert fault_injection.main(["--count", "3", "--seed", "1", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 kills, 0 violations; final state bit-identical" in out
