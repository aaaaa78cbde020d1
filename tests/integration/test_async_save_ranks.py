"""Async saves at 2 ranks (DDP and FSDP2, under torchrun): the checkpoint holds the state as of the call, bit
for bit, and each rank wrote its own shard."""
import os

import pytest
import torch
from conftest import torchrun
from helpers import assert_same

pytestmark = pytest.mark.slow  # integration: torchrun


def test_async_two_ranks_ddp_and_fsdp2_bit_exact(tmp_path):
    torchrun(2, "async_roundtrip.py", tmp_path)
    for kind in ("ddp", "fsdp2"):
        both = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
        assert_same(both["ref"], both["got"], kind)
        assert sorted(os.listdir(tmp_path / kind / "step_3" / "state"))[1:] == ["__0_0.distcp", "__1_0.distcp"]
