"""Signal handlers of the engine: flag only, chained to the application's, restored on close, and a
second Ctrl+C exits at once. Real signals sent with os.kill to this process or a child."""
import os
import signal
import sys

from conftest import run

from dcp_resume import CheckpointManager


def test_handler_sets_flag_chains_and_is_restored(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        mgr = CheckpointManager(tmp_path, verbose=False)
        assert not mgr.should_save(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]  # the application's own handler still ran
        assert mgr.should_save(1) and mgr.preempted  # ... and the step boundary sees the flag
        mgr.preempted = False
        mgr.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1] * 2 and not mgr.preempted
        assert signal.getsignal(signal.SIGUSR1) is not mgr._preemption._handle  # put back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_disabled_handling_installs_nothing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(tmp_path, verbose=False, enable_preemption_handling=False)
    assert signal.getsignal(signal.SIGTERM) is before and not mgr.should_save(1)


def test_second_sigint_exits_at_once(tmp_path):
    code = f"""
import os, signal, time
from dcp_resume import CheckpointManager
mgr = CheckpointManager({str(tmp_path)!r}, verbose=False)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
print("first Ctrl+C only set the flag", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""
    proc = run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 130 and "first Ctrl+C only set the flag" in proc.stdout
    assert "still running" not in proc.stdout
