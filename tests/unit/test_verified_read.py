"""The verified reader's memory: items are read into a few buffers that are handed back and reused, read-ahead
stays within PREFETCH_BYTES, and a tensor is deserialized over its verified buffer without a copy. Reuse is
where a bug would corrupt state (a buffer refilled while DCP still reads it), so the loads here are compared
bit for bit with what was saved, with buffers recycled many times over items of many sizes."""
import io
import re
import threading

import pytest
import torch
from helpers import assert_same
from torch import nn

from dcp_resume import CheckpointManager, verified_read


def _model_and_adam(seed: int):
    """Items from a few bytes to ~1 MB: weights, biases, an embedding and Adam's moments and steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(512, 384), nn.Linear(384, 7), nn.Linear(7, 1000), nn.Embedding(300, 33))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (model[:3](torch.randn(4, 512)).sum() + model[3](torch.arange(300)).sum()).backward()
    opt.step()
    return model, opt


def _uneven_state():
    model, opt = _model_and_adam(3)
    extra = {"note": "x" * 5000, "counts": list(range(2000)), "table": torch.arange(70_000, dtype=torch.int64)}
    return model, opt, extra


def _fresh():
    model, opt = _model_and_adam(99)
    return model, opt, {"note": "", "counts": [], "table": torch.zeros(70_000, dtype=torch.int64)}


class _Recorded(verified_read._Buffers):
    """The real buffer pool, with the most bytes it ever had out and held."""

    instances: list = []

    def __init__(self, limit):
        super().__init__(limit)
        self.max_out = self.max_held = 0
        _Recorded.instances.append(self)

    def take(self, n):
        view = super().take(n)
        self.max_out, self.max_held = max(self.max_out, self.out), max(self.max_held, self.held)
        return view


@pytest.mark.parametrize("limit", [1, 256 << 10, 4 << 20], ids=["one-at-a-time", "256KiB", "4MiB"])
def test_load_with_reused_buffers_is_bit_exact_and_bounded(tmp_path, monkeypatch, limit):
    model, opt, extra = _uneven_state()
    with CheckpointManager(tmp_path, verbose=False) as mgr:
        mgr.save_checkpoint({"model": model, "optimizer": opt, "extra": extra}, step=1)
    monkeypatch.setattr(verified_read, "PREFETCH_BYTES", limit)
    monkeypatch.setattr(verified_read, "_Buffers", _Recorded)
    _Recorded.instances.clear()
    m2, o2, e2 = _fresh()
    loaded = CheckpointManager(tmp_path, verbose=False).load_checkpoint(
        state={"model": m2, "optimizer": o2, "extra": e2})
    assert_same(m2.state_dict(), model.state_dict())
    assert_same(o2.state_dict(), opt.state_dict())
    assert_same(loaded["extra"], extra)
    pool = _Recorded.instances[-1]
    largest = max(p.numel() * 4 for p in model.parameters())
    assert pool.max_out <= max(limit, largest + 4096)  # a lone larger item (+ its archive framing) only
    assert pool.max_held <= 2 * (limit + largest) + 2 * verified_read._SLACK  # in flight, and kept for reuse


def test_a_stopped_pool_wakes_a_waiting_reader():
    pool = verified_read._Buffers(10)
    first = pool.take(8)
    assert first is not None and len(first) == 8
    got = []
    t = threading.Thread(target=lambda: got.append(pool.take(8)))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # 8 + 8 > 10 while the first is out: it waits
    pool.stop()
    t.join(5)
    assert not t.is_alive() and got == [None]


def test_a_returned_buffer_is_reused_for_an_item_that_fits():
    pool = verified_read._Buffers(1 << 20)
    a = pool.take(1000)
    buf = a.obj
    pool.give(a)
    b = pool.take(600)
    assert b.obj is buf and len(b) == 600
    c = pool.take(2000)  # bigger than any free buffer: a new one
    assert c.obj is not buf


def test_tensor_is_deserialized_over_its_buffer_without_a_copy():
    t = torch.randn(1000, 3)
    raw = io.BytesIO()
    torch.save(t, raw)
    data = bytearray(raw.getvalue()) + bytearray(100)  # a pooled buffer is often longer than the item
    view = memoryview(data)[:len(raw.getvalue())]
    back = verified_read._tensor_in_place(view)
    assert torch.equal(back, t)
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= back.data_ptr() < start + len(data)  # its storage is the buffer itself


def test_a_tensor_item_gets_the_checks_torch_load_weights_only_gives_it_on_this_torch():
    """A crafted item: a sparse tensor whose index lies outside its size. torch.load(weights_only=True), what plain
    dcp.load uses, validates sparse indices from torch 2.14 on; the engine's read over the verified buffer must
    refuse (or accept) it exactly where torch.load does."""
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 1_000_000]]), torch.tensor([1.0, 2.0]), (4,),
                                  check_invariants=False)
    buffer = io.BytesIO()
    torch.save(bad, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
        refused = None
    except RuntimeError as e:
        refused = str(e)
    if refused is None:  # this torch does not check: neither does the engine's read
        back = verified_read._tensor_in_place(memoryview(bytearray(data)))
        assert back.is_sparse and torch.equal(back._indices(), bad._indices())
    else:
        with pytest.raises(RuntimeError, match=re.escape(refused)):
            verified_read._tensor_in_place(memoryview(bytearray(data)))
