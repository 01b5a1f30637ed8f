"""The long run of issue 17: the benchmark's emulated job (Gluon Trainer, server-side SGD,
ResNet-50's 161 keys at 1/10 size, one key split) for ITERS iterations on separate hosts,
direct and then through p3proxy: the final weights of both runs must be bitwise
identical (every byte of every push and pull went through unaltered and in order), and
the proxies' RSS and file descriptors are sampled through the run.
As root: .venv/bin/python bench/soak_job.py [ITERS]  (default 2000)"""
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import cluster  # noqa: E402
from cluster import Proxies, Topology, metric, run_job  # noqa: E402

ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
TOPO = Topology("h1", ["h2"], ["h3", "h4"])
ARGS = ["--model", "resnet50_v1", "--scale", "0.1", "--iters", str(ITERS), "--warmup", "1", "--compute-ms", "20"]
JOB = os.path.join(HERE, "emulated_job.py")


def sample(pid):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


cluster.testbed_up(4)
try:
    t0 = time.time()
    direct = run_job(TOPO, JOB, "soak-direct", timeout=7200, args=ARGS)
    print(f"direct: {time.time() - t0:.0f} s", flush=True)
    samples = []
    with Proxies(TOPO.hosts(), "soak-job") as proxies:
        done = threading.Event()

        def watch():
            while not done.is_set():
                samples.append({h: sample(p.pid) for h, p in proxies.procs.items()})
                done.wait(10)
        w = threading.Thread(target=watch)
        w.start()
        t0 = time.time()
        proxied = run_job(TOPO, JOB, "soak-proxied", timeout=7200, args=ARGS)
        secs = time.time() - t0
        done.set()
        w.join()
        m = proxies.metrics()
finally:
    cluster.testbed_down()
same = proxied.results == direct.results
gb = {h: metric(t, "p3proxy_forwarded_bytes_total") / 1e9 for h, t in m.items()}
report = {
    "iterations": ITERS, "seconds": round(secs), "bitwise_identical": same, "gb_through_each_proxy": gb,
    "keys_split": sum(metric(t, "p3proxy_keys_split_total") for t in m.values()),
    "requests_lost": sum(metric(t, "p3proxy_requests_lost_total") for t in m.values()),
    "rss_kb_and_fds_first": samples[1] if len(samples) > 1 else samples[0], "rss_kb_and_fds_last": samples[-1],
}
print(json.dumps(report, indent=1))
os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
with open(os.path.join(HERE, "results", "soak_job.json"), "w") as f:
    json.dump(report, f, indent=1)
sys.exit(0 if same else 1)
