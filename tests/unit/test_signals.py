"""Signal handlers of the engine: flag only, chained to the application's, restored on close, and a
second Ctrl+C exits at once. Real signals sent with os.kill to this process or a child."""
import logging
import os
import signal
import sys

import torch

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


def test_building_or_reading_changes_no_handler_nor_log_level(tmp_path):
    """A read-only caller needs no flag to opt out: building a manager, finding and loading a checkpoint
    install no handler and leave the dcp_resume log level alone; the first save installs the handlers."""
    logger = logging.getLogger("dcp_resume")
    CheckpointManager(tmp_path / "run", verbose=False, keep_last_n=None).save_checkpoint({"w": torch.ones(2)}, step=1)
    logger.setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        reader = CheckpointManager(tmp_path / "run")  # verbose=True, preemption handling on: the defaults
        assert reader.find_latest_checkpoint() == str(tmp_path / "run" / "step_1")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and logger.level == logging.ERROR
        writer = CheckpointManager(tmp_path / "other", verbose=False)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        writer.save_checkpoint({"w": torch.ones(2)}, step=1)
        assert signal.getsignal(signal.SIGTERM) == writer._preemption._handle
        writer.close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        logger.setLevel(logging.NOTSET)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_disabled_handling_installs_nothing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(tmp_path, verbose=False, enable_preemption_handling=False)
    assert signal.getsignal(signal.SIGTERM) is before and not mgr.should_save(1)


def test_second_sigint_exits_at_once(tmp_path):
    code = f"""
import os, signal, time
from dcp_resume import CheckpointManager
mgr = CheckpointManager({str(tmp_path)!r}, verbose=False)
mgr.install_preemption_handlers()
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
