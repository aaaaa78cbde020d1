"""Hold SAVE_DIR's lock for SECONDS, as a running job or `dcp-resume prune` does; prints 'held' once it has it.
SIGTERM releases it at once (a holder that finishes when the test says so)."""
import signal
import sys
import time

from dcp_resume import savedir_lock
from dcp_resume.storage import open_storage

lock = savedir_lock.acquire(open_storage(sys.argv[1]), sys.argv[1])


def release(signum, frame):
    lock.release()
    sys.exit(0)


signal.signal(signal.SIGTERM, release)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
