"""benchmarks/save_latency.py and incremental_save.py run end to end at a tiny size and write complete reports
(no timing is asserted: speed is reported by the benchmark, not tested)."""
import json
import os
import sys

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow  # integration: the benchmark scripts, run for real

SAVE_LATENCY = os.path.join(ROOT, "benchmarks", "save_latency.py")
INCREMENTAL = os.path.join(ROOT, "benchmarks", "incremental_save.py")
METHODS = ["torch_save_rank0", "dcp_sync", "dcp_async_thread", "engine_sync", "engine_async"]
ALL_METHODS = METHODS[:3] + ["dcp_async_cached"] + METHODS[3:]
KEYS = {"method", "world_size", "state_bytes", "size_mb", "blocking_s", "total_s", "load_s", "step_slowdown",
        "cold_blocking_s", "cold_total_s", "peak_rss_growth_bytes", "hash_s", "hash_gbps", "repeats"}
FLOORS = {"memcpy_gbps", "write_gbps", "read_gbps", "cold_read_gbps"}
TARGETS = {"engine_async.blocking_s / memcpy floor time for its state",
           "engine_async.blocking_s / dcp_async_thread.blocking_s", "engine_sync.total_s / dcp_sync.total_s",
           "state bytes x ranks / engine_sync.total_s, of write_gbps",
           "state bytes x ranks / engine_sync.load_s, of read_gbps (page cache)",
           "engine_async.step_slowdown", "dcp_async_thread.step_slowdown"}


