"""`dcp-resume export`, the real console script: model weights from a 2-rank FSDP2 checkpoint and a 1-rank one,
bit-equal to what plain DCP reads, loadable with safetensors and model.load_state_dict; refusals."""
import os
import re

import pytest
import torch
from cli_helpers import cli_many, copy_run, damage, run_main, trained_runs
from helpers import assert_same
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_resume import dcp_io
from dcp_resume import export as export_mod
from latentwire.model import LatentWire, ModelConfig
from latentwire.recipe import TINY

MODEL_TENSORS = len(LatentWire(ModelConfig(**TINY)).state_dict())  # the trainer's --tiny model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(str(tmp_path_factory.getbasetemp() / "cli_runs"))


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Every export this module checks; name -> (CompletedProcess, --out path). The two bit-equality exports
    run the real script (at once), the rest go through main() in this process."""
    out = tmp_path_factory.mktemp("exports")
    bad = damage(copy_run(runs["fsdp2_ws2"], tmp_path_factory.mktemp("export_damaged") / "run"))
    (out / "taken.safetensors").write_bytes(b"already here")
    (out / "replaced.safetensors").write_bytes(b"old")
    fsdp, ws1 = os.path.join(runs["fsdp2_ws2"], "step_12"), os.path.join(runs["ws1"], "step_4")
    real = {
        "fsdp2": [fsdp, "--out", out / "fsdp2.safetensors"],
        "ws1_torch": [ws1, "--out", out / "ws1.pt"],
    }
    in_process = {
        "fsdp2_encoder_bf16": [fsdp, "--out", out / "enc.safetensors", "--prefix", "encoder.", "--dtype", "bf16"],
        "corrupt": [os.path.join(bad, "step_12"), "--out", out / "corrupt.safetensors"],
        "incomplete": [os.path.join(bad, "step_15"), "--out", out / "incomplete.safetensors"],
        "no_match": [fsdp, "--out", out / "none.safetensors", "--prefix", "decoder"],
        "exists": [fsdp, "--out", out / "taken.safetensors"],
        "keep_prefix_force": [fsdp, "--out", out / "replaced.safetensors", "--prefix", "encoder", "--keep-prefix",
                              "--force"],
    }
    results = dict(zip(real, cli_many([["export", *argv] for argv in real.values()])))
    results.update({name: run_main("export", *argv) for name, argv in in_process.items()})
    return {name: (results[name], str(argv[2])) for name, argv in {**real, **in_process}.items()}


def plain_dcp_model(checkpoint: str, tmp_path) -> dict[str, torch.Tensor]:
    """The model tensors as plain DCP reads them (no project code; trusted input in a test)."""
    dcp_to_torch_save(os.path.join(checkpoint, "state"), tmp_path / "all.pt")
    return torch.load(tmp_path / "all.pt", weights_only=False)["model"]


def test_fsdp2_two_ranks_bit_equal_to_plain_dcp_and_loads(exported, runs, tmp_path):
    r, out = exported["fsdp2"]
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"Exported {MODEL_TENSORS} tensors \([\d.]+ MB, float32\) of step 12 from \S+/step_12 to "
                        rf"{out} \(safetensors\)\n", r.stdout)
    got = load_file(out)
    assert_same(got, plain_dcp_model(os.path.join(runs["fsdp2_ws2"], "step_12"), tmp_path))
    model = LatentWire(ModelConfig(**TINY))
    model.load_state_dict(got)  # strict: plain names, nothing missing or extra
    with safe_open(out, "pt") as f:
        assert f.metadata()["step"] == "12" and f.metadata()["state_key"] == "model"


def test_prefix_and_dtype_select_one_component(exported, runs, tmp_path):
    r, out = exported["fsdp2_encoder_bf16"]
    assert r.returncode == 0, r.stderr
    assert "Exported 16 tensors" in r.stdout and "bfloat16" in r.stdout
    got = load_file(out)
    ref = plain_dcp_model(os.path.join(runs["fsdp2_ws2"], "step_12"), tmp_path)
    want = {k.removeprefix("encoder."): v.to(torch.bfloat16) for k, v in ref.items() if k.startswith("encoder.")}
    assert_same(got, want)
    encoder = LatentWire(ModelConfig(**TINY)).encoder
    encoder.load_state_dict(got)  # names relative to --prefix: the file loads into the submodule
    assert torch.equal(encoder.pos.data, want["pos"].float())


def test_keep_prefix_and_force(exported):
    r, out = exported["keep_prefix_force"]
    assert r.returncode == 0, r.stderr
    names = list(load_file(out))
    assert len(names) == 16 and all(n.startswith("encoder.") for n in names)


def test_one_rank_torch_format_bit_equal(exported, runs, tmp_path):
    r, out = exported["ws1_torch"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"to {out} (torch)\n")
    got = torch.load(out, weights_only=True)
    assert_same(got, plain_dcp_model(os.path.join(runs["ws1"], "step_4"), tmp_path))
    LatentWire(ModelConfig(**TINY)).load_state_dict(got)


def test_refusals(exported):
    for name, pattern in {
        "corrupt": r"\S+/step_12 fails verification: state/__0_0.distcp content hash mismatch",
        "incomplete": r"\S+/step_15 is not a complete checkpoint \(no metadata.json",
        "no_match": rf"--prefix decoder matches none of the {MODEL_TENSORS} tensors of 'model' in \S+; its "
                    r"components are: adapter_llama, adapter_qwen, encoder, lm_llama, lm_qwen, pooler",
    }.items():
        r, out = exported[name]
        assert r.returncode == 1 and r.stdout == "" and not os.path.exists(out), name
        assert re.fullmatch(f"dcp-resume: error: {pattern}.*\n", r.stderr), r.stderr
    r, out = exported["exists"]
    assert r.returncode == 2 and open(out, "rb").read() == b"already here"
    assert r.stderr == f"dcp-resume: error: --out {out} already exists; pass --force to replace it, or choose " \
                       "another file\n"
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp" in n]


def test_only_the_exported_tensors_are_read(runs, tmp_path, monkeypatch):
    """Memory stays at the model's size: the template handed to DCP holds the selected model tensors only."""
    seen = {}
    real_load = dcp_io.load

    def spy(store, template, state_dir, group):
        seen.update({k: v.numel() * v.element_size() for k, v in template.items()})
        real_load(store, template, state_dir, group)

    monkeypatch.setattr(dcp_io, "load", spy)
    done = export_mod.export(os.path.join(runs["fsdp2_ws2"], "step_12"), str(tmp_path / "a.safetensors"),
                             prefix="adapter_llama")
    assert seen and all(k.startswith("model.adapter_llama.") for k in seen)
    assert done.count == len(seen) == 6 and done.nbytes == sum(seen.values())


def test_wrapper_prefixes_are_stripped():
    assert export_mod.plain_name("module._orig_mod.encoder.layers.0.weight") == "encoder.layers.0.weight"
    assert export_mod.plain_name("_orig_mod.module.net._fsdp_wrapped_module.w") == "net.w"
    assert export_mod.plain_name("enc._checkpoint_wrapped_module.w") == "enc.w"
    assert export_mod.plain_name("block.module.w") == "block.module.w"  # a submodule really named module
