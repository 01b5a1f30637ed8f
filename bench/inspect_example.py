"""The README's `p3proxy inspect` example: the benchmark's VGG-19 job (Gluon Trainer,
emulated compute) on separate hosts at 1 Gbit/s, direct and then through p3proxy, with
`inspect --iface eth0` watching the server host. Writes the tables, the JSON and the
Chrome traces to bench/results/inspect/. As root: .venv/bin/python bench/inspect_example.py"""
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import cluster  # noqa: E402
from cluster import Proxies, Topology, run_job  # noqa: E402

TOPO = Topology("h1", ["h2"], ["h3", "h4"])
JOB = os.path.join(HERE, "emulated_job.py")
ARGS = ["--model", "vgg19", "--scale", "0.1", "--iters", "8", "--warmup", "1", "--compute-ms", "300"]
OUT = os.path.join(HERE, "results", "inspect")


def run(tag, proxied):
    base = os.path.join(OUT, tag)
    inspect = subprocess.Popen(cluster.netns("h2") + [cluster.PROXY, "inspect", "--iface", "eth0", "--seconds", "300",
                                                     "--trace", base + ".trace.json"],
                               stdout=open(base + ".txt", "w"), stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        if proxied:
            with Proxies(TOPO.hosts(), "inspect-example"):
                run_job(TOPO, JOB, f"inspect-{tag}", timeout=300, args=ARGS)
        else:
            run_job(TOPO, JOB, f"inspect-{tag}", timeout=300, args=ARGS)
    finally:
        inspect.send_signal(signal.SIGTERM)
        inspect.wait(timeout=60)
    print(f"{tag}: {base}.txt, {base}.trace.json", flush=True)


os.makedirs(OUT, exist_ok=True)
cluster.testbed_up(4)
try:
    run("direct", False)
    run("p3proxy", True)
finally:
    cluster.testbed_down()
