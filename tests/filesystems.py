"""Real small filesystems for tests (as root): a tmpfs or a loop-mounted ext4 image, unmounted afterwards.
A test that needs one is skipped, with the reason, where mounting is not allowed."""
import contextlib
import os
import subprocess

import pytest

KINDS = ("tmpfs", "ext4")


def _run(*cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


@contextlib.contextmanager
def mounted(kind: str, where, size_mb: int, read_only: bool = False):
    """`where` (created) with a fresh `kind` filesystem of size_mb on it, for the duration."""
    mnt = os.path.join(str(where), f"{kind}-mnt")
    os.makedirs(mnt, exist_ok=True)
    try:
        if kind == "tmpfs":
            _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m" + (",ro" if read_only else ""), "tmpfs", mnt)
        else:
            image = os.path.join(str(where), f"{kind}.img")
            with open(image, "wb") as f:
                f.truncate(size_mb << 20)
            _run("mkfs.ext4", "-q", "-F", "-m", "0", image)  # -m 0: no blocks reserved for root
            _run("mount", "-o", "loop" + (",ro" if read_only else ""), image, mnt)
    except OSError as e:
        pytest.skip(f"cannot mount a {kind} filesystem here (needs root and mount): {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def fill(mnt: str, leave_bytes: int) -> None:
    """Write a filler file until only about `leave_bytes` are free on mnt's filesystem."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(os.path.join(mnt, "filler"), "wb") as f:
        remaining = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= f.write(chunk[:remaining])
        f.flush()
        os.fsync(f.fileno())
