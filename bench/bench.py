"""The training benchmark (scripts/bench): real MXNet 1.9.1 dist_sync jobs on the shaped
namespace testbed, each system run side by side in one invocation:

  direct    the job with no proxy (what every user has today)
  mxnet-p3  MXNet's own P3 (dist_p3_sync, DMLC_PS_VAN_TYPE=p3, MXNET_UPDATE_ON_KVSTORE=0:
            P3 cannot run the optimizer on the servers, so the workers do)
  p3proxy   the job unchanged, p3proxy and its redirect on every host
  p3proxy-relay  the same with scheduling off (--no-schedule: a plain relay), on request
  p3proxy-key, p3proxy-map  priorities from MXNet key order / a map of the model, on request
  p3proxy-layer  the learned order as strict layer order (--learned-defer 0), on request
  p3proxy-baseline  p3proxy's defaults run by another build (--baseline-bin), e.g. the
            last landed commit, so that a change is measured against it in the same run

Reports the median iteration time (min and max across runs), throughput, the ratio to
direct, and each time as a multiple of the ideal bound. Checks that direct and p3proxy
computed bitwise the same weights, and mxnet-p3 the same as a direct run with
worker-side updates; fails loudly otherwise.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
sys.path.insert(0, HERE)
import cluster  # noqa: E402
import models  # noqa: E402
from cluster import Proxies, Topology, run_job  # noqa: E402

JOB = os.path.join(HERE, "emulated_job.py")
REAL_JOB = os.path.join(HERE, "real_job.py")
BATCH = 32
DEFAULT_SCALE = {"vgg19": 0.1, "resnet50_v1": 0.5, "tiny": 1.0}
SYSTEM_ENV = {
    "direct": {},
    "mxnet-p3": {"DMLC_PS_VAN_TYPE": "p3", "P3_KVSTORE": "dist_p3_sync", "MXNET_UPDATE_ON_KVSTORE": "0"},
    "p3proxy": {},
    "p3proxy-relay": {},
    "p3proxy-key": {},
    "p3proxy-layer": {},
    "p3proxy-paced": {},
    "p3proxy-map": {},
    "p3proxy-nosplit": {},
    "p3proxy-baseline": {},
}
# Proxy flags per system: p3proxy (the default: learned priorities); p3proxy-relay is the
# proxy with scheduling off (plain relay), to show what the relay costs and what
# scheduling adds; p3proxy-key and p3proxy-map use MXNet key order and a map from the
# model (scripts/priority-map, written into the output folder); p3proxy-layer learns the
# strict layer order (the default defers the last layers: --learned-defer); p3proxy-paced
# paces each peer host's tunnels at the testbed's rate / workers (--pace).
PROXY_ARGS = {"p3proxy": [], "p3proxy-relay": ["--no-schedule"], "p3proxy-key": ["--priority", "key"], "p3proxy-map": None,
              "p3proxy-layer": ["--learned-defer", "0"], "p3proxy-paced": ["--pace"],
              "p3proxy-nosplit": ["--no-split"], "p3proxy-baseline": []}
EXTRA_PROXY_ARGS = []  # --proxy-args: added to every p3proxy system's
BINARY = {}  # system -> p3proxy binary other than the tree's (--baseline-bin)


def proxy_args(system, job_args, out):
    if PROXY_ARGS[system] is not None:
        return PROXY_ARGS[system] + EXTRA_PROXY_ARGS
    model = job_args[job_args.index("--model") + 1]
    path = os.path.abspath(os.path.join(out, f"priority-map-{model}.toml"))
    if not os.path.exists(path):
        subprocess.run([os.path.join(cluster.ROOT, "scripts", "priority-map"), "--model", model, "--out", path],
                       check=True, capture_output=True)
    return ["--priority", "map", "--priority-map", path] + EXTRA_PROXY_ARGS


def rate_bps(rate):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    raise ValueError(f"rate {rate!r}: use NNNmbit or Ngbit")


def topologies(name, servers, workers, hosts):
    if name == "a":
        n = 1 + servers + workers
        return Topology("h1", [f"h{2 + i}" for i in range(servers)], [f"h{2 + servers + i}" for i in range(workers)]), n
    if name == "b":
        hs = [f"h{1 + i}" for i in range(hosts)]
        return Topology("h1", hs, hs), hosts
    raise ValueError(name)


def ideal_seconds(topo_name, topo, pushed_bytes, rate, compute_s):
    """max(compute, bytes the busiest link direction carries per iteration / rate)."""
    bps = rate_bps(rate) / 8
    if topo_name == "a":
        per_server = len(topo.workers) * pushed_bytes / len(topo.servers)
        busiest = max(per_server, pushed_bytes)
    else:
        h = len(topo.servers)
        # Pushes to remote servers and responses to remote workers; the local share stays home.
        busiest = 2 * pushed_bytes * (h - 1) / h
    return max(compute_s, busiest / bps), busiest


# The testbed's veths keep the default MTU (cluster.py sets none). A full segment carries
# MTU - 20 (IP) - 32 (TCP with timestamps) bytes of payload and the shaper counts the
# Ethernet header too: TCP/IP framing alone caps goodput at 1448/1514 of the link rate.
TESTBED_MTU = 1500
WIRE_PAYLOAD = TESTBED_MTU - 52
WIRE_FRAME = TESTBED_MTU + 14


def wire_seconds(busiest_bytes, rate, compute_s):
    """The ideal bound with TCP/IP framing: the busiest direction's payload in full
    segments at the shaper's rate."""
    return max(compute_s, busiest_bytes * WIRE_FRAME / WIRE_PAYLOAD / (rate_bps(rate) / 8))


