"""Examples, the two stand-in tokenizers, and batch collation for LatentWire.

Everything here is pure and deterministic: no global RNG, no downloads, no Python `hash()`
(which is salted per process).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

import torch

DATASET_CHOICES = ("synthetic", "squad", "PATH to a SQuAD-v1 .json or .jsonl file")
_CHOICES_TEXT = "choices: synthetic, squad, or a PATH to a SQuAD-v1 .json/.jsonl file"
SQUAD_HUB = "rajpurkar/squad"  # SQuAD v1.1 on the Hugging Face hub
SQUAD_HOW = (f"to use it, `pip install datasets` and run once where the hub is reachable ({SQUAD_HUB} is then "
             "cached under HF_HOME, and HF_DATASETS_OFFLINE=1 reads the cache without a network), or download "
             "SQuAD's train-v1.1.json and pass --dataset PATH/train-v1.1.json")
SYNTHETIC_DEFAULT_SIZE = 1000

# Token ids shared by both stand-in vocabularies.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3
LLAMA_VOCAB = N_SPECIAL + 256  # specials + one token per byte
QWEN_VOCAB = 512               # specials + byte bigrams hashed into the other 509 ids
IGNORE_INDEX = -100
# The byte encoder sees raw bytes 0..255 plus this pad id.
BYTE_PAD = 256
BYTE_VOCAB = 257
QUESTION_SEP = "\nQuestion: "

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_COUNTRIES = ["Avalon", "Borduria", "Carpania", "Drakonia", "Elbonia", "Freedonia", "Genovia",
              "Havenland", "Ishtar", "Jandora", "Krakozhia", "Latveria", "Molvania", "Nordland",
              "Orsinia", "Pottsylvania", "Qumar", "Ruritania", "Sylvania", "Tazbekistan"]
_CITIES = ["Ashford", "Brimvale", "Coldharbor", "Dunmere", "Eastwick", "Fairhaven", "Glenrock",
           "Highmoor", "Ironbridge", "Juniper", "Kingsport", "Larkspur", "Millbrook", "Northgate",
           "Oakridge", "Pinecrest", "Queensbury", "Riverton", "Stonefield", "Thornbury"]
_PEOPLE = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines",
           "Jonas", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa"]
_JOBS = ["baker", "carpenter", "chemist", "dentist", "farmer", "pilot", "plumber", "poet",
         "sailor", "surgeon", "tailor", "teacher"]
_ANIMALS = ["badger", "camel", "dolphin", "falcon", "gecko", "heron", "lynx", "otter",
            "panda", "raven", "tiger", "walrus"]
_OBJECTS = ["box", "chair", "door", "kettle", "lamp", "rug", "vase", "bicycle"]
_PLACES = ["attic", "garden", "hallway", "kitchen", "library", "garage", "cellar", "studio"]
_COLORS = ["amber", "blue", "crimson", "green", "indigo", "orange", "silver", "violet", "white"]


def _fact(kind: int, rng: random.Random) -> tuple[str, str, str]:
    """One templated (fact sentence, question, answer)."""
    if kind == 0:
        c, y = rng.choice(_COUNTRIES), rng.choice(_CITIES)
        return f"The capital of {c} is {y}.", f"What is the capital of {c}?", y
    if kind == 1:
        p, j = rng.choice(_PEOPLE), rng.choice(_JOBS)
        return f"{p} works as a {j}.", f"What does {p} work as?", j
    if kind == 2:
        p, a = rng.choice(_PEOPLE), rng.choice(_ANIMALS)
        return f"{p}'s favorite animal is the {a}.", f"What is {p}'s favorite animal?", a
    o, pl, col = rng.choice(_OBJECTS), rng.choice(_PLACES), rng.choice(_COLORS)
    return f"The {o} in the {pl} is {col}.", f"What color is the {o} in the {pl}?", col


def synthetic_example(index: int, seed: int = 0) -> dict:
    """Three facts of different kinds; the question asks about one. Depends only on (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    kinds = rng.sample(range(4), 3)
    facts = [_fact(k, rng) for k in kinds]
    target = rng.randrange(3)
    _, question, answer = facts[target]
    return {"id": index, "context": " ".join(f[0] for f in facts), "question": question,
            "answer": answer}


def _first_answer(answers, where: str) -> str:
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: 'answers' must be a non-empty list")
    first = answers[0]
    text = first.get("text") if isinstance(first, dict) else first
    if not isinstance(text, str):
        raise ValueError(f"{where}: the first answer is neither a string nor {{'text': str}}")
    return text


def _record(obj, where: str) -> dict:
    """Normalise one JSONL object into context/question/answer."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    context, question = obj.get("context"), obj.get("question")
    if not isinstance(context, str) or not isinstance(question, str):
        raise ValueError(f"{where}: needs string fields 'context' and 'question'")
    if isinstance(obj.get("answer"), str):
        answer = obj["answer"]
    elif "answers" in obj:
        answer = _first_answer(obj["answers"], where)
    else:
        raise ValueError(f"{where}: needs 'answer' (str) or 'answers' (list)")
    return {"context": context, "question": question, "answer": answer}


def _squad_records(obj: dict) -> list[dict]:
    """SQuAD v1 layout; questions without answers (SQuAD v2 'impossible' ones) are skipped."""
    out = []
    for a, article in enumerate(obj["data"]):
        for p, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                if qa.get("answers"):
                    answer = _first_answer(qa["answers"], f"data[{a}].paragraphs[{p}]")
                    out.append({"context": para["context"], "question": qa["question"],
                                "answer": answer})
    return out


def _jsonl_records(text: str) -> list[dict]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            out.append(_record(json.loads(line), f"line {n}"))
    return out


def _load_file(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "data" in obj:
            return _squad_records(obj)
        return _jsonl_records(text)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
        detail = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"missing key {e}"
        raise ValueError(f"--dataset {path!r}: not a SQuAD-v1 JSON or JSONL file ({detail}); "
                         f"{_CHOICES_TEXT}") from e


def _squad_from_hub(samples: int | None) -> list[dict]:
    """SQuAD v1.1's train split through Hugging Face `datasets` (its cache, or the hub), in its own order."""
    try:
        import datasets  # optional: only --dataset squad needs it
    except ImportError:
        raise ValueError(f"--dataset squad: Hugging Face `datasets` is not installed; {SQUAD_HOW}") from None
    split = "train" if samples is None else f"train[:{samples}]"
    try:
        rows = datasets.load_dataset(SQUAD_HUB, split=split)
    except Exception as e:  # offline without a cache, hub errors: datasets raises many kinds
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"--dataset squad: SQuAD is neither in the local cache nor reachable ({detail}); "
                         f"{SQUAD_HOW}") from None
    return [{"context": r["context"], "question": r["question"], "answer": _first_answer(r["answers"]["text"],
                                                                                          "squad")}
            for r in rows if r["answers"]["text"]]


