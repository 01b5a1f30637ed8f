"""`scripts/bench --smoke`: the benchmark's plumbing (not its speed) - the three systems
run side by side on the testbed, the bitwise checks pass, the report is written, and
nothing is left behind."""
import json
import os
import subprocess

import cluster

BENCH = os.path.join(cluster.ROOT, "bench", "bench.py")


def test_bench_smoke(tmp_path):
    out = subprocess.run([cluster.PYTHON, BENCH, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("direct", "mxnet-p3", "p3proxy"):
        assert f"| {name} |" in out.stdout, out.stdout
    assert "Bitwise checks: passed." in out.stdout
    data = json.load(open(tmp_path / "bench.json"))
    assert [r["system"] for r in data["rows"]] == ["direct", "mxnet-p3", "p3proxy"]
    assert all(r["median_s"] > 0 and r["x_ideal"] > 0 for r in data["rows"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # Cleaned up: no namespace, bridge or proxy left.
    assert cluster.PREFIX + "-h" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["pgrep", "-f", cluster.PROXY + " run"], capture_output=True).returncode == 1


def test_bench_real_model_smoke(tmp_path):
    """The real-model mode: gluon.Trainer itself, real forward/backward."""
    out = subprocess.run([cluster.PYTHON, BENCH, "--smoke", "--real", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "API real gluon.Trainer" in out.stdout and "Bitwise checks: passed." in out.stdout
    data = json.load(open(tmp_path / "bench.json"))
    assert [r["system"] for r in data["rows"]] == ["direct", "mxnet-p3", "p3proxy"]
