#!/usr/bin/env python3
"""When each worker's push of each key reached the server's proxy (issue 27): one job on
the testbed (topology a: scheduler, one server host, two worker hosts) with the server
proxy's `push arrived` trace on, then per round from the second (the n-th push of every
key; the first follows the initial pull) its span, the
pause before it, and the workers' lag (the second worker's arrival minus the first's)
per key; `--round N` lists round N key by key. The proxies' `/debug/state` (the learned
order with each key's production offset) is printed side by side for the two workers,
and whether they defer the same keys.

    .venv/bin/python bench/push_timeline.py --model vgg19 [--round 8] [-- PROXY FLAGS]
"""
import argparse
import collections
import datetime
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster  # noqa: E402
from bench import deferred_tail  # noqa: E402
from cluster import Proxies, Topology, run_job  # noqa: E402

TOPO = Topology("h1", ["h2"], ["h3", "h4"])
JOB = os.path.join(cluster.ROOT, "bench", "emulated_job.py")
SCALE = {"vgg19": "0.1", "resnet50_v1": "0.5"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def arrivals(log_path):
    """{key: {worker: [arrival time, ...]}} from the server proxy's trace."""
    out = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in open(log_path):
        line = ANSI.sub("", line)
        if "push arrived" not in line:
            continue
        t = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
        ago = re.search(r"ago_us=(\d+)", line)
        t -= int(ago.group(1)) / 1e6 if ago else 0.0
        worker = int(re.search(r"worker=(\d+)", line).group(1))
        for k in re.search(r"keys=\[([^\]]*)\]", line).group(1).split(","):
            if k.strip():
                out[int(k)][worker].append(t)
    return out


def rounds(ev, show):
    workers = sorted({w for k in ev for w in ev[k]})
    if len(workers) != 2:
        raise SystemExit(f"expected two workers' pushes, got {workers}")
    a, b = workers
    n = min(len(ev[k][w]) for k in ev for w in workers)
    prev_end = None
    for r in range(1, n):
        rows = sorted((min(ev[k][a][r], ev[k][b][r]), k, ev[k][a][r], ev[k][b][r]) for k in ev)
        start, end = rows[0][0], max(max(x[2], x[3]) for x in rows)
        lags = [(y - x) * 1000 for _, _, x, y in rows]
        pause = f"{(start - prev_end) * 1000:5.0f}" if prev_end else "    -"
        print(f"round {r:2d}: span {(end - start) * 1000:5.0f} ms, pause before {pause} ms; lag w{b}-w{a} ms: "
              f"median {statistics.median(lags):6.1f}, |lag| > 100 ms: {sum(abs(x) > 100 for x in lags)} keys")
        if r == show:
            for _, k, x, y in rows:
                print(f"    key {k:4d}  w{a} {(x - start) * 1000:7.1f}  w{b} {(y - start) * 1000:7.1f}  lag {(y - x) * 1000:7.1f}")
        prev_end = end


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SCALE), default="vgg19")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--round", type=int, default=8, help="list this round key by key")
    ap.add_argument("proxy_flags", nargs="*", help="after --: flags for every proxy (e.g. --priority key)")
    a = ap.parse_args()
    args = ["--model", a.model, "--scale", SCALE[a.model], "--iters", "12", "--warmup", "2", "--compute-ms", "300", "--api", "gluon"]
    os.environ["P3PROXY_LOG"] = "info,p3proxy::io::split=trace"
    cluster.testbed_up(4, a.rate)
    try:
        with Proxies(TOPO.hosts(), "push-timeline", ["--link-rate", a.rate] + a.proxy_flags) as proxies:
            result = run_job(TOPO, JOB, "push-timeline", timeout=300, args=args)
    finally:
        cluster.testbed_down()
    times = next(json.loads(line[6:]) for name, text in result.logs.items() if name.startswith("worker")
                 for line in text.splitlines() if line.startswith("TIMES "))
    print(f"step {statistics.median(times):.3f} s (median), pair lag {(proxies.pair_lag or 0) * 1000:.0f} ms (mean)")
    rounds(arrivals(os.path.join(cluster.LOGS, "push-timeline-proxy-h2.log")), a.round)
    orders = {h: [k for k, _ in deferred_tail(proxies.states[h]) or []] for h in ("h3", "h4") if h in proxies.states}
    if len(orders) == 2 and all(orders.values()):
        same = orders["h3"] == orders["h4"]
        print(f"deferred, in sending order: h3 {orders['h3']}" + ("; h4 the same" if same else f"; h4 {orders['h4']} (DIFFERENT)"))
    for h in ("h3", "h4"):
        order = sorted(proxies.states.get(h, {}).get("priority", {}).get("learned_order", []),
                       key=lambda e: e["offset_ms"] if e["offset_ms"] is not None else 0.0)
        if order:
            print(f"{h} production offsets (ms): " + " ".join(f"{e['key']}@{e['offset_ms']:.1f}" for e in order))


if __name__ == "__main__":
    main()
