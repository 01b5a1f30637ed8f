"""`scripts/bench --smoke`: the benchmark's plumbing (not its speed) - the three systems
run side by side on the testbed, the bitwise checks pass, the report is written, and
nothing is left behind."""
import json
import os
import re
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
    # The wire bound: the ideal bound's busiest-link bytes in 1448-byte segments of 1514
    # bytes on the wire (MTU 1500), or compute where that is longer.
    compute = data["meta"]["compute_ms"] / 1000
    for r in data["rows"]:
        if r["ideal_s"] > compute:
            assert abs(r["wire_s"] - r["ideal_s"] * 1514 / 1448) < 1e-9, r
        else:
            assert r["wire_s"] >= r["ideal_s"], r
        assert abs(r["x_wire"] * r["wire_s"] - r["median_s"]) < 1e-9, r
    assert "wire bound" in out.stdout and "| x wire |" in out.stdout
    # The costs per iteration: every system's servers, the proxies of p3proxy.
    assert all(r["server_cpu_per_iter"] > 0 for r in data["rows"]), data["rows"]
    proxied = data["rows"][2]
    assert proxied["proxy_cpu_per_iter"] > 0 and proxied["slices_per_iter"] is not None, proxied
    # The mechanism of issue 27: the servers' proxies measured the workers' push pair lag;
    # every system says how far its slowest run is from its median.
    assert proxied["pair_lag_ms"] is not None and proxied["pair_lag_ms"] >= 0, proxied
    assert all(r["max_over_median"] >= 1 and len(r["run_medians_s"]) == data["meta"]["runs"] for r in data["rows"])
    assert "| max / median | pair lag ms | answers idle |" in out.stdout
    # ... and, given the testbed's link rate, how long the answers idled while requests
    # waited at them (a share of that time).
    assert proxied["answer_idle_share"] is not None and 0 <= proxied["answer_idle_share"] <= 1, proxied
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # Every run's proxy logs and /debug/state under its own tag.
    orders = {}
    for h in ("h1", "h2", "h3", "h4"):
        state = os.path.join(cluster.LOGS, f"bench-tiny-a-1gbit-fifo-p3proxy-run1-state-{h}.json")
        priority = json.load(open(state))["priority"]
        assert priority["configured"] == "learned", state
        # One order for the job (h1 scheduler, h2 server, h3 and h4 workers): worker 9's,
        # the lowest id, which its proxy passed on to the server's and the scheduler's, and
        # they to the other worker's; only the worker hosts learn orders of their own.
        assert priority["in_use"] == "learned" and priority["order_origin"] == 9, (h, priority)
        orders[h] = [(k["key"], k["server"], k["priority"]) for k in priority["learned_order"]]
    assert orders["h1"] and orders["h1"] == orders["h2"] == orders["h3"] == orders["h4"], orders
    # Cleaned up: no namespace, bridge or proxy left.
    assert cluster.PREFIX + "-h" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["pgrep", "-f", cluster.PROXY + " run"], capture_output=True).returncode == 1


def test_orders_same_compares_what_the_worker_hosts_proxies_defer():
    import sys
    sys.path.insert(0, os.path.dirname(BENCH))
    from bench import orders_same

    def state(*order):
        """(key, priority, production offset ms) per key."""
        return {"priority": {"learned_order": [{"key": k, "server": 0, "priority": p, "offset_ms": t} for k, p, t in order]}}

    # Key 0 produced last (the first layer); 3 and 4 deferred after it.
    a = state((1, 1, 10.0), (0, 2, 20.0), (4, 3, 0.0), (3, 4, 5.0))
    regrouped = state((1, 1, 10.0), (0, 1, 20.0), (4, 2, 0.0), (3, 3, 5.0))  # same sending order
    swapped = state((1, 1, 10.0), (0, 2, 20.0), (3, 3, 5.0), (4, 4, 0.0))
    more = state((1, 1, 10.0), (0, 2, 20.0), (4, 3, 0.0), (3, 4, 5.0), (1, 5, 10.0))
    assert orders_same({"h3": a, "h4": regrouped, "h2": swapped}, ["h3", "h4"]) is True  # a server host does not count
    assert orders_same({"h3": a, "h4": swapped}, ["h3", "h4"]) is False
    assert orders_same({"h3": a, "h4": more}, ["h3", "h4"]) is False
    assert orders_same({"h3": a, "h4": state()}, ["h3", "h4"]) is None  # one still on key order
    assert orders_same({"h3": a}, ["h3", "h4"]) is None  # a proxy without state


