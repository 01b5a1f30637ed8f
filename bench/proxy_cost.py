"""The relay's own cost (scripts/bench --proxy-cost): a stream of ps-lite pushes
(160 KB and 40 MB values) through two proxies and direct, on an unshaped testbed link
(the proxies tunnel) and on loopback (two chained proxies inside one namespace).
Reports throughput and CPU seconds per GB, proxies vs direct, as ratios from one run."""
import json
import os
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


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(host, port):
    for _ in range(100):
        if cluster.sh(*cluster.netns(host), "ss", "-Hltn", f"sport = :{port}").stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def stream(sender_host, receiver_host, target, size, count, recv_listen):
    recv = subprocess.Popen(cluster.netns(receiver_host) + [LOADGEN, "recv", "--listen", recv_listen], stdout=subprocess.PIPE, text=True)
    recv.stdout.readline()
    send = subprocess.Popen(cluster.netns(sender_host) + [LOADGEN, "send", "--to", target, "--size", str(size), "--count", str(count)],
                            stdout=subprocess.PIPE, text=True)
    out = json.loads(send.stdout.readline())
    send.wait()
    got = json.loads(recv.stdout.readline())
    recv.wait()
    if got["bytes"] != out["bytes"] or got["messages"] != count:
        raise RuntimeError(f"lost data: sent {out}, received {got}")
    return out


def proxy(host, args, tag):
    log = open(os.path.join(cluster.LOGS, f"cost-{tag}.log"), "w")
    journal = os.path.join(cluster.LOGS, f"cost-{tag}-journal.jsonl")
    if os.path.exists(journal):
        os.remove(journal)
    p = subprocess.Popen(cluster.netns(host) + [cluster.PROXY, "run", "--journal", journal, *args], stdout=log, stderr=subprocess.STDOUT)
    return p


def testbed_case(size, count):
    port = 17001
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'cluster_cidr = ["{cluster.CIDR}"]\nscheduler_port = {port}\n[exempt]\nmark = 0x1000\n')
    cfg.close()
    target = f"{cluster.ip('h2')}:{port}"
    direct = stream("h1", "h2", target, size, count, f"{cluster.ip('h2')}:{port}")
    pa = proxy("h1", [], "h1")
    pb = proxy("h2", ["--config", cfg.name], "h2")
    try:
        wait_port("h1", 15301)
        wait_port("h2", 15302)
        cluster.sh(*cluster.netns("h1"), cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", cluster.CIDR)
        cpu0 = cpu_seconds(pa.pid) + cpu_seconds(pb.pid)
        proxied = stream("h1", "h2", target, size, count, f"{cluster.ip('h2')}:{port}")
        cpu = cpu_seconds(pa.pid) + cpu_seconds(pb.pid) - cpu0
        tunnels = cluster.metric(cluster.scrape("h1"), "p3proxy_connections_total", route="tunnel")
        if tunnels < 1:
            raise RuntimeError("the stream did not go through the tunnel")
    finally:
        cluster.sh(*cluster.netns("h1"), cluster.REDIRECT, "remove", check=False)
        for p in (pa, pb):
            p.terminate()
            p.wait()
        os.unlink(cfg.name)
    return direct, proxied, cpu


def loopback_case(size, count):
    # Two chained proxies in static mode on 127.0.0.1 inside host h1.
    direct = stream("h1", "h1", "127.0.0.1:17002", size, count, "127.0.0.1:17002")
    pa = proxy("h1", ["--listen", "127.0.0.1:16001", "--upstream", "127.0.0.1:16002", "--metrics", "127.0.0.1:19464"], "lo-a")
    pb = proxy("h1", ["--listen", "127.0.0.1:16002", "--upstream", "127.0.0.1:17002", "--metrics", "127.0.0.1:19465"], "lo-b")
    try:
        wait_port("h1", 16001)
        wait_port("h1", 16002)
        cpu0 = cpu_seconds(pa.pid) + cpu_seconds(pb.pid)
        proxied = stream("h1", "h1", "127.0.0.1:16001", size, count, "127.0.0.1:17002")
        cpu = cpu_seconds(pa.pid) + cpu_seconds(pb.pid) - cpu0
    finally:
        for p in (pa, pb):
            p.terminate()
            p.wait()
    return direct, proxied, cpu


def main(total_bytes=1e9):
    os.makedirs(cluster.LOGS, exist_ok=True)
    rows = []
    cluster.testbed_up(2, "unshaped")
    try:
        for path, case in (("testbed link, tunnel", testbed_case), ("loopback, 2 chained proxies", loopback_case)):
            for size in (160_000, 40_000_000):
                count = max(4, int(total_bytes // size))
                print(f"[{time.strftime('%H:%M:%S')}] {path}: {count} pushes of {size} bytes", flush=True)
                d, p, cpu = case(size, count)
                rows.append({"path": path, "size": size, "count": count,
                             "direct_gbps": d["bytes"] * 8 / d["secs"] / 1e9, "proxied_gbps": p["bytes"] * 8 / p["secs"] / 1e9,
                             "proxy_cpu_s_per_gb": cpu / (p["bytes"] / GB)})
    finally:
        cluster.testbed_down()
    lines = ["| path | push size | direct Gbit/s | through proxies Gbit/s | ratio | proxies' CPU s/GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size'] / 1e3:.0f} KB" if r["size"] < 1e6 else f"{r['size'] / 1e6:.0f} MB"
        lines.append(f"| {r['path']} | {size} | {r['direct_gbps']:.2f} | {r['proxied_gbps']:.2f} | "
                     f"{r['proxied_gbps'] / r['direct_gbps']:.2f} | {r['proxy_cpu_s_per_gb']:.2f} |")
    text = "\n".join(lines)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "proxy_cost.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "proxy_cost.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1e9)
