import json
import sys

import pytest
import torch

from latentwire.data import (BOS_ID, BYTE_PAD, DATASET_CHOICES, EOS_ID, LLAMA_VOCAB, PAD_ID,
                             QWEN_VOCAB, collate, load_examples, tokenize_llama, tokenize_qwen)

CHOICES = "choices: synthetic, squad, or a PATH to a SQuAD-v1 .json/.jsonl file"


def test_synthetic_is_deterministic_and_independent_of_global_rng():
    import random
    random.seed(1)
    torch.manual_seed(1)
    a = load_examples("synthetic", 50, seed=3)
    random.seed(2)
    torch.manual_seed(2)
    b = load_examples("synthetic", 50, seed=3)
    assert a == b
    assert load_examples("synthetic", 50, seed=4) != a
    assert [e["id"] for e in a] == list(range(50))
    for e in a:
        assert e["answer"] and e["answer"] in e["context"]
        assert e["question"].endswith("?")
    assert len({e["context"] for e in a}) > 40  # actually varied


def test_samples_limit_and_default_size():
    assert len(load_examples("synthetic", None)) == 1000
    assert len(load_examples("synthetic", 7)) == 7
    # a prefix of a bigger set: example i depends only on (seed, i)
    assert load_examples("synthetic", 7) == load_examples("synthetic", 20)[:7]


def _squad():
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"id": "q1", "question": "Where is Paris?",
             "answers": [{"text": "France", "answer_start": 12}, {"text": "in France"}]},
            {"id": "q2", "question": "What is in France?", "answers": [{"text": "Paris"}]}]},
        {"context": "Rome is in Italy.", "qas": [
            {"id": "q3", "question": "Where is Rome?", "answers": [{"text": "Italy"}]}]}]}]}


def test_squad_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_squad()))
    ex = load_examples(str(path), None)
    assert ex == [
        {"id": 0, "context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"},
        {"id": 1, "context": "Paris is in France.", "question": "What is in France?", "answer": "Paris"},
        {"id": 2, "context": "Rome is in Italy.", "question": "Where is Rome?", "answer": "Italy"},
    ]
    assert load_examples(str(path), 2) == ex[:2]


def test_jsonl_with_every_answer_form(tmp_path):
    rows = [{"context": "c0", "question": "q0", "answer": "a0"},
            {"context": "c1", "question": "q1", "answers": ["a1", "x"]},
            {"context": "c2", "question": "q2", "answers": [{"text": "a2"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_examples(str(path), None)
    assert [(e["id"], e["context"], e["question"], e["answer"]) for e in ex] == [
        (0, "c0", "q0", "a0"), (1, "c1", "q1", "a1"), (2, "c2", "q2", "a2")]


def test_squad_without_datasets_or_a_cache_says_how_to_get_it(monkeypatch, tmp_path):
    """`--dataset squad` (the guide's command) with `datasets` missing (as in CI, which has no hub either): one
    sentence says how to get SQuAD."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed, even where it is
    with pytest.raises(ValueError) as e:
        load_examples("squad", 10)
    assert str(e.value).startswith("--dataset squad: Hugging Face `datasets` is not installed; to use it, "
                                   "`pip install datasets` and run once where the hub is reachable")
    assert "--dataset PATH/train-v1.1.json" in str(e.value) and "HF_DATASETS_OFFLINE=1" in str(e.value)


def test_unknown_dataset_names_the_value_and_choices():
    assert DATASET_CHOICES[0] == "synthetic"
    with pytest.raises(ValueError) as e:
        load_examples("foo", 10)
    assert str(e.value) == f"--dataset 'foo': not 'synthetic' and no such file; {CHOICES}"


def test_bad_or_empty_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json\n")
    with pytest.raises(ValueError, match=r"^--dataset '.*bad\.json': not a SQuAD-v1 JSON or JSONL file"):
        load_examples(str(bad), None)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"text": "no question here"}) + "\n")
    with pytest.raises(ValueError, match="line 1: needs string fields 'context' and 'question'"):
        load_examples(str(wrong), None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no answered questions"):
        load_examples(str(empty), None)
    with pytest.raises(ValueError, match="--samples 0"):
        load_examples("synthetic", 0)


def test_tokenizers_differ_and_stay_in_vocab():
    text = "Zürich, 1291!"
    llama, qwen = tokenize_llama(text), tokenize_qwen(text)
    assert len(llama) == len(text.encode()) and len(qwen) == (len(llama) + 1) // 2
    assert all(3 <= t < LLAMA_VOCAB for t in llama)
    assert all(3 <= t < QWEN_VOCAB for t in qwen)
    assert tokenize_qwen(text) == qwen  # no per-process hash salt


def test_collate_shapes_padding_and_teacher_forcing():
    ex = [{"id": 5, "context": "x" * 500, "question": "Why?", "answer": "because of the long reason"},
          {"id": 9, "context": "short", "question": "Who?", "answer": "me"}]
    b = collate(ex, max_context_bytes=64, max_answer_tokens=8)
    assert b["ids"].tolist() == [5, 9]
    assert b["context_bytes"].shape == b["context_mask"].shape == (2, 64)
    assert b["context_mask"].dtype == torch.bool and b["context_bytes"].dtype == torch.long
    # long context is truncated but the question survives at the end
    assert bytes(b["context_bytes"][0].tolist()).endswith(b"\nQuestion: Why?")
    assert b["context_mask"][0].all()
    n = len("short\nQuestion: Who?")
    assert b["context_mask"][1].sum() == n and (b["context_bytes"][1, n:] == BYTE_PAD).all()
    for lm, tok in (("llama", tokenize_llama), ("qwen", tokenize_qwen)):
        inp, tgt = b[f"{lm}_input"], b[f"{lm}_target"]
        assert inp.shape == tgt.shape == (2, 9) and inp.dtype == tgt.dtype == torch.long
        ans = tok("me")
        k = len(ans)
        assert inp[1, : k + 1].tolist() == [BOS_ID] + ans and (inp[1, k + 1:] == PAD_ID).all()
        assert tgt[1, : k + 1].tolist() == ans + [EOS_ID] and (tgt[1, k + 1:] == -100).all()
        long_ans = tok("because of the long reason")[:8]
        assert inp[0].tolist() == [BOS_ID] + long_ans and tgt[0].tolist() == long_ans + [EOS_ID]
    assert torch.equal(collate(ex)["llama_target"], collate(ex)["llama_target"])