def test_incremental_save_reports_every_scheme_and_writes_only_what_changed(tmp_path):
    """Bytes are counted, not timed: after the first saves a checkpoint writes about the trainable state
    (parameters and AdamW moments, plus counters) with either incremental scheme, the whole model too without.
    Kept on disk: the independent scheme holds the frozen LMs twice (the newest two checkpoints share no file),
    the newest-linking one once, incremental=False once per checkpoint."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", INCREMENTAL, "--saves", "3",
         "--rounds", "1", "--dir", str(tmp_path / "runs"), "--out", str(tmp_path / "inc.json")], timeout=400)
    report = json.load(open(tmp_path / "inc.json"))
    modes = {(s["scheme"], s["async"]): s for s in report["summary"]}
    assert set(modes) == {(scheme, a) for scheme in ("independent", "newest", "off") for a in (False, True)}
    frozen = report["model_bytes"] - report["trainable_state_bytes"] / 3
    for asynchronous in (False, True):
        new, old, off = (modes[(scheme, asynchronous)] for scheme in ("independent", "newest", "off"))
        for on in (new, old):
            assert 1.0 <= on["written_over_trainable"] < 1.5 < 5 < off["written_over_trainable"]
        assert 0.9 * frozen < new["disk_bytes"] - old["disk_bytes"] < 1.1 * frozen  # one more copy of the LMs
        assert new["disk_bytes"] < 0.8 * off["disk_bytes"]
    assert modes[("independent", True)]["peak_staging_bytes"] < modes[("off", True)]["peak_staging_bytes"] / 5
    trainable_params = report["trainable_state_bytes"] / 3
    assert report["model_bytes"] - trainable_params >= 20 * trainable_params  # the frozen LMs: >= 20x


def test_save_latency_smoke_writes_complete_json_and_table(tmp_path):
    out, save_dir = tmp_path / "out", tmp_path / "other_fs" / "bench"
    (tmp_path / "other_fs").mkdir()
    (tmp_path / "other_fs" / "keep.txt").write_text("not the benchmark's")
    run([sys.executable, SAVE_LATENCY, "--sizes", "1", "--repeats", "1", "--out", str(out),
         "--save-dir", str(save_dir)])
    report = json.load(open(out / "save_latency.json"))
    assert set(report) == {"machine", "run", "floors", "floor_trials", "results", "targets", "unavailable"}
    assert set(report["floors"]) >= FLOORS  # cold_read_gbps may be None where pages cannot be evicted
    assert all(report["floors"][k] is not None for k in FLOORS - {"cold_read_gbps"})
    assert all(len(report["floor_trials"][k]) == 3 for k in FLOORS - {"cold_read_gbps"})
    # DCP's cached staging runs where it can (CUDA); elsewhere it is reported with DCP's own error
    assert set(report["unavailable"]) <= {"dcp_async_cached"} and all(report["unavailable"].values())
    methods = [m for m in ALL_METHODS if m not in report["unavailable"]]
    rounds = report["run"]["rounds"]["1"]  # the cold round, then one warm: every method once each, reordered
    assert len(rounds) == 2 and all(sorted(r) == sorted(methods) for r in rounds) and rounds[0] != rounds[1]
    assert [r["method"] for r in report["results"]] == methods
    for r in report["results"]:
        assert KEYS <= set(r), KEYS - set(r)
        for key in ("blocking_s", "total_s", "load_s"):
            assert {"median", "min", "max"} <= set(r[key])
        engine = r["method"].startswith("engine")
        assert (r["hash_s"] is not None) == engine and (r["hash_gbps"] is not None) == engine
        if engine:
            assert {"median", "min", "max"} <= set(r["hash_s"])
    targets = report["targets"]
    assert {t["measure"] for t in targets} >= TARGETS - {"engine_async.step_slowdown",
                                                          "dcp_async_thread.step_slowdown"}
    for t in targets:
        assert {"size_mb", "measure", "value", "unit", "op", "target", "met"} <= set(t)
        assert (t["op"] is None) == t["measure"].endswith("step_slowdown")
        assert t["met"] in ((None,) if t["op"] is None else (True, False))
    table = (out / "save_latency.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert all(f"{m}: not run here ({why})" in table for m, why in report["unavailable"].items())
    assert "### Targets" in table and "| hash s |" in table
    # only what the run created is removed: the save dir it made, not the directory that was already there
    assert not save_dir.exists() and (tmp_path / "other_fs" / "keep.txt").exists()
    assert not (out / "ckpt").exists()


def test_save_latency_default_save_dir_is_removed(tmp_path):
    run([sys.executable, SAVE_LATENCY, "--sizes", "1", "--repeats", "1", "--methods", "engine_sync", "dcp_sync",
         "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "save_latency.json"))
    assert [r["method"] for r in report["results"]] == ["dcp_sync", "engine_sync"]
    assert [t["measure"] for t in report["targets"]][0] == "engine_sync.total_s / dcp_sync.total_s"
    assert not (tmp_path / "ckpt").exists()


# -- --save-dir URL: the object-store path through fsspec -----------------------------------------------------
COMPARE = os.path.join(ROOT, "benchmarks", "compare_runs.py")
EMULATOR_WRAPPER = os.path.join(ROOT, "benchmarks", "run_with_s3_emulator.py")
URL_FLOORS = {"memcpy_gbps", "write_gbps", "read_gbps"}


def check_url_report(report: dict, url: str, storage: str, methods: list[str]) -> None:
    assert set(report) == {"machine", "run", "floors", "floor_trials", "results", "targets", "unavailable"}
    assert report["run"]["save_dir"] == url and report["run"]["storage"] == storage
    assert all(report["floors"][k] is not None and len(report["floor_trials"][k]) == 3 for k in URL_FLOORS)
    assert report["floors"]["cold_read_gbps"] is None and report["floor_trials"]["cold_read_gbps"] == []
    assert [r["method"] for r in report["results"]] == methods
    for r in report["results"]:
        assert KEYS <= set(r), KEYS - set(r)
        assert (r["hash_s"] is not None) == r["method"].startswith("engine")
    if "engine_sync" in methods:
        measures = {t["measure"] for t in report["targets"]}
        assert {"state bytes x ranks / engine_sync.total_s, of write_gbps (PUT)",
                "state bytes x ranks / engine_sync.load_s, of read_gbps (GET)"} <= measures


def test_save_latency_on_a_url_runs_every_method_through_fsspec(tmp_path):
    """memory:// lives in one process, so one rank: covers the URL code path of every method cheaply."""
    url = "memory://bench/run"
    run([sys.executable, SAVE_LATENCY, "--sizes", "1", "--repeats", "1", "--out", str(tmp_path), "--save-dir", url])
    report = json.load(open(tmp_path / "save_latency.json"))
    check_url_report(report, url, "memory", METHODS)
    table = (tmp_path / "save_latency.md").read_text()
    assert f"Save dir: {url} (memory)" in table and "cold read n/a" in table
    assert all(f"| {m} |" in table for m in METHODS)
    # compare_runs: per-method ratios of two runs (here the run against itself: every ratio 1.00x)
    out = run([sys.executable, COMPARE, str(tmp_path / "save_latency.json"), str(tmp_path / "save_latency.json"),
               "--out", str(tmp_path / "compare.md")]).stdout
    assert out == (tmp_path / "compare.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in METHODS]
    assert [r.split(" | ")[0][2:] for r in rows] == METHODS
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[5] == cells[8] == cells[11] == "1.00x", row  # blocking, total, load: B / A


def test_save_latency_storage_options_need_a_url(tmp_path):
    proc = run([sys.executable, SAVE_LATENCY, "--out", str(tmp_path), "--storage-options", "{}"], check=False)
    assert proc.returncode == 2 and "applies to a URL --save-dir only" in proc.stderr


def test_save_latency_on_s3_emulator_uses_storage_options_and_removes_only_its_prefix(tmp_path):
    """moto's S3 emulator on 127.0.0.1 (not AWS). The endpoint reaches the benchmark only through
    --storage-options (AWS_ENDPOINT_URL is unset for it, and tests/netguard refuses anything but 127.0.0.1), so
    every method, floor and hash must use the options; the bucket keeps only what was there before."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import s3_emulator

    with s3_emulator.running() as emu:
        bucket = emu.new_bucket()
        fs = emu.fs()
        fs.pipe_file(f"{bucket}/bench/keep.txt", b"not the benchmark's")
        os.environ.pop("AWS_ENDPOINT_URL")  # put back when the emulator stops
        env = {k: v for k, v in emu.env.items() if k != "AWS_ENDPOINT_URL"}
        url, methods = f"s3://{bucket}/bench", ["torch_save_rank0", "dcp_sync", "engine_sync"]
        options = json.dumps({"client_kwargs": {"endpoint_url": emu.endpoint}})
        run([sys.executable, SAVE_LATENCY, "--sizes", "1", "--repeats", "1", "--out", str(tmp_path), "--save-dir",
             url, "--storage-options", options, "--methods", *methods], env=env)
        check_url_report(json.load(open(tmp_path / "save_latency.json")), url, "s3", methods)
        assert fs.find(bucket) == [f"{bucket}/bench/keep.txt"]


def test_run_with_s3_emulator_gives_the_command_an_endpoint_and_a_bucket():
    pytest.importorskip("moto")
    code = ("import os, boto3; boto3.client('s3').head_bucket(Bucket='wrapped'); "
            "print(os.environ['AWS_ENDPOINT_URL']); raise SystemExit(3)")
    proc = run([sys.executable, EMULATOR_WRAPPER, "--bucket", "wrapped", "--", sys.executable, "-c", code], check=False)
    assert proc.returncode == 3, proc.stderr  # the command's own status
    assert proc.stdout.startswith("http://127.0.0.1:") and "not AWS" in proc.stderr


RESUME_TIME = os.path.join(ROOT, "benchmarks", "resume_time.py")
RESUME_PHASES = {"startup", "build", "discovery_verification", "load", "first_step", "total"}


def test_resume_time_smoke_reports_phases_bytes_and_ratios(tmp_path):
    """One rank, one tiny size, cold cache, one launch per method: every phase, each rank's bytes, the ratios."""
    run([sys.executable, RESUME_TIME, "--quick", "--ranks", "1", "--sizes", "2", "--cache", "cold",
         "--code-note", "smoke", "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "resume_time.json"))
    assert set(report) == {"machine", "run", "cells", "trials"} and report["run"]["code_note"] == "smoke"
    assert [t["method"] for t in report["trials"]] == ["engine", "dcp_plain", "read_floor"]
    assert all(t["resident_before"] is None or 0 <= t["resident_before"] <= 1 for t in report["trials"])
    [cell] = report["cells"]
    assert (cell["ranks"], cell["size_mb"], cell["cache"]) == (1, 2, "cold") and cell["ckpt_bytes"] > 0
    s = cell["summary"]
    assert all(s["engine"][k] > 0 for k in RESUME_PHASES), s["engine"]
    assert all(s["dcp_plain"][k] > 0 for k in RESUME_PHASES - {"discovery_verification"})
    assert s["read_floor"]["load"] > 0
    for method in ("engine", "dcp_plain"):  # bytes read during the resume, per rank and as a share
        [rank0] = s[method]["per_rank"]
        assert rank0["rchar"] > 0 and rank0["rchar_fraction"] > 0.5 and rank0["read_bytes"] is not None
    for key in ("ratio_engine_over_plain_load", "ratio_engine_over_plain_total", "ratio_engine_over_floor_load"):
        assert isinstance(s[key], float) and s[key] > 0, key
    table = (tmp_path / "resume_time.md").read_text()
    assert "| ranks | params MB | ckpt MB | cache | engine total |" in table and "| 1 | 2 | " in table
    assert not [p for p in os.listdir(tmp_path) if p.startswith("resume_time_")]  # its save dir is removed


GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    proc = run(["bash", GPU_CHECK, str(tmp_path)], env={"PYTHON": sys.executable}, timeout=120)
    assert "gpu_check: no usable CUDA GPU, skipping every GPU step (exit 0): " in proc.stdout, proc.stdout
    assert "a CPU-only build (torch.version.cuda is None)" in proc.stdout
    assert os.listdir(tmp_path) == ["gpu_check.log"]


def test_gpu_check_script_runs_every_step_on_cpu_when_told_to(tmp_path):
    """GPU_CHECK_ALLOW_CPU=1 (the script's own test mode): every step runs at a tiny size on CPU and the table
    and step list come out, so the script a lent GPU gets has run end to end here (the GPU paths have not)."""
    out = tmp_path / "out"
    proc = run(["bash", GPU_CHECK, str(out)], timeout=420,
               env={"PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_METHODS": "dcp_sync engine_sync",
                    "GPU_CHECK_SAVE_DIR": str(tmp_path / "scratch")})
    summary = (out / "summary.md").read_text()
    assert "| params MB/rank | method | state MB/rank | blocking s | D2H floor s |" in summary, summary
    assert all(f"| {m} |" in summary for m in ("dcp_sync", "engine_sync")), summary
    assert "Steps (CPU TEST RUN of the script, not a GPU check" in summary
    steps = summary.split("Steps (CPU TEST RUN")[1].splitlines()[1:]
    assert len(steps) == 4 and all(": ok (" in line for line in steps), steps  # install, pytest, probe, 16 MB
    assert "every step ok" in proc.stdout and os.listdir(tmp_path / "scratch") == []
