"""Helpers several test modules share: the environment for real processes, bit-exact comparison of states,
snapshots of a directory's contents, and damage that keeps a file's size."""
import hashlib
import os

from latentwire.exactness import differences


def env(**extra) -> dict:
    """The environment for a real child process: unbuffered output, one OpenMP thread per process."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def assert_same(a, b, path="state"):
    """Bit-exact equality of nested dicts/lists of tensors and values, naming where they differ."""
    found = differences(a, b, path)
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    assert not found, f"differs at {', '.join(found[:10])}{more}"


def content_snapshot(root, skip_logs: bool = False) -> dict:
    """Every file under root with a hash of its bytes: what 'left untouched' compares (logs/ left out with
    skip_logs, for runs that append to train.log)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not (skip_logs and rel.startswith("logs" + os.sep)):
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def stat_snapshot(root: str) -> dict[str, tuple]:
    """Every file and directory under root with its size and mtime: 'nothing changed' means this is equal."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    st = os.stat(root)
    out["."] = (st.st_size, st.st_mtime_ns)
    return out


def flip_byte(path, at: int | None = None) -> None:
    """Damage a file's content at byte `at` (default: its middle), keeping its size (only hashes can tell)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if at is None else at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def refused_at_start(proc, *phrases) -> str:
    """The one `error: ` line of a trainer run refused at start (exit 2, no traceback, nothing trained), holding
    each of `phrases`."""
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert "Resuming from checkpoint" not in proc.stdout and "epoch 1/" not in proc.stderr  # refused before training
    return lines[0]