def test_bench_real_model_smoke(tmp_path):
    """The real-model mode: gluon.Trainer itself, real forward/backward."""
    out = subprocess.run([cluster.PYTHON, BENCH, "--smoke", "--real", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "API real gluon.Trainer" in out.stdout and "Bitwise checks: passed." in out.stdout
    data = json.load(open(tmp_path / "bench.json"))
    assert [r["system"] for r in data["rows"]] == ["direct", "mxnet-p3", "p3proxy"]


def test_proxy_cost_smoke(tmp_path):
    """`scripts/bench --proxy-cost --smoke`: every system on both paths, checksums
    verified, and the same-host proxy really spliced the pushes' bodies."""
    out = subprocess.run([cluster.PYTHON, BENCH, "--proxy-cost", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    samples = json.load(open(tmp_path / "proxy_cost.json"))
    seen = {(s["path"], s["system"]) for s in samples}
    for path in ("same-host", "tunnel"):
        for system in ("direct", "floor-rw", "floor-splice", "p3proxy"):
            assert (path, system) in seen, seen
    assert all(s["gbps"] > 0 for s in samples)
    spliced = re.search(r"same-host p3proxy: ([0-9.]+)", out.stdout)
    assert spliced and float(spliced.group(1)) > 0.1, out.stdout[-2000:]
    assert subprocess.run(["pgrep", "-f", "p3proxy-loadgen"], capture_output=True).returncode == 1


def test_simulate_smoke(tmp_path):
    """scripts/simulate: the validation table beside the testbed's measurements, and a
    scale table whose every row has each order and the best one named."""
    out = subprocess.run([os.path.join(cluster.ROOT, "scripts", "simulate"), "--workers", "2,4", "--servers", "1",
                          "--rates", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    validation = (tmp_path / "validation.md").read_text()
    # Each simulated order beside the testbed's measurement of it, from the results it names.
    measured = {r["system"]: r["median_s"] for r in json.load(open(os.path.join(cluster.ROOT, "bench", "results", "order-cut", "bench.json")))["rows"]
                if r["model"] == "resnet50_v1"}
    for order, system in (("direct", "direct"), ("key", "p3proxy-key"), ("defer20", "p3proxy")):
        row = rf"\| resnet50_v1 x0.5 \| {order} \| [\d.]+ \| {measured[system]:.3f} \| [\d.]+ \| bench/results/order-cut \|"
        assert re.search(row, validation), (order, validation)
    data = json.load(open(tmp_path / "sim.json"))
    assert {(r["workers"], r["order"]) for r in data["scale"]} == {(w, o) for w in (2, 4) for o in ("direct", "key", "layer", "defer20")}
    for r in data["scale"]:
        assert r["iteration_s"] >= r["wire_s"] - 1e-9, r  # nothing beats the wire
    rows = [l for l in (tmp_path / "scale.md").read_text().splitlines() if l.startswith("| vgg19") or l.startswith("| resnet")]
    orders = {"direct", "key", "layer", "defer20"}
    best = [l.rstrip(" |").split("| ")[-1] for l in rows]
    assert len(rows) == 4 and all(b == "all level" or set(b.split(", ")) < orders for b in best), rows
    # A bad order is refused with the reason, before anything runs.
    bad = subprocess.run([os.path.join(cluster.ROOT, "target", "release", "p3proxy-sim"), "--orders", "fastest"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and 'unknown order "fastest"' in bad.stderr, bad.stderr
