"""scripts/demo's job (tests/e2e/demo.py), shortened: it prints the speedup, the bitwise
verdict and where the chart was written, and leaves nothing behind."""
import os
import subprocess

import cluster


def test_the_demo_prints_the_speedup_and_writes_the_chart(tmp_path):
    out = subprocess.run([cluster.PYTHON, os.path.join(cluster.ROOT, "tests", "e2e", "demo.py"), "--runs", "1", "--iters", "3",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trained weights bitwise identical to the direct job: yes" in out.stdout
    assert "speedup: " in out.stdout and f"chart: {tmp_path}/bench.png" in out.stdout
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "direct run 1/1" in out.stdout and "p3proxy run 1/1" in out.stdout, "progress is shown"
    assert cluster.PREFIX + "-h" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
