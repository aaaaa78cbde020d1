"""The trainer on a user's own inputs. --llama_model / --qwen_model DIR: the frozen LMs come from local Hugging
Face directories (weights and tokenizer, from_pretrained, nothing downloaded), written here with save_pretrained
from small configs and a character-level tokenizer, laid out as a downloaded snapshot is. --dataset: a file in
SQuAD v1 layout, as the guide's `--dataset squad` runs read."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dcp_resume import CheckpointManager

pytestmark = pytest.mark.slow  # integration: real trainer runs
SQUAD = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "Paris is in France.", "qas": [{"id": "q1", "question": "Where is Paris?", "answers": [
        {"text": "France", "answer_start": 12}]}, {"id": "q2", "question": "What is in France?", "answers": [
            {"text": "Paris"}]}]},
    {"context": "Rome is in Italy.", "qas": [{"id": "q3", "question": "Where is Rome?", "answers": [
        {"text": "Italy"}]}]}]}]}


def _tokenizer(**specials) -> PreTrainedTokenizerFast:
    names = list(specials.values())
    chars = {chr(c): len(names) + i for i, c in enumerate(range(32, 127))}
    vocab = {**{n: i for i, n in enumerate(names)}, **chars, "<unk>": len(names) + len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(5)
    llama_tok = _tokenizer(pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    qwen_tok = _tokenizer(eos_token="<|endoftext|>")  # Qwen2's layout: no BOS, no pad token
    families = {"llama": (LlamaConfig, LlamaForCausalLM, llama_tok, 48),
                "qwen": (Qwen2Config, Qwen2ForCausalLM, qwen_tok, 64)}
    for name, (config_cls, model_cls, tok, hidden) in families.items():
        config = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
        model_cls(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_trainer_trains_on_local_pretrained_lms_and_keeps_them_frozen(pretrained, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "latentwire/train.py", "--tiny", "--samples", "16", "--batch_size", "4", "--epochs", "1",
           "--save_every", "2", "--save_dir", str(run), "--llama_model", str(pretrained / "llama"),
           "--qwen_model", str(pretrained / "qwen")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training complete: 4 steps, 1 epochs" in proc.stdout
    state = CheckpointManager(run).load_checkpoint()["model"]
    for name, model_cls in (("llama", LlamaForCausalLM), ("qwen", Qwen2ForCausalLM)):
        original = model_cls.from_pretrained(pretrained / name).state_dict()
        saved = {k.removeprefix(f"lm_{name}."): v for k, v in state.items() if k.startswith(f"lm_{name}.")}
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original), name
    assert state["adapter_llama.net.3.weight"].shape == (48, 96)  # out: the loaded LM's hidden size


def test_a_model_dir_without_config_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "latentwire/train.py", "--tiny", "--llama_model", str(tmp_path),
                           "--save_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"--llama_model {tmp_path}: no config.json there; pass a local Hugging Face model directory (one "
        "save_pretrained() wrote, or a downloaded snapshot)")


def test_guide_command_dataset_squad_runs_on_a_squad_format_file(tmp_path):
    """The same data through a file the test writes in SQuAD v1 layout: the trainer trains on it."""
    path = tmp_path / "train-v1.1.json"
    path.write_text(json.dumps(SQUAD))
    proc = subprocess.run([sys.executable, "latentwire/train.py", "--tiny", "--dataset", str(path), "--epochs", "1",
                           "--batch_size", "2", "--save_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training complete: 2 steps, 1 epochs" in proc.stdout + proc.stderr
