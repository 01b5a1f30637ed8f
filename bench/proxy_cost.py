"""The proxy's own cost per byte (scripts/bench --proxy-cost).

A ps-lite DEALER streams push requests (160 KB, 4 MB, 40 MB values) to a ROUTER
(`p3proxy-loadgen send/recv`) through each system, side by side in one run:
  direct        no middlebox
  floor-rw      `p3proxy-loadgen relay`: a plain read/write byte relay per hop
  floor-splice  the same with splice(2) through a pipe
  p3proxy       this build
  baseline      another build (--baseline-bin), e.g. the last landed commit
  p3proxy-2threads  this build with --threads 2 (optional: --systems)
on two paths:
  same-host     one proxy between a local app and a local server (its relay path)
  tunnel        h1 -> h2 across an unshaped testbed link: the origin proxy schedules and
                slices, the receiving proxy reassembles (two proxies, two hops for a floor)
unlimited (throughput as a ratio to direct) and at fixed offered rates (achieved / offered).
Per stream: the middleboxes' CPU seconds and minor page faults per GB (per process), and
machine-wide CPU seconds per GB marginal over direct (the extra TCP hops charged to the
apps and the kernel count too). Every cell is the median of --runs streams, with the range.
Checksums are verified in separate untimed streams (one per path, system and size)."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import cluster  # noqa: E402

LOADGEN = os.path.join(os.path.dirname(cluster.PROXY), "p3proxy-loadgen")
GB = 1e9
TICK = os.sysconf("SC_CLK_TCK")
SIZES = (160_000, 4_000_000, 40_000_000)
# Offered rate (Gbit/s, None: unlimited) -> bytes per stream.
RATES = {None: 1e9, 5.0: 1e9, 1.0: 0.25e9}
PORT = 17001


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def proc_stat(pid):
    """(CPU seconds, minor faults) of a live process."""
    st = cluster.proc_stat(pid)
    if st is None:
        raise RuntimeError(f"process {pid} is gone")
    return st.user + st.system, st.minflt


def machine_cpu():
    """CPU seconds every core spent busy so far."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK


def wait_port(host, port):
    for _ in range(200):
        if cluster.sh(*cluster.netns(host), "ss", "-Hltn", f"sport = :{port}").stdout.strip():
            return
        time.sleep(0.025)
    raise RuntimeError(f"nothing listens on {host}:{port}")


