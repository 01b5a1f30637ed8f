#!/usr/bin/env python3
"""Where the server's link idles (issue 27): one job on the testbed (topology a: scheduler,
one server host, two worker hosts), every host's NIC byte counters sampled every 0.5 ms,
and per run:

- the server host's ingress: its utilization and idle time over the steady part (the last
  70% of the busy span; a 2 ms bin under 20% of the rate counts as idle), and its idle
  stretches of 20 ms or more (the iteration boundary: the last push of an iteration is in,
  the next iteration's first gradient is not produced yet);
- the two workers' uplinks: how they shared the server's link (per busy 20 ms bin, worker
  h3's share of the two) and the most bytes one worker was ahead of the other;
- the job's step times and the server proxy's answer idle share (`--link-rate` given).

    .venv/bin/python bench/link_use.py --model vgg19 [--rate 1gbit] [--runs 3] [-- PROXY FLAGS]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import cluster  # noqa: E402
from cluster import Proxies, Topology, run_job  # noqa: E402

TOPO = Topology("h1", ["h2"], ["h3", "h4"])
JOB = os.path.join(cluster.ROOT, "bench", "emulated_job.py")
SCALE = {"vgg19": "0.1", "resnet50_v1": "0.5"}
# Samples the host's NIC byte counters until SIGTERM, then writes them.
SAMPLER = r"""
import signal, sys, time
stop = [False]
signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__(0, True))
rx = open("/sys/class/net/eth0/statistics/rx_bytes"); tx = open("/sys/class/net/eth0/statistics/tx_bytes")
rows = []
while not stop[0]:
    rx.seek(0); tx.seek(0)
    rows.append((time.time(), int(rx.read()), int(tx.read())))
    time.sleep(0.0005)
open(sys.argv[1], "w").write("\n".join(f"{t} {a} {b}" for t, a, b in rows))
"""


def binned(path, width):
    """Bytes received and sent per bin of `width` seconds (bin = absolute time / width)."""
    rows = [tuple(map(float, line.split())) for line in open(path) if line.strip()]
    rx, tx = {}, {}
    for (_, ra, xa), (tb, rb, xb) in zip(rows, rows[1:]):
        b = int(tb / width)
        rx[b] = rx.get(b, 0) + rb - ra
        tx[b] = tx.get(b, 0) + xb - xa
    return rx, tx


def server_ingress(path, rate):
    width = 0.002
    rx, _ = binned(path, width)
    busy = [b for b, v in rx.items() if v * 8 / width > 0.2 * rate]
    lo, hi = min(busy), max(busy)
    start = lo + int((hi - lo) * 0.3)
    util = [rx.get(b, 0) * 8 / width / rate for b in range(start, hi + 1)]
    span = len(util) * width
    stretches, run = [], 0
    for u in util + [1.0]:
        if u < 0.2:
            run += 1
        elif run:
            if run * width >= 0.02:
                stretches.append(round(run * width * 1000))
            run = 0
    return {"span_s": span, "util": sum(util) / len(util), "idle_share": sum(1 for u in util if u < 0.2) / len(util),
            "idle_stretches_ms": stretches}


def worker_shares(path_a, path_b, rate):
    width = 0.02
    _, a = binned(path_a, width)
    _, b = binned(path_b, width)
    keys = sorted(set(a) | set(b))
    keys = keys[int(len(keys) * 0.3):]
    busy = [k for k in keys if (a.get(k, 0) + b.get(k, 0)) * 8 / width > 0.5 * rate]
    shares = [a.get(k, 0) / (a.get(k, 0) + b.get(k, 0)) for k in busy]
    lead = worst = 0
    for k in keys:
        lead += a.get(k, 0) - b.get(k, 0)
        worst = max(worst, abs(lead))
    return {"median_share": statistics.median(shares),
            "uneven_bins": sum(1 for s in shares if s < 0.35 or s > 0.65) / len(shares),
            "max_lead_mb": worst / 1e6}


def rate_bps(rate):
    for unit, f in (("gbit", 1e9), ("mbit", 1e6)):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * f
    raise ValueError(rate)


def one_run(model, rate, proxy_flags, out):
    args = ["--model", model, "--scale", SCALE[model], "--iters", "12", "--warmup", "2", "--compute-ms", "300", "--api", "gluon"]
    files = {h: os.path.join(out, f"link-{h}.txt") for h in ("h2", "h3", "h4")}
    with Proxies(TOPO.hosts(), "link-use", ["--link-rate", rate] + proxy_flags) as proxies:
        samplers = [subprocess.Popen(cluster.netns(h) + [sys.executable, "-c", SAMPLER, f]) for h, f in files.items()]
        try:
            result = run_job(TOPO, JOB, "link-use", timeout=300, args=args)
        finally:
            for s in samplers:
                s.terminate()
                s.wait(timeout=30)
    times = next(json.loads(line[6:]) for name, text in result.logs.items() if name.startswith("worker")
                 for line in text.splitlines() if line.startswith("TIMES "))
    r = rate_bps(rate)
    return {"median_step_s": statistics.median(times), "answer_idle_share": proxies.answer_idle_share,
            "pair_lag_ms": proxies.pair_lag and proxies.pair_lag * 1000,
            "server_ingress": server_ingress(files["h2"], r), "workers": worker_shares(files["h3"], files["h4"], r)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SCALE), default="vgg19")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("proxy_flags", nargs="*", help="after --: flags for every proxy (e.g. --priority key)")
    a = ap.parse_args()
    cluster.testbed_up(4, a.rate)
    try:
        with tempfile.TemporaryDirectory() as out:
            for run in range(a.runs):
                r = one_run(a.model, a.rate, a.proxy_flags, out)
                s, w = r["server_ingress"], r["workers"]
                print(f"run {run + 1} ({' '.join(a.proxy_flags) or 'default'}): step {r['median_step_s']:.3f} s, "
                      f"pair lag {r['pair_lag_ms'] or 0:.0f} ms, answers idle {r['answer_idle_share'] or 0:.0%}; "
                      f"server ingress: util {s['util']:.0%}, idle {s['idle_share']:.0%} of {s['span_s']:.1f} s, "
                      f"idle stretches (ms) {s['idle_stretches_ms']}; workers' uplinks: h3's share median "
                      f"{w['median_share']:.2f}, uneven 20 ms bins {w['uneven_bins']:.0%}, one worker ahead by up to "
                      f"{w['max_lead_mb']:.1f} MB", flush=True)
                print("JSON " + json.dumps(r), flush=True)
    finally:
        cluster.testbed_down()


if __name__ == "__main__":
    main()
