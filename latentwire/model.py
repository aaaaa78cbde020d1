"""LatentWire: byte encoder -> M latent soft tokens -> one adapter per target LM -> two frozen LMs.

The two LMs are the real architectures, transformers' LlamaForCausalLM and Qwen2ForCausalLM, built from small
configs and randomly initialised from a fixed seed (`lm_seed`) in a forked RNG, so they are the same in every
run whatever the training seed; or, with `LMConfig.pretrained` (train.py --llama_model/--qwen_model DIR),
loaded from local Hugging Face weights. They are frozen: only the encoder, pooler and adapters train.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from .data import (BOS_ID, BYTE_PAD, BYTE_VOCAB, EOS_ID, IGNORE_INDEX, LLAMA_VOCAB, PAD_ID, QWEN_VOCAB, STAND_INS,
                   Vocab, hf_vocab)

COMPRESSIONS = ("telepathy", "linear", "meanpool")
LM_NAMES = ("llama", "qwen")


@dataclass
class LMConfig:
    """One frozen LM: the size of a randomly initialised one, or `pretrained`, a local Hugging Face model
    directory (its own config then decides the size)."""

    hidden: int
    n_layers: int
    vocab: int
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention, as both real families use
    intermediate: int = 0  # MLP width; 0: 8/3 x hidden, rounded up to a multiple of 8 (Llama's ratio)
    max_positions: int = 64
    pretrained: str | None = None


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    num_latents: int = 8           # M soft tokens
    d_z: int = 64
    compression: str = "telepathy"
    max_context_bytes: int = 192
    max_answer_tokens: int = 16
    llama: LMConfig = field(default_factory=lambda: LMConfig(hidden=96, n_layers=2, vocab=LLAMA_VOCAB))
    qwen: LMConfig = field(default_factory=lambda: LMConfig(hidden=128, n_layers=2, vocab=QWEN_VOCAB))
    lm_seed: int = 1234

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r}: choices: {', '.join(COMPRESSIONS)}")
        need = self.num_latents + self.max_answer_tokens + 1  # soft tokens + BOS/answer positions
        for name in LM_NAMES:
            if getattr(self, name).max_positions < need:
                raise ValueError(f"{name}.max_positions {getattr(self, name).max_positions} < {need} "
                                 f"(num_latents + max_answer_tokens + 1)")


class ByteEncoder(nn.Module):
    """Byte embedding + learned positions + a small bidirectional transformer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, cfg.d_model, padding_idx=BYTE_PAD)
        self.pos = nn.Parameter(torch.randn(cfg.max_context_bytes, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # No nested tensors: keeps padded positions as real (finite) values and the path uniform.
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, byte_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(byte_ids) + self.pos[: byte_ids.shape[1]]
        return self.norm(self.layers(x, src_key_padding_mask=~mask))


class LatentPooler(nn.Module):
    """[B, L, d_model] encoding -> [B, M, d_z] latents, one of three ways (`compression`):

    telepathy: M learned queries cross-attend over the encoding;
    linear:    a learned [M, L] map over (masked) sequence positions;
    meanpool:  masked mean, then a linear expansion to M latents.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.m, self.d_z = cfg.compression, cfg.num_latents, cfg.d_z
        d = cfg.d_model
        if self.kind == "telepathy":
            self.queries = nn.Parameter(torch.randn(cfg.num_latents, d) * 0.02)
            self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
            self.proj = nn.Linear(d, cfg.d_z)
        elif self.kind == "linear":
            self.mix = nn.Parameter(torch.randn(cfg.num_latents, cfg.max_context_bytes)
                                    / cfg.max_context_bytes ** 0.5)
            self.proj = nn.Linear(d, cfg.d_z)
        else:
            self.proj = nn.Linear(d, cfg.num_latents * cfg.d_z)
        self.norm = nn.LayerNorm(cfg.d_z)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "telepathy":
            q = self.queries.unsqueeze(0).expand(h.shape[0], -1, -1)
            z, _ = self.attn(q, h, h, key_padding_mask=~mask, need_weights=False)
            z = self.proj(z)
        elif self.kind == "linear":
            h = h * mask.unsqueeze(-1)
            z = self.proj(torch.einsum("ml,bld->bmd", self.mix[:, : h.shape[1]], h))
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            z = self.proj(mean).view(h.shape[0], self.m, self.d_z)
        return self.norm(z)


class Adapter(nn.Module):
    """Latent (d_z) -> one target LM's embedding space."""

    def __init__(self, d_z: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_z), nn.Linear(d_z, 2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen": (Qwen2Config, Qwen2ForCausalLM)}


def build_lm(name: str, cfg: LMConfig) -> nn.Module:
    """`name`'s frozen LM: from `cfg.pretrained` (local files only, never downloaded), else a fresh one of
    cfg's size initialised from the current RNG."""
    config_cls, model_cls = ARCHITECTURES[name]
    if cfg.pretrained:
        lm = model_cls.from_pretrained(cfg.pretrained, local_files_only=True, torch_dtype=torch.float32)
    else:
        config = config_cls(
            vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            intermediate_size=cfg.intermediate or -(-8 * cfg.hidden // 3 // 8) * 8,
            max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        lm = model_cls(config)
    lm.requires_grad_(False)
    return lm


def _build_lms(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Both frozen LMs from `lm_seed`, without touching (or depending on) the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.lm_seed)
        return build_lm("llama", cfg.llama), build_lm("qwen", cfg.qwen)


def lm_hidden(lm: nn.Module) -> int:
    return lm.config.hidden_size


def vocab_of(name: str, cfg: LMConfig) -> Vocab:
    """The tokenizer an LM reads answers with: its own for a pretrained one, else the stand-in."""
    if not cfg.pretrained:
        return STAND_INS[name]
    from transformers import AutoTokenizer  # only for local pretrained models

    return hf_vocab(AutoTokenizer.from_pretrained(cfg.pretrained, local_files_only=True))


class LatentWire(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.encoder = ByteEncoder(cfg)
        self.pooler = LatentPooler(cfg)
        lm_llama, lm_qwen = _build_lms(cfg)
        self.adapter_llama = Adapter(cfg.d_z, lm_hidden(lm_llama))
        self.adapter_qwen = Adapter(cfg.d_z, lm_hidden(lm_qwen))
        self.lm_llama, self.lm_qwen = lm_llama, lm_qwen
        self.vocabs = {name: vocab_of(name, getattr(cfg, name)) for name in LM_NAMES}  # for collate()

    def latents(self, batch: dict) -> torch.Tensor:
        mask = batch["context_mask"]
        return self.pooler(self.encoder(batch["context_bytes"], mask), mask)

    def _logits(self, name: str, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits over the answer positions only: LM input = [adapter(z); embed(answer input)]."""
        adapter, lm = getattr(self, f"adapter_{name}"), getattr(self, f"lm_{name}")
        x = torch.cat([adapter(z), lm.get_input_embeddings()(batch[f"{name}_input"])], dim=1)
        return lm(inputs_embeds=x, use_cache=False).logits[:, z.shape[1]:]

    def _to_device(self, batch: dict) -> dict:
        device = self.encoder.pos.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        batch = self._to_device(batch)
        z = self.latents(batch)
        out = {}
        for name in LM_NAMES:
            logits = self._logits(name, z, batch)
            out[f"loss_{name}"] = F.cross_entropy(logits.flatten(0, 1),
                                                  batch[f"{name}_target"].flatten(),
                                                  ignore_index=IGNORE_INDEX)
        out["loss"] = out["loss_llama"] + out["loss_qwen"]
        out["loss_llama"], out["loss_qwen"] = out["loss_llama"].detach(), out["loss_qwen"].detach()
        return out

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, float]:
        """Per LM: `{lm}_loss` (batch mean), and sums to aggregate over batches:
        `{lm}_loss_sum`, `{lm}_correct`, `{lm}_tokens`; plus `{lm}_acc` for this batch.
        Runs in eval mode (no dropout) and restores the previous mode."""
        was_training = self.training
        self.eval()
        try:
            batch = self._to_device(batch)
            z = self.latents(batch)
            out = {}
            for name in LM_NAMES:
                logits, target = self._logits(name, z, batch), batch[f"{name}_target"]
                keep = target != IGNORE_INDEX
                loss_sum = F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
                tokens = int(keep.sum())
                correct = int(((logits.argmax(-1) == target) & keep).sum())
                out[f"{name}_loss_sum"] = float(loss_sum)
                out[f"{name}_tokens"] = tokens
                out[f"{name}_correct"] = correct
                out[f"{name}_loss"] = float(loss_sum) / max(tokens, 1)
                out[f"{name}_acc"] = correct / max(tokens, 1)
            return out
        finally:
            self.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def _clean(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in ("module", "_orig_mod"))


def _export(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + _clean(k): v.detach().cpu().clone() for k, v in module.state_dict().items()}


def trainable_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Model-only export of what trains: `encoder` (encoder.* and pooler.* keys), `adapter_llama`,
    `adapter_qwen`; flat dicts of CPU tensors with plain names."""
    m = unwrap(model)
    return {
        "encoder": {**_export(unwrap(m.encoder), "encoder."), **_export(unwrap(m.pooler), "pooler.")},
        "adapter_llama": _export(unwrap(m.adapter_llama)),
        "adapter_qwen": _export(unwrap(m.adapter_qwen)),
    }
