"""The `dcp-resume` console script: --help, bad arguments (one line, exit 2), nothing found (exit 1).

The commands themselves on a real run: test_cli_read.py, test_cli_export.py, test_cli_prune.py."""
import os
import re
import shutil
import sys
import uuid

import pytest
from cli_helpers import cli_many, run_main
from common import Tiny
from conftest import run
from safetensors.torch import load_file
from test_safety import Payload, with_hostile_metadata

from dcp_resume import CheckpointManager
from dcp_resume.cli import main

SUBCOMMANDS = ("ls", "latest", "verify", "inspect", "export", "copy", "prune")


def test_installed_console_script_help():
    script = shutil.which("dcp-resume", path=os.path.dirname(sys.executable))
    assert script, "dcp-resume is not installed next to this python: pip install -e ."
    r = run([script, "--help"])
    for command in SUBCOMMANDS:
        assert f"\n    {command} " in r.stdout
    assert "examples:\n  dcp-resume ls runs/exp1" in r.stdout
    assert "exit codes:\n  0  ok\n  1  check failed or nothing found" in r.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dcp-resume {command} ") and f"\nexamples:\n  dcp-resume {command} " in out


def test_bad_arguments_get_one_line_and_exit_2(tmp_path):
    """The real script: a missing path, a file instead of a directory, N < 1."""
    missing, a_file = tmp_path / "nope", tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "step_5").mkdir()
    cases = {
        ("ls", missing): f"SAVE_DIR {missing} does not exist; pass the directory that holds the step_*/epoch* "
                         "checkpoint directories",
        ("verify", a_file): f"PATH {a_file} is a file, not a directory; pass a checkpoint directory or a save_dir",
        ("prune", tmp_path, "--keep", "0"): "argument --keep: '0' must be an integer >= 1 (the newest N complete "
                                            "checkpoints stay; keeping none would remove the one to resume from) "
                                            "(see `dcp-resume prune --help`)",
    }
    for argv, r in zip(cases, cli_many([list(argv) for argv in cases])):
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"dcp-resume: error: {cases[argv]}\n"), argv


@pytest.mark.parametrize("argv, message", [
    (["latest", "{tmp}/step_5"], "SAVE_DIR {tmp}/step_5 is a checkpoint, not a save_dir; pass the directory that "
                                 "holds it ({tmp})"),
    (["inspect", "{tmp}"], "PATH {tmp} is not a checkpoint directory; pass one checkpoint directory, e.g. "
                           "runs/exp1/step_500 (`dcp-resume ls SAVE_DIR` lists them)"),
    (["export", "{tmp}/step_5", "--out", "{tmp}"], "--out {tmp} is a directory; name the file to write, e.g. "
                                                   "{tmp}/model.safetensors"),
    (["export", "{tmp}/step_5", "--out", "{tmp}/no/m.safetensors"], "--out {tmp}/no/m.safetensors: directory "
                                                                    "{tmp}/no does not exist; create it first"),
    (["prune", "{tmp}", "--keep", "-1"], None),
    (["export", "{tmp}/step_5", "--out", "{tmp}/m.safetensors", "--dtype", "int8"],
     "argument --dtype: invalid choice: 'int8' (choose from 'bf16', 'fp16', 'fp32') (see `dcp-resume export --help`)"),
    (["ls"], "the following arguments are required: SAVE_DIR (see `dcp-resume ls --help`)"),
    ([], "the following arguments are required: COMMAND (see `dcp-resume --help`)"),
])
def test_more_usage_errors(argv, message, tmp_path, capsys):
    (tmp_path / "step_5").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("dcp-resume: error: ")
    if message is not None:
        assert err == f"dcp-resume: error: {message.format(tmp=tmp_path)}\n"


def test_nothing_found_exits_1(tmp_path, capsys):
    assert main(["latest", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"No checkpoint found to resume in {tmp_path}\n"
    assert main(["ls", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"dcp-resume: no checkpoint directories (step_*/epoch*) in {tmp_path}\n"
    assert main(["verify", str(tmp_path)]) == 1


def test_verify_inspect_export_never_unpickle(tmp_path):
    """A payload in DCP's .metadata (re-signed in metadata.json) or saved as a value: nothing runs it."""
    marker = tmp_path / "PWNED"
    for name, extra in (("meta", {}), ("item", {"evil": Payload(marker)})):
        with CheckpointManager(tmp_path / name, verbose=False) as mgr:
            mgr.save_checkpoint({"model": Tiny(), **extra}, step=1)
    meta_ckpt = with_hostile_metadata(tmp_path / "meta" / "step_1", marker)
    r = run_main("verify", meta_ckpt)
    assert r.returncode == 1 and r.stdout.startswith(f"BAD  step_1/state/.metadata: {meta_ckpt}/state/.metadata "
                                                     "holds a pickled object of type posix.system that dcp-resume "
                                                     "will not load")
    for argv in (["inspect", meta_ckpt], ["export", meta_ckpt, "--out", tmp_path / "m.safetensors"]):
        r = run_main(*argv)
        assert r.returncode == 1 and r.stderr.startswith("dcp-resume: error: ") and r.stderr.count("\n") == 1
    item_ckpt = tmp_path / "item" / "step_1"
    assert run_main("verify", item_ckpt).returncode == 0  # the value is never read, so nothing to refuse
    assert re.search(r"\n  evil +- +value ", run_main("inspect", item_ckpt).stdout)  # listed, not loaded
    assert run_main("export", item_ckpt, "--out", tmp_path / "i.safetensors").returncode == 0  # model only
    assert not marker.exists()


def test_a_url_save_dir(tmp_path):
    """The commands go through storage, so a save_dir URL works like a path (memory:// here; s3:// alike)."""
    url = f"memory://cli-{uuid.uuid4().hex[:8]}/run"
    with CheckpointManager(url, keep_last_n=None, verbose=False) as mgr:
        for step in (1, 2):
            mgr.save_checkpoint({"model": Tiny()}, step=step)
    ls = run_main("ls", url)
    assert ls.returncode == 0 and "step_2" in ls.stdout and "<- latest" in ls.stdout
    assert "free space unknown (object store)" in ls.stdout
    assert run_main("latest", url).stdout == f"{url}/step_2\n"
    assert run_main("verify", url).stdout.endswith("2 checkpoint directories: 2 OK, 0 BAD, 0 incomplete "
                                                   "(interrupted saves)\n")
    assert run_main("export", f"{url}/step_2", "--out", tmp_path / "m.safetensors").returncode == 0
    Tiny().load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert run_main("prune", url, "--keep", "1").stdout == ("removed step_1 (beyond the newest 1)\n"
                                                            "kept 1: step_2 (--auto_resume loads it)\n")
