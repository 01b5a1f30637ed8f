"""Probe for the worker-side-update divergence (README, Status; fixed by the request-order
hold at the server, README "Request order at the server"): the Gluon job of
tests/e2e/test_mxnet.py with MXNET_UPDATE_ON_KVSTORE=0, direct once and then six times
through p3proxy with the given `p3proxy run` flags; prints how many proxied runs differ
from the direct one. As root:
  .venv/bin/python bench/noupd_probe.py                  # defaults (split, scheduling)
  .venv/bin/python bench/noupd_probe.py --no-split
  .venv/bin/python bench/noupd_probe.py --no-split --no-schedule
PROBE_HOSTS=h4,h5 puts proxies on those hosts only (default: every host)."""
import sys
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "e2e"))
import cluster
from cluster import Proxies, Topology, run_job
T = Topology("h1", ["h2", "h3"], ["h4", "h5"])
args = sys.argv[1:]
cluster.testbed_up(5)
try:
    env = {"MXNET_UPDATE_ON_KVSTORE": "0"}
    d = run_job(T, "gluon_train.py", "probe-direct", env)
    bad = 0
    for i in range(6):
        hosts = os.environ.get("PROBE_HOSTS", ",".join(T.hosts())).split(",")
        with Proxies(hosts, "probe", args):
            p = run_job(T, "gluon_train.py", "probe-proxied", env)
        ok = p.results == d.results
        bad += not ok
        print(i, "ok" if ok else "DIFF", flush=True)
    print("args", args, "diffs", bad)
finally:
    cluster.testbed_down()