class Middle:
    """What sits between sender and receiver for one path and system."""

    def __init__(self, path, system, binary):
        self.path, self.system, self.binary = path, system, binary
        self.procs, self.cfg = [], None
        recv_host = "h1" if path == "same-host" else "h2"
        recv_ip = "127.0.0.1" if path == "same-host" else cluster.ip("h2")
        self.recv = (recv_host, f"{recv_ip}:{PORT}")
        self.target = f"{recv_ip}:{PORT}"

    def start(self):
        if self.binary:
            self.start_proxies()

    def start_proxies(self):
        if self.path == "same-host":
            self.procs = [self.proxy("h1", ["--listen", "127.0.0.1:16001", "--upstream", self.target], "same")]
            wait_port("h1", 16001)
            self.target = "127.0.0.1:16001"
            return
        self.cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        self.cfg.write(f'cluster_cidr = ["{cluster.CIDR}"]\nscheduler_port = {PORT}\n[exempt]\nmark = 0x1000\n')
        self.cfg.close()
        self.procs = [self.proxy("h1", [], "h1"), self.proxy("h2", ["--config", self.cfg.name], "h2")]
        wait_port("h1", 15301)
        wait_port("h2", 15302)
        cluster.sh(*cluster.netns("h1"), cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", cluster.CIDR)

    def proxy(self, host, args, tag):
        logf = open(os.path.join(cluster.LOGS, f"cost-{self.system}-{tag}.log"), "w")
        journal = os.path.join(cluster.LOGS, f"cost-{self.system}-{tag}-journal.jsonl")
        if os.path.exists(journal):
            os.remove(journal)
        threads = ["--threads", "2"] if self.system.endswith("-2threads") else []
        return subprocess.Popen(cluster.netns(host) + [self.binary, "run", "--journal", journal, *threads, *args],
                                stdout=logf, stderr=subprocess.STDOUT)

    def floors(self):
        """Starts this stream's relays (each relays one connection); returns them."""
        splice = ["--splice"] if self.system == "floor-splice" else []
        if self.path == "same-host":
            hops = [("h1", "127.0.0.1:16001", self.target)]
        else:
            hops = [("h2", f"{cluster.ip('h2')}:16002", self.target), ("h1", "127.0.0.1:16001", f"{cluster.ip('h2')}:16002")]
        relays = []
        for host, listen, to in hops:
            p = subprocess.Popen(cluster.netns(host) + [LOADGEN, "relay", "--listen", listen, "--to", to, *splice],
                                 stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
            relays.append(p)
        return relays, "127.0.0.1:16001"

    def stop(self):
        if self.path == "tunnel" and self.procs:
            cluster.sh(*cluster.netns("h1"), cluster.REDIRECT, "remove", check=False)
        for p in self.procs:
            p.terminate()
            p.wait()
        if self.cfg:
            os.unlink(self.cfg.name)

    def stream(self, size, count, rate, checksum=False):
        """One stream; returns its measurements."""
        quiet = [] if checksum else ["--no-checksum"]
        recv_host, listen = self.recv
        recv = subprocess.Popen(cluster.netns(recv_host) + [LOADGEN, "recv", "--listen", listen, *quiet],
                                stdout=subprocess.PIPE, text=True)
        recv.stdout.readline()
        relays, target = self.floors() if self.system.startswith("floor") else ([], self.target)
        before = [proc_stat(p.pid) for p in self.procs]
        machine0 = machine_cpu()
        paced = ["--rate", str(rate)] if rate else []
        send = subprocess.Popen(cluster.netns("h1") + [LOADGEN, "send", "--to", target, "--size", str(size),
                                                       "--count", str(count), *paced, *quiet], stdout=subprocess.PIPE, text=True)
        out = json.loads(send.stdout.readline())
        send.wait()
        got = json.loads(recv.stdout.readline())
        recv.wait()
        machine = machine_cpu() - machine0
        per_proc = []
        for p, (cpu0, flt0) in zip(self.procs, before):
            cpu, flt = proc_stat(p.pid)
            per_proc.append((cpu - cpu0, flt - flt0))
        for r in relays:
            _, _, ru = os.wait4(r.pid, 0)
            per_proc.append((ru.ru_utime + ru.ru_stime, ru.ru_minflt))
        if got["bytes"] != out["bytes"] or got["messages"] != count:
            raise RuntimeError(f"{self.path} {self.system}: lost data: sent {out}, received {got}")
        if checksum and got["checksum"] != out["checksum"]:
            raise RuntimeError(f"{self.path} {self.system}: checksum {got['checksum']} != sent {out['checksum']}")
        gb = out["bytes"] / GB
        return {"gbps": out["bytes"] * 8 / out["secs"] / 1e9, "machine_cpu_per_gb": machine / gb,
                "cpu_per_gb": [c / gb for c, _ in per_proc], "minflt_per_gb": [f / gb for _, f in per_proc]}


def spread(values, fmt="{:.2f}"):
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def size_label(size):
    return f"{size / 1e3:.0f} KB" if size < 1e6 else f"{size / 1e6:.0f} MB"


def main(total_bytes=1e9, runs=3, baseline_bin=None, systems=None, sizes=SIZES, rates=None, out_dir=None):
    os.makedirs(cluster.LOGS, exist_ok=True)
    systems = systems or ["direct", "floor-rw", "floor-splice", "p3proxy"] + (["baseline"] if baseline_bin else [])
    rates = list(RATES) if rates is None else rates
    binaries = {"p3proxy": cluster.PROXY, "p3proxy-2threads": cluster.PROXY, "baseline": baseline_bin}
    scale = total_bytes / 1e9
    samples, passed = [], {}
    cluster.testbed_up(2, "unshaped")
    try:
        for path in ("same-host", "tunnel"):
            for system in systems:
                middle = Middle(path, system, binaries.get(system))
                middle.start()
                try:
                    for size in sizes:
                        middle.stream(size, 4, None, checksum=True)
                        for rate in rates:
                            # Floors only unlimited: what the plain relay can do at most.
                            if rate and system.startswith("floor"):
                                continue
                            count = max(4, int(RATES[rate] * scale // size))
                            log(f"{path} {system}: {runs} x {count} pushes of {size_label(size)}"
                                f" {'unlimited' if rate is None else f'at {rate:g} Gbit/s'}")
                            for run in range(runs):
                                m = middle.stream(size, count, rate)
                                samples.append({"path": path, "system": system, "size": size, "rate": rate, "run": run, **m})
                    if system in binaries:
                        text = cluster.scrape("h1")
                        if path == "tunnel" and cluster.metric(text, "p3proxy_connections_total", route="tunnel") < 1:
                            raise RuntimeError("the stream did not go through the tunnel")
                        spliced = cluster.metric(text, "p3proxy_passed_bytes_total", how="splice")
                        log(f"{path} {system}: {spliced / 1e9:.2f} GB of frame bodies spliced on h1")
                        passed[(path, system)] = spliced
                finally:
                    middle.stop()
    finally:
        cluster.testbed_down()
    text = report(samples, systems, sizes, rates, runs)
    text += "\n\nFrame bodies spliced (GB, on h1): " + ", ".join(f"{p} {s}: {b / 1e9:.2f}" for (p, s), b in passed.items())
    out = out_dir or os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "proxy_cost.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "proxy_cost.json"), "w") as f:
        json.dump(samples, f, indent=1)
    print(text)


def report(samples, systems, sizes, rates, runs):
    def cell(path, system, size, rate):
        return [s for s in samples if (s["path"], s["system"], s["size"], s["rate"]) == (path, system, size, rate)]

    lines = [f"Median of {runs} streams per cell, (min-max). CPU and faults per GB of payload; "
             "machine: all cores' busy CPU-s/GB minus direct's.", "",
             "| path | size | offered | system | Gbit/s | vs direct / of offered | middlebox CPU-s/GB (per process) "
             "| minflt/GB | machine CPU-s/GB over direct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in ("same-host", "tunnel"):
        for size in sizes:
            for rate in rates:
                direct = cell(path, "direct", size, rate)
                d_gbps = statistics.median([s["gbps"] for s in direct]) if direct else None
                d_machine = statistics.median([s["machine_cpu_per_gb"] for s in direct]) if direct else 0.0
                for system in systems:
                    c = cell(path, system, size, rate)
                    if not c:
                        continue
                    gbps = [s["gbps"] for s in c]
                    if rate:
                        rel = spread([g / rate for g in gbps])
                    elif d_gbps and system != "direct":
                        rel = spread([g / d_gbps for g in gbps])
                    else:
                        rel = "1"
                    procs = len(c[0]["cpu_per_gb"])
                    total = spread([sum(s["cpu_per_gb"]) for s in c], "{:.3f}")
                    per = " + ".join(spread([s["cpu_per_gb"][i] for s in c], "{:.3f}") for i in range(procs)) if procs > 1 else ""
                    cpu = "-" if not procs else (f"{total} = {per}" if per else total)
                    flt = "-" if not procs else spread([sum(s["minflt_per_gb"]) for s in c], "{:.0f}")
                    machine = "-" if system == "direct" else spread([s["machine_cpu_per_gb"] - d_machine for s in c], "{:.3f}")
                    offered = "unlimited" if rate is None else f"{rate:g} Gbit/s"
                    lines.append(f"| {path} | {size_label(size)} | {offered} | {system} | {spread(gbps)} | {rel} | {cpu} | {flt} | {machine} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1e9)