EXIT_GRACE = 20


def parse(result):
    out = {"sha": {}, "times": {}, "timeline": None, "hung": list(result.hung),
           "server_cpu_s": sum(result.cpu.values()) if result.cpu else None}
    for name, text in result.logs.items():
        if not name.startswith("worker"):
            continue
        for line in text.splitlines():
            if line.startswith("TIMES "):
                out["times"][name] = json.loads(line[6:])
            elif line.startswith("TIMELINE "):
                out["timeline"] = json.loads(line[9:])
    out["sha"] = dict(result.results)
    return out


def progress(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_system(system, topo, job_args, tag, timeout, job=JOB, out="/tmp", rate=None):
    env = dict(SYSTEM_ENV[system])
    if system in PROXY_ARGS:
        # The testbed's link rate: the proxies measure how long answers idle on it.
        rate_args = ["--link-rate", rate] if rate and system not in BINARY else []
        with Proxies(topo.hosts(), tag, proxy_args(system, job_args, out) + rate_args, binary=BINARY.get(system)) as proxies:
            r = parse(run_job(topo, job, tag, env, timeout, job_args, EXIT_GRACE))
        r["proxy_cpu_s"] = sum(v for v in proxies.cpu.values() if v)
        r["slice_requests"] = proxies.slices
        r["pair_lag_s"] = proxies.pair_lag
        r["answer_idle_share"] = proxies.answer_idle_share
        r["orders_same"] = orders_same(proxies.states, topo.workers)
        lag = "-" if proxies.pair_lag is None else f"{proxies.pair_lag * 1000:.1f} ms"
        idle = "-" if proxies.answer_idle_share is None else f"{proxies.answer_idle_share:.0%}"
        same = {None: "", True: ", the workers' proxies defer the same keys in the same order",
                False: ", the workers' proxies defer DIFFERENT keys or orders"}[r["orders_same"]]
        progress(f"{tag}: proxies used {r['proxy_cpu_s']:.1f} CPU s, sent {r['slice_requests']} slice requests, "
                 f"mean push pair lag {lag}, answers idle {idle} of the servers' waiting time{same}")
        return r
    return parse(run_job(topo, job, tag, env, timeout, job_args, EXIT_GRACE))


def deferred_tail(state):
    """A proxy's learned order as it sends it: the keys after the last one backward
    produced (the first layer's), most urgent first. Before it, production order, however
    the proxy grouped it (a group's keys go as they are produced)."""
    order = state.get("priority", {}).get("learned_order") or []
    if not order:
        return None
    first_layer = max(order, key=lambda e: e.get("offset_ms") or 0.0)["priority"]
    return [(e["key"], e["server"]) for e in sorted(order, key=lambda e: (e["priority"], e["key"], e["server"]))
            if e["priority"] > first_layer]


def orders_same(states, workers):
    """Whether every worker host's proxy defers the same keys in the same order; None
    where fewer than two have a learned order in use."""
    tails = [t for t in (deferred_tail(states[h]) for h in workers if h in states) if t is not None]
    return None if len(tails) < 2 else all(t == tails[0] for t in tails)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    # SIGTERM cleans up like Ctrl-C: namespaces, qdiscs, redirects, proxies.
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg19,resnet50_v1")
    ap.add_argument("--scale", type=float, help="tensor scale for every model (default: vgg19 0.1, resnet50_v1 0.5)")
    ap.add_argument("--rates", default="1gbit")
    ap.add_argument("--host-qdisc", default="fifo",
                    help="fifo: host NICs plain FIFO (as most hosts); prio: scripts/qdisc on every host; fifo,prio: both")
    ap.add_argument("--topologies", default="a,b", help="a: separate hosts; b: each host a server and a worker")
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hosts", type=int, default=2, help="hosts of topology b")
    ap.add_argument("--systems", default="direct,mxnet-p3,p3proxy")
    ap.add_argument("--proxy-args", default="", help="extra `p3proxy run` flags for every p3proxy system, e.g. '--split-slice-bytes 640000'")
    ap.add_argument("--baseline-bin", help="the p3proxy binary of system p3proxy-baseline (e.g. a build of the last landed commit)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compute-ms", type=float, default=300.0, help="emulated compute per iteration")
    ap.add_argument("--api", choices=["gluon", "raw"], default="gluon")
    ap.add_argument("--timeline", action="store_true", help="also record one iteration's per-layer timeline")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, one rate, few iterations: checks the plumbing")
    ap.add_argument("--proxy-cost", action="store_true", help="measure the relay's own cost instead (bench/proxy_cost.py)")
    ap.add_argument("--real", action="store_true",
                    help="a tiny real Gluon model with real forward/backward and gluon.Trainer (bench/real_job.py) "
                         "instead of the emulated loop; compute is real, so the ideal bound counts the network only")
    a = ap.parse_args()
    EXTRA_PROXY_ARGS.extend(a.proxy_args.split())
    if a.proxy_cost:
        import proxy_cost

        if a.smoke:
            proxy_cost.main(2e8, runs=1, baseline_bin=a.baseline_bin, sizes=(160_000, 4_000_000), rates=[None], out_dir=a.out)
        else:
            systems = a.systems.split(",") if a.systems != ap.get_default("systems") else None
            proxy_cost.main(1e9, runs=a.runs, baseline_bin=a.baseline_bin, systems=systems, out_dir=a.out)
        return
    job = REAL_JOB if a.real else JOB
    if a.real:
        a.models, a.compute_ms = "tiny", 0.0
    if a.smoke:
        a.models, a.rates, a.topologies, a.runs, a.iters, a.warmup, a.compute_ms = "tiny", "1gbit", "a", 1, 3, 1, 50.0
    systems = a.systems.split(",")
    if "p3proxy-baseline" in systems:
        if not a.baseline_bin or not os.access(a.baseline_bin, os.X_OK):
            ap.error("system p3proxy-baseline needs --baseline-bin PATH to an executable p3proxy")
        BINARY["p3proxy-baseline"] = os.path.abspath(a.baseline_bin)
    for s in systems:
        if s not in SYSTEM_ENV:
            ap.error(f"unknown system {s!r}: {', '.join(SYSTEM_ENV)}")
    os.makedirs(a.out, exist_ok=True)
    rows, failures, timelines = [], [], {}
    timeout = 900
    try:
        for rate, host_qdisc in [(r, q) for r in a.rates.split(",") for q in a.host_qdisc.split(",")]:
            plans = [(t, *topologies(t, a.servers, a.workers, a.hosts)) for t in a.topologies.split(",")]
            cluster.testbed_up(max(n for _, _, n in plans), rate, qdisc=host_qdisc == "prio")
            progress(f"testbed up at {rate}, host NICs {host_qdisc}")
            for model in a.models.split(","):
                scale = a.scale or DEFAULT_SCALE.get(model, 1.0)
                _, params = models.layers(model, scale)
                pushed = sum(p.numel for p in params if p.pushed) * 4
                job_args = ["--model", model, "--scale", str(scale), "--iters", str(a.iters), "--warmup", str(a.warmup),
                            "--compute-ms", str(a.compute_ms), "--api", a.api]
                for tname, topo, _ in plans:
                    label = f"{model} x{scale} topology {tname} {rate} {host_qdisc}"
                    per_system = {s: [] for s in systems}
                    # Per run, per iteration (warm-up included: the processes ran those too).
                    costs = {s: {"proxy_cpu": [], "server_cpu": [], "slices": []} for s in systems}
                    pair_lags = {s: [] for s in systems}
                    answer_idle = {s: [] for s in systems}
                    orders = {s: [] for s in systems}
                    shas = {s: [] for s in systems}
                    hung = {s: 0 for s in systems}
                    for run in range(a.runs):
                        for s in systems:
                            progress(f"{label}: {s} run {run + 1}/{a.runs}")
                            # A tag per run: every run's proxy logs and /debug/state stay beside each other.
                            r = run_system(s, topo, job_args, f"bench-{model}-{tname}-{rate}-{host_qdisc}-{s}-run{run + 1}", timeout, job, a.out, rate)
                            it_times = r["times"].get("worker0") or next(iter(r["times"].values()))
                            per_system[s].append(statistics.median(it_times))
                            progress(f"{label}: {s} run {run + 1}: median {per_system[s][-1]:.3f} s, iterations "
                                     + " ".join(f"{t:.2f}" for t in it_times))
                            shas[s].append(r["sha"])
                            n_iter = a.iters + a.warmup
                            for name, v in (("proxy_cpu", r.get("proxy_cpu_s")), ("server_cpu", r.get("server_cpu_s")),
                                            ("slices", r.get("slice_requests"))):
                                if v is not None:
                                    costs[s][name].append(v / n_iter)
                            if r.get("pair_lag_s") is not None:
                                pair_lags[s].append(r["pair_lag_s"])
                            if r.get("answer_idle_share") is not None:
                                answer_idle[s].append(r["answer_idle_share"])
                            if r.get("orders_same") is not None:
                                orders[s].append(r["orders_same"])
                            if r["hung"]:
                                hung[s] += 1
                                progress(f"{label}: {s}: {', '.join(r['hung'])} hung at exit after the results; killed")
                    # Bitwise checks.
                    for proxied in (s for s in systems if s in PROXY_ARGS and "direct" in systems):
                        for d, p in zip(shas["direct"], shas[proxied]):
                            if d != p:
                                failures.append(f"{label}: {proxied} weights differ from direct: {p} vs {d}")
                    if "mxnet-p3" in systems and a.api == "gluon":
                        progress(f"{label}: direct with worker-side updates (reference for mxnet-p3)")
                        ref = parse(run_job(topo, job, "bench-direct-worker", {"MXNET_UPDATE_ON_KVSTORE": "0"}, timeout, job_args, EXIT_GRACE))
                        for p in shas["mxnet-p3"]:
                            if p != ref["sha"]:
                                failures.append(f"{label}: mxnet-p3 weights differ from direct with worker-side updates")
                    if a.timeline and not a.real:
                        for s in [x for x in systems if x in ("direct", "p3proxy", "p3proxy-key", "p3proxy-map")]:
                            progress(f"{label}: {s} timeline")
                            timelines[f"{label} {s}"] = run_system(s, topo, job_args + ["--timeline"], f"bench-{s}-tl", timeout, out=a.out)["timeline"]
                    ideal, busiest = ideal_seconds(tname, topo, pushed, rate, a.compute_ms / 1000)
                    wire = wire_seconds(busiest, rate, a.compute_ms / 1000)
                    base = statistics.median(per_system["direct"]) if "direct" in systems else None
                    for s in systems:
                        med = statistics.median(per_system[s])
                        rows.append({
                            "model": model, "scale": scale, "topology": tname, "rate": rate, "host_qdisc": host_qdisc, "system": s,
                            "runs": a.runs, "iters": a.iters, "median_s": med, "min_s": min(per_system[s]),
                            "max_s": max(per_system[s]), "samples_per_s": BATCH * len(topo.workers) / med,
                            "speedup_vs_direct": (base / med) if base else None, "ideal_s": ideal,
                            "x_ideal": med / ideal, "wire_s": wire, "x_wire": med / wire, "pushed_mb": pushed / 1e6, "busiest_link_mb": busiest / 1e6,
                            "runs_hung_at_exit": hung[s],
                            # Runs' medians: the spread says whether the runs are bimodal.
                            "run_medians_s": per_system[s], "max_over_median": max(per_system[s]) / med,
                            "pair_lag_ms": statistics.median(pair_lags[s]) * 1000 if pair_lags[s] else None,
                            "answer_idle_share": statistics.median(answer_idle[s]) if answer_idle[s] else None,
                            # Runs whose workers' proxies deferred the same keys in the same order.
                            "orders_same_runs": [sum(orders[s]), len(orders[s])] if orders[s] else None,
                            **{f"{k}_per_iter": (statistics.median(v) if v else None) for k, v in costs[s].items()},
                        })
                    progress(f"{label}: " + ", ".join(f"{r['system']} {r['median_s']:.3f}s" for r in rows[-len(systems):]))
            cluster.testbed_down()
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
        raise
    finally:
        cluster.testbed_down()
    report(rows, timelines, a, failures)
    if failures:
        print("\nBENCHMARK FAILED: results differ\n" + "\n".join(failures), file=sys.stderr)
        sys.exit(1)


def report(rows, timelines, a, failures):
    meta = {"compute_ms": a.compute_ms, "api": "real gluon.Trainer" if a.real else a.api, "iters": a.iters, "warmup": a.warmup, "runs": a.runs,
            "workers": a.workers, "servers": a.servers, "hosts_b": a.hosts, "batch": BATCH,
            "command": "scripts/bench " + " ".join(sys.argv[1:]), "bitwise_checks": "failed" if failures else "passed"}
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "timelines": timelines}, f, indent=1)
    lines = [
        f"`{meta['command']}`: {a.runs} runs x {a.iters} iterations after {a.warmup} warm-up, emulated compute "
        f"{a.compute_ms:.0f} ms/iteration, API {meta['api']}, {a.workers} workers; tensors scaled as shown. "
        f"Bitwise checks: {meta['bitwise_checks']}.",
        "",
        "| model | topology | rate | host NICs | system | iteration s (median [min, max]) | samples/s | vs direct | x ideal "
        "| x wire | max / median | pair lag ms | answers idle | proxies CPU-s/iter | servers CPU-s/iter | slice requests/iter |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def per_iter(v, fmt):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        vs = f"{r['speedup_vs_direct']:.2f}x" if r["speedup_vs_direct"] else "-"
        lines.append(f"| {r['model']} x{r['scale']} | {r['topology']} | {r['rate']} | {r.get('host_qdisc', 'fifo')} | {r['system']} | "
                     f"{r['median_s']:.3f} [{r['min_s']:.3f}, {r['max_s']:.3f}] | {r['samples_per_s']:.1f} | {vs} | "
                     f"{r['x_ideal']:.2f} | {per_iter(r.get('x_wire'), '{:.2f}')} | {per_iter(r.get('max_over_median'), '{:.2f}')} | "
                     f"{per_iter(r.get('pair_lag_ms'), '{:.1f}')} | {per_iter(r.get('answer_idle_share'), '{:.0%}')} | "
                     f"{per_iter(r.get('proxy_cpu_per_iter'), '{:.3f}')} | "
                     f"{per_iter(r.get('server_cpu_per_iter'), '{:.3f}')} | {per_iter(r.get('slices_per_iter'), '{:.0f}')} |")
    ideals = sorted({(r["model"], r["scale"], r["topology"], r["rate"], r["ideal_s"], r["busiest_link_mb"], r["wire_s"]) for r in rows})
    lines.append("")
    lines += baseline_lines(rows)
    for r in rows:
        if r["runs_hung_at_exit"]:
            lines.append(f"{r['system']} ({r['model']}, topology {r['topology']}): {r['runs_hung_at_exit']} run(s) hung at exit "
                         "after printing their results (killed after 20 s; the timings are unaffected).")
    for r in rows:
        if r.get("orders_same_runs"):
            same, of = r["orders_same_runs"]
            lines.append(f"{r['system']} ({r['model']}, topology {r['topology']}, {r['rate']}): the workers' proxies "
                         f"deferred the same keys in the same order in {same} of {of} runs.")
    for m, s, t, rate, ideal, mb, wire in ideals:
        lines.append(f"Ideal bound {m} x{s} topology {t} at {rate}: {ideal:.3f} s "
                     f"(max of compute and {mb:.1f} MB on the busiest link direction per iteration); "
                     f"wire bound {wire:.3f} s (the same bytes in {WIRE_PAYLOAD}-byte segments of {WIRE_FRAME} "
                     f"bytes at MTU {TESTBED_MTU}).")
    text = "\n".join(lines)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    chart(rows, timelines, a.out)


def baseline_lines(rows):
    """p3proxy against p3proxy-baseline (another build, run alternately in the same
    invocation): the ratio of medians and the range of per-run medians of each."""
    key = lambda r: (r["model"], r["scale"], r["topology"], r["rate"], r.get("host_qdisc", "fifo"))  # noqa: E731
    by = {(key(r), r["system"]): r for r in rows}
    out = []
    for k in sorted({key(r) for r in rows}):
        new, old = by.get((k, "p3proxy")), by.get((k, "p3proxy-baseline"))
        if not (new and old):
            continue
        if not out:
            out += ["| model | topology | rate | host NICs | baseline s [min, max] | this tree s [min, max] | baseline / this |",
                    "|---|---|---|---|---|---|---|"]
        out.append(f"| {k[0]} x{k[1]} | {k[2]} | {k[3]} | {k[4]} | {old['median_s']:.3f} [{old['min_s']:.3f}, {old['max_s']:.3f}] | "
                   f"{new['median_s']:.3f} [{new['min_s']:.3f}, {new['max_s']:.3f}] | {old['median_s'] / new['median_s']:.3f}x |")
    return out + [""] if out else []


def chart(rows, timelines, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    key = lambda r: (r["model"], r["scale"], r["topology"], r["rate"], r.get("host_qdisc", "fifo"))  # noqa: E731
    groups = sorted({key(r) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rs = [r for r in rows if key(r) == g]
        names = [r["system"] for r in rs]
        med = [r["median_s"] for r in rs]
        err = [[r["median_s"] - r["min_s"] for r in rs], [r["max_s"] - r["median_s"] for r in rs]]
        ax.bar(names, med, yerr=err, capsize=4, color=["#888", "#c83", "#38c", "#3a3", "#a3a"][: len(rs)])
        ax.axhline(rs[0]["ideal_s"], color="k", linestyle="--", label="ideal")
        ax.set_title(f"{g[0]} x{g[1]}, topo {g[2]}, {g[3]}, {g[4]}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("iteration time (s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "bench.png")
    fig.savefig(path, dpi=90)
    print(f"chart: {path}")
    if timelines:
        fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.8 * len(timelines)), squeeze=False)
        for ax, (name, tl) in zip(axes[:, 0], sorted(timelines.items())):
            if not tl:
                continue
            order = tl["keys_forward_order"]
            for y, k in enumerate(order):
                s, e = tl["spans"][str(k)]
                ax.plot([s, e], [y, y], lw=3, color="#38c")
            ax.set_title(name + ": pushpull issue -> completion per key (top: first layer)", fontsize=9)
            ax.invert_yaxis()
            ax.set_xlabel("seconds since iteration start")
        fig.tight_layout()
        path = os.path.join(out, "timeline.png")
        fig.savefig(path, dpi=90)
        print(f"timeline: {path}")


if __name__ == "__main__":
    main()
