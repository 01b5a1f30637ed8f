"""Probe for MXNet's own request order at the server (issue 24; README, "Request order
at the server"): runs the Gluon job of tests/e2e/workloads/gluon_bigdense.py (a dense
layer of 1.16M parameters that MXNet spreads over both servers, Gluon's default
server-side SGD with momentum) on 1 scheduler, 2 servers and 2 workers, N times direct
and N times through p3proxy on every host, and prints for each side how many runs
aborted (and how many of those with the server's `init N first`) and how many finished
with weights different from the first finished direct run. As root:
  .venv/bin/python bench/init_order_probe.py [--runs N] [--rate 1gbit|unshaped]
                                            [--verbose] [--load K] [--sides direct,proxied]
                                            [-- p3proxy run flags...]
--verbose runs every node with PS_VERBOSE=2 (the server logs name each request); --load
keeps K busy-looping processes on the host's cores meanwhile (each ends after 15
minutes at the latest), the starved-CPU condition in which the server's queue fills.
Logs of every run: /tmp/p3proxy-e2e/order-{direct,proxied}<i>-*.log."""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import cluster  # noqa: E402
from cluster import Proxies, Topology, run_job  # noqa: E402

T = Topology("h1", ["h2", "h3"], ["h4", "h5"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds a run may take (a server that aborted leaves the job hanging)")
    ap.add_argument("--sides", default="direct,proxied")
    ap.add_argument("--workload", default="gluon_bigdense.py",
                    help="a job of tests/e2e/workloads (kv_init_then_pull.py: the init race on purpose)")
    ap.add_argument("proxy_args", nargs="*")
    a = ap.parse_args()
    env = {"PS_VERBOSE": "2"} if a.verbose else {}
    cluster.testbed_up(5, rate=a.rate)
    hogs = [subprocess.Popen(["timeout", "900", sys.executable, "-c", "while True: pass"])
            for _ in range(a.load)]
    reference = None
    tally = {}
    try:
        for side in a.sides.split(","):
            aborts = init_first = differ = 0
            for i in range(a.runs):
                tag = f"order-{side}{i}"
                start = time.time()
                try:
                    if side == "proxied":
                        with Proxies(T.hosts(), tag, a.proxy_args):
                            r = run_job(T, a.workload, tag, env, timeout=a.timeout)
                    else:
                        r = run_job(T, a.workload, tag, env, timeout=a.timeout)
                except RuntimeError as e:
                    aborts += 1
                    init_first += "first" in str(e) and "init" in str(e)
                    print(f"{side} {i}: ABORT ({time.time() - start:.1f} s) {str(e).splitlines()[1][:120]}", flush=True)
                    continue
                reference = reference or r.results
                same = r.results == reference and not any("pull_ok=False" in v for v in r.results.values())
                differ += not same
                print(f"{side} {i}: {'ok' if same else 'DIFFERENT WEIGHTS'} ({time.time() - start:.1f} s)", flush=True)
            tally[side] = (aborts, init_first, differ)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        cluster.testbed_down()
    print(f"\n{a.workload}: {a.runs} runs each, rate {a.rate}, load {a.load}, "
          f"proxy args {a.proxy_args or '(defaults)'}")
    for side, (aborts, init_first, differ) in tally.items():
        print(f"{side:8}: {aborts} aborted ({init_first} with 'init N first'), {differ} finished with different weights")


if __name__ == "__main__":
    main()
