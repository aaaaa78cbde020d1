"""benchmarks/save_latency.py runs end to end at a tiny size and writes a complete report (no timing
is asserted: speed is reported by the benchmark, not tested)."""
import json
import os
import sys

from conftest import ROOT, run

SAVE_LATENCY = os.path.join(ROOT, "benchmarks", "save_latency.py")

KEYS = {"method", "world_size", "state_bytes", "blocking_s", "total_s", "load_s", "step_slowdown",
        "cold_blocking_s", "cold_total_s", "peak_rss_growth_bytes"}


def test_save_latency_smoke_writes_complete_json_and_table(tmp_path):
    run([sys.executable, SAVE_LATENCY, "--sizes", "1", "--repeats", "1", "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "save_latency.json"))
    assert set(report) == {"machine", "floors", "results"}
    assert set(report["floors"]) >= {"memcpy_gbps", "write_gbps", "read_gbps"}
    methods = [r["method"] for r in report["results"]]
    assert methods == ["torch_save_rank0", "dcp_sync", "dcp_async_thread", "engine_sync", "engine_async"]
    for r in report["results"]:
        assert KEYS <= set(r), KEYS - set(r)
        assert {"median", "min", "max"} <= set(r["blocking_s"])
    table = (tmp_path / "save_latency.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert not (tmp_path / "ckpt").exists()
