"""The engine's CUDA paths, on a CUDA device: staging into pinned host buffers on a side stream (staging.py),
the fingerprint computed on the device (incremental.py), and async and incremental saves of CUDA state through
CheckpointManager at world size 1. Every test here is marked `cuda` and skipped where
torch.cuda.is_available() is False (CI has no GPU); benchmarks/gpu_check.sh runs them on one with
`pytest -m cuda`."""
import os

import pytest
import torch
from common import full_state
from helpers import assert_same
from torch import nn

from dcp_resume import CheckpointManager
from dcp_resume.incremental import _WORDS, _device_digest, fingerprint
from dcp_resume.staging import StagingBuffers

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (torch.cuda.is_available() is False; CI has none)")]


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as bytes on the host: what 'bit for bit' compares (NaN payloads and -0.0 too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def leaves(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def manager(path, **kw) -> CheckpointManager:
    return CheckpointManager(path, verbose=False, enable_preemption_handling=False, **kw)


# -- staging.py: pinned buffers, side stream -----------------------------------------------------------------
def test_staging_copies_cuda_tensors_into_pinned_buffers_bit_for_bit_and_reuses_them():
    torch.manual_seed(0)
    w = torch.randn(4096, 257, device="cuda")
    state = {"w": w, "step": 7, "cpu": torch.arange(10),
             "nested": {"bf16": torch.randn(33, 7, device="cuda").bfloat16(),
                        "ints": torch.randint(-2**40, 2**40, (1001,), device="cuda"),
                        "mask": torch.rand(999, device="cuda") > 0.5,
                        "transposed": w.t(),  # a strided view of another leaf's storage
                        "nan": torch.tensor([float("nan"), -0.0, float("inf")], device="cuda")}}
    buffers = StagingBuffers()
    ptrs = []
    for save in range(2):
        if save:  # change every device tensor in place: the second save must see the new values
            with torch.no_grad():
                w.mul_(3).add_(1)
                state["nested"]["bf16"].neg_()
                state["nested"]["ints"].add_(5)
                state["nested"]["mask"].logical_not_()
        staged = buffers.stage(state)
        expected, got = leaves(state), leaves(staged)
        assert got.keys() == expected.keys()
        for key, src in expected.items():
            if not torch.is_tensor(src):
                assert got[key] == src
                continue
            dst = got[key]
            assert dst.device.type == "cpu" and dst.dtype == src.dtype and dst.shape == src.shape, key
            assert dst.is_pinned() == src.is_cuda, f"{key}: pinned {dst.is_pinned()}, source on {src.device}"
            assert torch.equal(raw(dst), raw(src)), f"{key}: staged bytes differ from the device tensor"
        ptrs.append({k: b.data_ptr() for k, b in buffers.buffers.items()})
    assert ptrs[0] == ptrs[1], "the second save allocated new buffers instead of reusing the first save's"
    assert buffers.nbytes() == sum(t.nbytes for t in leaves(state).values() if torch.is_tensor(t))
    before = raw(staged["w"]).clone()
    w.zero_()  # the snapshot is the host's own copy: later device writes do not reach it
    torch.cuda.synchronize()
    assert torch.equal(raw(staged["w"]), before)


def test_staging_waits_for_work_still_queued_on_the_current_stream():
    """The side stream waits for the current stream: a tensor whose producing kernels are still running when
    stage() is called is staged with its final values, not whatever the memory held before."""
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda") / 64
    buffers = StagingBuffers()
    buffers.stage({"x": x})  # buffers allocated (and the old values staged) before the timed part
    for _ in range(20):  # ~tens of ms of queued matrix products, not yet done when stage() starts
        x = torch.tanh(x @ x + 0.5)
    staged = buffers.stage({"x": x})
    assert torch.equal(raw(staged["x"]), raw(x))


# -- incremental.py: the device fingerprint ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool, torch.float64])
def test_device_fingerprint_agrees_on_equal_tensors_and_sees_one_changed_element(dtype):
    torch.manual_seed(0)
    a = (torch.randn(100_003, device="cuda") * 50).clamp(-100, 100).to(dtype)  # odd byte counts: padded tail
    b = a.clone()
    assert fingerprint(a).startswith("wsum128:") and fingerprint(a) == fingerprint(b)
    assert _device_digest(raw(a).cuda()) == _device_digest(raw(a))  # the same integer arithmetic on the host
    for where in (0, 50_000, 100_002):
        c = a.clone()
        c[where] = ~c[where] if dtype == torch.bool else c[where] + 1
        assert fingerprint(c) != fingerprint(a), f"one element changed at {where} ({dtype}) went unseen"


def test_device_fingerprint_spans_its_scratch_steps():
    """A tensor of more than _WORDS int64 words is summed in several steps: a change in the last one counts."""
    a = torch.randn(_WORDS + 5, dtype=torch.float64, device="cuda")
    digest = fingerprint(a)
    a[-1] += 1
    assert fingerprint(a) != digest


def test_device_fingerprint_of_a_view_at_an_odd_storage_offset():
    base = torch.randn(1001, device="cuda")
    view = base[1:]  # contiguous, 4000 bytes (no padding), starting 4 bytes into its storage
    assert fingerprint(view) == fingerprint(view.clone())


# -- CheckpointManager on CUDA state -------------------------------------------------------------------------
def cuda_training(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).cuda()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model, opt, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(16, 64, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_async_save_of_cuda_model_and_adam_loads_back_bit_identical(tmp_path):
    model, opt = cuda_training(0)
    train(model, opt, 3)
    ref = full_state(model, opt)
    with manager(tmp_path, async_save=True) as mgr:
        path = mgr.save_checkpoint({"model": model, "optimizer": opt}, step=3)
        train(model, opt, 2)  # change the device state while the background write runs
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    model2, opt2 = cuda_training(1)
    manager(tmp_path).load_checkpoint(path, map_location="cuda", state={"model": model2, "optimizer": opt2})
    assert all(p.is_cuda for p in model2.parameters())
    assert all(t.is_cuda for s in opt2.state.values() for k, t in s.items() if k != "step")
    assert_same(ref, full_state(model2, opt2))
    loaded = manager(tmp_path).load_checkpoint(path, map_location="cuda")  # no live objects: a plain dict
    assert loaded["model"].keys() == ref["model"].keys()
    for key, want in ref["model"].items():
        assert loaded["model"][key].is_cuda and torch.equal(raw(loaded["model"][key]), raw(want)), key
    train(model2, opt2)  # the restored optimizer state works on the device


class Frozen(nn.Module):
    """A frozen 'LM' (512x512 fp32, 1 MiB) and a small trainable head, on the device."""

    def __init__(self):
        super().__init__()
        self.lm = nn.Linear(512, 512)
        self.lm.requires_grad_(False)
        self.head = nn.Linear(512, 4)

    def forward(self, x):
        return self.head(self.lm(x))


FROZEN_BYTES = 512 * 512 * 4


def state_sizes(ckpt) -> dict[str, int]:
    d = os.path.join(ckpt, "state")
    return {n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_incremental_saves_of_cuda_state_write_the_frozen_part_once(tmp_path, async_save):
    torch.manual_seed(0)
    model = Frozen().cuda()
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    run = tmp_path / "run"
    with manager(run, keep_last_n=None, async_save=async_save) as mgr:
        for step in (1, 2, 3):
            if step == 3:
                with torch.no_grad():
                    model.lm.weight[7, 7] += 1  # a frozen tensor edited in place on the device: written anew
            model(torch.randn(8, 512, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
            mgr.save_checkpoint({"model": model, "optimizer": opt}, step=step)
            if step == 2:
                ref2 = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    first, second, third = (state_sizes(run / f"step_{s}") for s in (1, 2, 3))
    assert first["__0_0.distcp"] > FROZEN_BYTES  # the first save writes everything
    assert second["__0_0.distcp"] < FROZEN_BYTES / 4, second  # then only the head, its AdamW state, counters
    assert second.get("ref.step_1.__0_0.distcp") == first["__0_0.distcp"], second  # the frozen part: linked
    assert third["__0_0.distcp"] > FROZEN_BYTES, third  # the fingerprint saw the one edited element
    back = Frozen().cuda()
    manager(run).load_checkpoint(run / "step_2", map_location="cuda", state={"model": back})
    assert_same(ref2, {k: v.detach().cpu() for k, v in back.state_dict().items()})
    manager(run).load_checkpoint(run / "step_3", map_location="cuda", state={"model": back})
    assert torch.equal(raw(back.lm.weight), raw(model.lm.weight))
