"""saved_tensor.tensor_view against torch.load: the same tensor (dtype, shape, strides, offset, bytes) wherever
the fast path answers, None (torch.load's turn) for everything it does not read, and never code from the bytes."""
import io
import pickle
import zipfile

import pytest
import torch
from torch import nn

from dcp_resume import CheckpointManager, saved_tensor

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64,
          torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]


def _saved(t: torch.Tensor) -> memoryview:
    raw = io.BytesIO()
    torch.save(t, raw)
    return memoryview(bytearray(raw.getvalue()))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as torch.load's result is: dtype, shape, strides, storage offset and every byte of the storage."""
    bytes_of = (lambda t: bytes(t.untyped_storage()))
    return (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset()) \
        and bytes_of(a) == bytes_of(b)


def _random(dtype: torch.dtype, shape) -> torch.Tensor:
    bits = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8)
    return bits.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_reads_as_torch_load_reads_it(dtype):
    for shape in [(), (0,), (7,), (3, 5), (2, 3, 4)]:
        t = _random(dtype, shape)
        data = _saved(t)
        fast = saved_tensor.tensor_view(data)
        assert fast is not None, (dtype, shape)
        assert _same(fast, torch.load(io.BytesIO(data), weights_only=True)), (dtype, shape)


def test_views_keep_their_strides_and_storage_offset():
    base = torch.randn(6, 8)
    for view in [base.t(), base[2:5], base[:, 1::3], base.reshape(2, 3, 8).permute(2, 0, 1), base[3:, 4:].t()]:
        data = _saved(view)
        fast = saved_tensor.tensor_view(data)
        assert fast is not None and torch.equal(fast, view)
        assert _same(fast, torch.load(io.BytesIO(data), weights_only=True))


def test_the_tensor_is_a_view_of_the_buffer():
    data = _saved(torch.randn(100))
    fast = saved_tensor.tensor_view(data)
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= fast.data_ptr() < start + len(data)


def _rewritten(t: torch.Tensor, edit) -> memoryview:
    """t as torch.save wrote it, with its records passed through edit(name, bytes) -> bytes, re-zipped stored."""
    with zipfile.ZipFile(io.BytesIO(bytes(_saved(t)))) as src:
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for name, data in records:
            dst.writestr(name, edit(name.partition("/")[2], data))
    return memoryview(bytearray(out.getvalue()))


def test_an_archive_zipped_by_another_writer_still_reads():
    t = torch.randn(4, 3)
    fast = saved_tensor.tensor_view(_rewritten(t, lambda name, data: data))
    assert fast is not None and torch.equal(fast, t)


class _Marker:
    """Unpickling this would run os.system: the fast path must never resolve it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.path}",)


def test_what_it_does_not_read_is_left_to_torch_load(tmp_path):
    plain = torch.randn(5)
    marker = tmp_path / "ran"
    not_plain = {
        "a dict of tensors": _saved({"w": plain}),
        "a quantized tensor": _saved(torch.quantize_per_tensor(plain, 0.1, 0, torch.qint8)),
        "a pickle that runs code": _rewritten(plain, lambda name, data: pickle.dumps(_Marker(marker), protocol=2)
                                              if name == "data.pkl" else data),
        # LONG_BINPUT at memo index 2**28: the C unpickler would size its memo for it (gigabytes)
        "a memo index far out": _rewritten(plain, lambda name, data: b"\x80\x02Nr\x00\x00\x00\x10."
                                           if name == "data.pkl" else data),
        "big-endian": _rewritten(plain, lambda name, data: b"big" if name == "byteorder" else data),
        "storage larger than its bytes": _rewritten(plain, lambda name, data: data[:-4] if name == "data/0" else data),
        "a compressed record": None,
        "truncated": _saved(plain)[:-10],
        "empty": memoryview(bytearray()),
        "not a zip": memoryview(bytearray(b"\0" * 200)),
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with zipfile.ZipFile(io.BytesIO(bytes(_saved(plain)))) as src:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info.filename))
    not_plain["a compressed record"] = memoryview(bytearray(out.getvalue()))
    for what, data in not_plain.items():
        assert saved_tensor.tensor_view(data) is None, what
    assert not marker.exists()


def test_every_tensor_of_a_real_checkpoint_takes_the_fast_path(tmp_path, monkeypatch):
    """A load of what DCP wrote never falls back to torch.load (it would still be right, only slower: if this
    fails after a torch upgrade, torch.save's layout changed and saved_tensor should learn it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path, verbose=False) as mgr:
        mgr.save_checkpoint({"model": model, "optimizer": opt}, step=1)
    answers = []
    real = saved_tensor.tensor_view
    monkeypatch.setattr(saved_tensor, "tensor_view", lambda data: answers.append(real(data)) or answers[-1])
    fresh = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    CheckpointManager(tmp_path, verbose=False).load_checkpoint(state={"model": fresh})
    assert len(answers) == 4 and all(a is not None for a in answers)  # 2 weights, 2 biases
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
