"""The demo behind scripts/demo: a real MXNet 1.9.1 training job (Gluon Trainer with its
default server-side SGD, VGG-19's layer shapes at a tenth of their size, emulated compute)
on a testbed of hosts at 1 Gbit/s, first direct and then through p3proxy on every host,
with the benchmark's own harness (bench/bench.py). Prints the speedup, checks that the
trained weights are bitwise identical, and says where the chart was written."""
import argparse
import json
import os
import subprocess
import sys

import cluster

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--runs", type=int, default=2, help="runs of each system (the report shows their spread)")
p.add_argument("--iters", type=int, default=10, help="timed iterations per run")
p.add_argument("--rate", default="1gbit", help="link rate of every host (tc htb)")
p.add_argument("--out", default="/tmp/p3proxy-demo", help="where the report and the chart go")
args = p.parse_args()

bench = [cluster.PYTHON, os.path.join(cluster.ROOT, "bench", "bench.py"), "--models", "vgg19", "--topologies", "a",
         "--systems", "direct,p3proxy", "--runs", str(args.runs), "--iters", str(args.iters), "--rates", args.rate,
         "--out", args.out]
print("testbed: scheduler, one server and two workers on separate hosts; "
      f"{args.runs} run(s) of each system, {args.iters} iterations each (a few minutes)", flush=True)
code = subprocess.run(bench).returncode
try:
    report = json.load(open(os.path.join(args.out, "bench.json")))
except (OSError, ValueError):
    print(f"demo: the benchmark wrote no report (exit {code}); logs in {cluster.LOGS}", file=sys.stderr)
    sys.exit(1)
rows = {r["system"]: r for r in report["rows"]}
direct, proxied = rows["direct"], rows["p3proxy"]
same = report["meta"]["bitwise_checks"] == "passed"
print()
print("=" * 72)
print(f"iteration time direct:        {direct['median_s']:.3f} s (runs {direct['min_s']:.3f}-{direct['max_s']:.3f})")
print(f"iteration time with p3proxy:  {proxied['median_s']:.3f} s (runs {proxied['min_s']:.3f}-{proxied['max_s']:.3f})")
print(f"speedup: {direct['median_s'] / proxied['median_s']:.2f}x "
      f"(ideal bound {proxied['ideal_s']:.3f} s: compute or the busiest link, whichever is longer)")
print(f"trained weights bitwise identical to the direct job: {'yes' if same else 'NO'}")
print(f"chart: {os.path.join(args.out, 'bench.png')}; report: {os.path.join(args.out, 'bench.md')}")
print(f"logs of every process: {cluster.LOGS}")
print("=" * 72)
sys.exit(0 if same and code == 0 else 1)