def load_examples(dataset: str, samples: int | None, seed: int = 0) -> list[dict]:
    """Examples as dicts with `id` (0..N-1, in order), `context`, `question`, `answer`.

    `seed` only affects the synthetic generator; files are read in their own order.
    """
    if samples is not None and samples < 1:
        raise ValueError(f"--samples {samples}: must be a positive integer or None")
    if dataset == "synthetic":
        n = SYNTHETIC_DEFAULT_SIZE if samples is None else samples
        return [synthetic_example(i, seed) for i in range(n)]
    if dataset == "squad":
        return [{"id": i, **r} for i, r in enumerate(_squad_from_hub(samples))]
    if not isinstance(dataset, str) or not os.path.isfile(dataset):
        raise ValueError(f"--dataset {dataset!r}: not 'synthetic' and no such file; {_CHOICES_TEXT}")
    records = _load_file(dataset)[:samples]
    if not records:
        raise ValueError(f"--dataset {dataset!r}: the file holds no answered questions; "
                         f"{_CHOICES_TEXT}")
    return [{"id": i, **r} for i, r in enumerate(records)]


# ---------------------------------------------------------------------------------------------
# Tokenizers (stand-ins with deliberately different vocabularies)
# ---------------------------------------------------------------------------------------------

def tokenize_llama(text: str) -> list[int]:
    """One token per UTF-8 byte, offset past the specials."""
    return [N_SPECIAL + b for b in text.encode("utf-8")]


