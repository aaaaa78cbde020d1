"""Rank 0 commits only files it sees with the size their rank reported (commit._check_visible). Here one process
plays both sides: its storage hides (or misreports) a shard it wrote, as rank 0 on a node-local save_dir sees
another node's shard. tests/integration/test_nodes.py runs the real thing on two simulated nodes."""
import socket

import pytest
from common import Tiny

from dcp_resume import CheckpointManager
from dcp_resume.errors import CheckpointSaveError
from dcp_resume.storage import LocalStorage

HOST = socket.gethostname()
SHARD = "state/__0_0.distcp"


class Elsewhere(LocalStorage):
    """A save_dir where this process's shard looks missing (size None) or `size` bytes long."""

    def __init__(self, size=None):
        self.size = size

    def file_sizes(self, root):
        sizes = super().file_sizes(root)
        if sizes is not None and SHARD in sizes:
            if self.size is None:
                del sizes[SHARD]
            else:
                sizes[SHARD] = self.size
        return sizes


@pytest.mark.parametrize("size,what", [(None, "missing"), (3, "3 bytes, not the {written} written")],
                         ids=["missing", "resized"])
def test_a_shard_rank0_cannot_see_fails_the_save_in_one_line_and_commits_nothing(tmp_path, size, what):
    mgr = CheckpointManager(tmp_path, verbose=False)
    mgr.save_checkpoint({"model": Tiny()}, step=1)
    written = (tmp_path / "step_1" / SHARD).stat().st_size
    mgr.storage = Elsewhere(size)
    with pytest.raises(CheckpointSaveError) as failed:
        mgr.save_checkpoint({"model": Tiny()}, step=2)
    assert str(failed.value) == (
        f"save of step 2 not committed: {tmp_path / 'step_2' / SHARD}, written by rank 0 on host {HOST}, is "
        f"{what.format(written=written)} on rank 0's host {HOST}, so not every rank writes to the same save_dir "
        f"{tmp_path}. save_dir must be a filesystem every node mounts (or an object store such as s3://)")
    assert not (tmp_path / "step_2").exists()  # removed, never committed
    mgr.close()
