import pytest
import torch
from torch import nn

from latentwire.data import collate, load_examples
from latentwire.model import COMPRESSIONS, LatentWire, ModelConfig, trainable_state

EXAMPLES = load_examples("synthetic", 12)


def _batch(lo=0, hi=4):
    return collate(EXAMPLES[lo:hi])


def _train(seed, steps=3, compression="telepathy"):
    torch.manual_seed(seed)
    model = LatentWire(ModelConfig(compression=compression))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for s in range(steps):
        out = model(_batch(4 * s, 4 * s + 4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_forward_backward_every_compression(compression):
    torch.manual_seed(0)
    model = LatentWire(ModelConfig(compression=compression))
    out = model(_batch())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), out["loss_llama"] + out["loss_qwen"])
    out["loss"].backward()
    for name in ("encoder", "pooler", "adapter_llama", "adapter_qwen"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert model.pooler(model.encoder(_batch()["context_bytes"], _batch()["context_mask"]),
                        _batch()["context_mask"]).shape == (4, 8, 64)


def test_lms_frozen_and_identical_whatever_the_seed():
    torch.manual_seed(1)
    a = LatentWire()
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = LatentWire()
    for name in ("lm_llama", "lm_qwen"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not any(p.requires_grad for p in getattr(a, name).parameters())
    # the trainable parts do follow the global seed, and building the LMs does not consume it
    assert not torch.equal(a.adapter_llama.net[1].weight, b.adapter_llama.net[1].weight)
    torch.manual_seed(1)
    LatentWire()
    assert torch.equal(torch.rand(1), after_a)
    out = a(_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in a.lm_llama.parameters())


def test_same_seed_gives_bit_identical_params():
    a, b = _train(seed=7), _train(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _train(seed=8)
    assert not torch.equal(sa["adapter_qwen.net.1.weight"], c.state_dict()["adapter_qwen.net.1.weight"])


def test_evaluate_counts_and_restores_mode():
    torch.manual_seed(0)
    model = LatentWire()
    batch = _batch()
    out = model.evaluate(batch)
    assert model.training
    for lm in ("llama", "qwen"):
        n = int((batch[f"{lm}_target"] != -100).sum())
        assert out[f"{lm}_tokens"] == n and 0 <= out[f"{lm}_correct"] <= n
        assert out[f"{lm}_acc"] == out[f"{lm}_correct"] / n
        assert abs(out[f"{lm}_loss"] - out[f"{lm}_loss_sum"] / n) < 1e-9
        assert isinstance(out[f"{lm}_loss"], float)
    model.eval()
    fwd = model(batch)
    assert abs(float(fwd["loss_llama"]) - out["llama_loss"]) < 1e-4


class _Wrapper(nn.Module):
    """Stands in for DDP (`.module`) and torch.compile (`._orig_mod`)."""

    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


def test_trainable_state_plain_names_through_wrappers():
    torch.manual_seed(0)
    model = LatentWire()
    plain = trainable_state(model)
    assert set(plain) == {"encoder", "adapter_llama", "adapter_qwen"}
    assert any(k.startswith("encoder.") for k in plain["encoder"])
    assert any(k.startswith("pooler.") for k in plain["encoder"])
    assert "net.1.weight" in plain["adapter_llama"]
    model.adapter_qwen = _Wrapper(model.adapter_qwen, "_orig_mod")
    wrapped = trainable_state(_Wrapper(_Wrapper(model, "_orig_mod"), "module"))
    assert wrapped.keys() == plain.keys()
    for part in plain:
        assert wrapped[part].keys() == plain[part].keys()
        for k, v in wrapped[part].items():
            assert "module." not in k and "_orig_mod" not in k
            assert v.device.type == "cpu" and torch.equal(v, plain[part][k])
    # exports are copies, not views of the live parameters
    plain["adapter_llama"]["net.1.weight"].zero_()
    assert model.adapter_llama.net[1].weight.abs().sum() > 0