@dataclass(frozen=True)
class Vocab:
    """How one LM's answers become token ids: its tokenizer and its special ids."""

    encode: Callable[[str], list[int]]
    bos: int = BOS_ID
    eos: int = EOS_ID
    pad: int = PAD_ID


def hf_vocab(tokenizer) -> Vocab:
    """A Hugging Face tokenizer's Vocab. Without a BOS token (Qwen2) the answer starts after EOS; without a
    pad token, EOS pads (targets at padded positions are ignored either way)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Vocab(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], bos, eos, pad)


def tokenize_qwen(text: str) -> list[int]:
    """Non-overlapping byte pairs hashed (Knuth multiplicative, fixed) into the non-special ids.

    A trailing odd byte pairs with the sentinel 256. Lossy on purpose: it only has to be a different,
    deterministic tokenization from the llama stand-in's.
    """
    data = text.encode("utf-8")
    out = []
    for i in range(0, len(data), 2):
        pair = data[i] * 257 + (data[i + 1] if i + 1 < len(data) else 256)
        mixed = ((pair * 2654435761) & 0xFFFFFFFF) >> 7
        out.append(N_SPECIAL + mixed % (QWEN_VOCAB - N_SPECIAL))
    return out


STAND_INS = {"llama": Vocab(tokenize_llama), "qwen": Vocab(tokenize_qwen)}  # for randomly initialised LMs


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------

def context_bytes(example: dict, max_bytes: int) -> bytes:
    """`context + "\\nQuestion: " + question`, truncating the context (not the question) to fit."""
    question = (QUESTION_SEP + example["question"]).encode("utf-8")[:max_bytes]
    context = example["context"].encode("utf-8")[: max_bytes - len(question)]
    return context + question


def _teacher_forcing(tokens: list[int], max_tokens: int, vocab: Vocab) -> tuple[list[int], list[int]]:
    """input = BOS + answer, target = answer + EOS (same length), answer cut to max_tokens."""
    tokens = tokens[:max_tokens]
    return [vocab.bos] + tokens, tokens + [vocab.eos]


def collate(examples: list[dict], max_context_bytes: int = 192, max_answer_tokens: int = 16,
            vocabs: dict[str, Vocab] | None = None) -> dict[str, torch.Tensor]:
    """Batch tensors. Answer tensors always have T = max_answer_tokens + 1 columns (fixed shapes);
    inputs are padded with each LM's pad id, targets with -100. `vocabs`: per LM (default: STAND_INS)."""
    vocabs = STAND_INS if vocabs is None else vocabs
    b, t = len(examples), max_answer_tokens + 1
    out = {
        "ids": torch.tensor([int(e["id"]) for e in examples], dtype=torch.long),
        "context_bytes": torch.full((b, max_context_bytes), BYTE_PAD, dtype=torch.long),
        "context_mask": torch.zeros((b, max_context_bytes), dtype=torch.bool),
    }
    for name in ("llama", "qwen"):
        out[f"{name}_input"] = torch.full((b, t), vocabs[name].pad, dtype=torch.long)
        out[f"{name}_target"] = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        raw = context_bytes(ex, max_context_bytes)
        out["context_bytes"][i, : len(raw)] = torch.tensor(list(raw), dtype=torch.long)
        out["context_mask"][i, : len(raw)] = True
        for name, vocab in vocabs.items():
            inp, tgt = _teacher_forcing(vocab.encode(ex["answer"]), max_answer_tokens, vocab)
            out[f"{name}_input"][i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            out[f"{name}_target"][i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return out
