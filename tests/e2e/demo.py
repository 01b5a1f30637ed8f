"""The demo behind scripts/demo: one job direct, then the same job through p3proxy."""
import argparse
import sys
import time

import cluster
from cluster import Proxies, Topology, metric, run_job

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--workload", default="gluon_train.py", help="a script of tests/e2e/workloads")
p.add_argument("--rate", default="1gbit", help="link rate of every host (tc htb)")
p.add_argument("--steps", default="20", help="training steps (gluon_train.py) or iterations (kv_raw.py)")
args = p.parse_args()

topo = Topology("h1", ["h2", "h3"], ["h4", "h5"])
env = {"STEPS": args.steps, "NIT": args.steps}
print(f"testbed: 5 hosts at {args.rate}: scheduler h1, servers h2 h3, workers h4 h5", flush=True)
cluster.testbed_up(5, args.rate)
try:
    print(f"job 1/2: {args.workload} direct ...", flush=True)
    t0 = time.time()
    direct = run_job(topo, args.workload, "demo-direct", env, timeout=600)
    t_direct = time.time() - t0
    print(f"         {t_direct:.1f} s", flush=True)
    print(f"job 2/2: {args.workload} through p3proxy on every host ...", flush=True)
    with Proxies(topo.hosts(), "demo") as proxies:
        t0 = time.time()
        proxied = run_job(topo, args.workload, "demo-proxied", env, timeout=600)
        t_proxied = time.time() - t0
        m = proxies.metrics()
    print(f"         {t_proxied:.1f} s", flush=True)
    same = proxied.results == direct.results
    out_bytes = sum(metric(t, "p3proxy_forwarded_bytes_total", direction="outbound") for t in m.values())
    tunnels = sum(metric(t, "p3proxy_connections_total", route="tunnel") for t in m.values())
    print()
    print(f"results bitwise identical: {'yes' if same else 'NO'}")
    print(f"time direct {t_direct:.1f} s, through p3proxy {t_proxied:.1f} s: ratio {t_direct / t_proxied:.2f}x "
          "(one run each, including process start-up; scheduling is not in yet, so about 1x is expected)")
    print(f"p3proxy carried {out_bytes / 1e6:.1f} MB over {int(tunnels)} tunnels; logs in {cluster.LOGS}")
    sys.exit(0 if same else 1)
finally:
    cluster.testbed_down()
