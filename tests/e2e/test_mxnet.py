"""End-to-end: real MXNet 1.9.1 dist_sync jobs across network namespaces, run without
and then with p3proxy + redirect; the results must be bitwise identical, and the
proxies' metrics must show that they carried the traffic, worker-server traffic
through tunnels.

Two workers everywhere: float sums of more workers depend on arrival order."""
import os
import socket
import subprocess
import threading
import time

import pytest

import cluster
from cluster import Proxies, Topology, metric, run_job

HOSTS = 5


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(HOSTS)
    yield
    cluster.testbed_down()


ONE_SERVER = Topology("h1", ["h2"], ["h3", "h4"])
TWO_SERVERS = Topology("h1", ["h2", "h3"], ["h4", "h5"])
COLOCATED = Topology("h1", ["h2", "h3"], ["h2", "h3"])


def compare(topo, workload, tag, proxied_hosts=None, env=None, expect_tunnels=True, proxy_args=()):
    direct = run_job(topo, workload, f"{tag}-direct", env)
    assert len(direct.results) == len(topo.workers), direct.logs
    hosts = topo.hosts() if proxied_hosts is None else proxied_hosts
    bands = ("1:10", "1:20", "1:30", "1:40")  # the switch's bands: precedence 6, 4, 2, 0
    bands_before = {h: [cluster.band_bytes(h, b) for b in bands] for h in topo.servers}
    with Proxies(hosts, tag, proxy_args) as proxies:
        proxied = run_job(topo, workload, f"{tag}-proxied", env)
        metrics = proxies.metrics()
    assert proxied.results == direct.results, "bitwise identical results with and without proxies"
    for h, text in metrics.items():
        assert metric(text, "p3proxy_forwarded_messages_total", direction="outbound") > 0, f"{h} carried traffic"
        assert metric(text, "p3proxy_parse_errors_total") == 0, f"{h}: parse errors"
        assert metric(text, "p3proxy_requests_lost_total") == 0, f"{h}: requests lost"
    if expect_tunnels:
        for w in topo.workers:
            if w in hosts and any(s in hosts and s != w for s in topo.servers):
                assert metric(metrics[w], "p3proxy_connections_total", route="tunnel") > 0, f"{w} used tunnels"
        for s in topo.servers:
            if s in hosts and any(w in hosts and w != s for w in topo.workers):
                assert metric(metrics[s], "p3proxy_connections_total", route="tunnel_in") > 0, f"{s} accepted tunnels"
                assert metric(metrics[s], "p3proxy_slices_reassembled_total") > 0, f"{s} reassembled slices"
        # Each class connection carries its DSCP: what the workers' proxies sent in class k
        # reached the servers' switch ports in class k's precedence band.
        sent = [sum(metric(metrics[w], "p3proxy_class_bytes_total", **{"class": str(k)})
                    for w in topo.workers if w in hosts and w not in topo.servers) for k in range(4)]
        seen = [sum(cluster.band_bytes(s, b) - bands_before[s][i] for s in topo.servers)
                for i, b in enumerate(bands)]
        if any(w in hosts and w not in topo.servers for w in topo.workers):
            assert sum(sent[1:]) > 0, f"data went in the data classes: {sent}"
            for k in (1, 2, 3):  # (class 0 also carries the workers' traffic to the scheduler)
                # Packet bytes include headers; ARP and the like fall in the last band.
                assert seen[k] >= sent[k], f"class {k}: {sent[k]} bytes sent, {seen[k]} in its band at the switch ({seen})"
            assert seen[1] + seen[2] < 2 * (sent[1] + sent[2]) + 100_000, f"nothing else in the data bands: {sent} {seen}"
    return direct, metrics


def test_raw_one_server():
    compare(ONE_SERVER, "kv_raw.py", "raw1")


def test_raw_two_servers():
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "raw2")
    # The node table was learned (1 scheduler + 2 servers + 2 workers).
    assert metric(metrics["h4"], "p3proxy_nodes") == 5


def test_colocated_servers_and_workers():
    _, metrics = compare(COLOCATED, "kv_raw.py", "coloc")
    for h in ("h2", "h3"):
        assert metric(metrics[h], "p3proxy_connections_total", route="same_host") > 0


def test_proxies_on_worker_hosts_only():
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "workersonly", proxied_hosts=["h4", "h5"], expect_tunnels=False)
    for w in ("h4", "h5"):
        # No proxy on the server hosts: the workers' proxies went direct.
        assert metric(metrics[w], "p3proxy_connections_total", route="direct") > 0
        assert metric(metrics[w], "p3proxy_connections_total", route="tunnel") == 0


def test_gluon_model_with_server_side_optimizer():
    direct, _ = compare(TWO_SERVERS, "gluon_train.py", "gluon")
    assert all("update_on_kvstore=True" in r for r in direct.results.values())


@pytest.mark.parametrize("source", ["key", "map"])
def test_gluon_model_with_each_priority_source(source, tmp_path):
    """`learned` is the default every other test runs with; here `key` and `map`."""
    args = ["--priority", source]
    if source == "map":
        out = tmp_path / "map.toml"
        subprocess.run([os.path.join(cluster.ROOT, "scripts", "priority-map"), "--builder", "gluon_train:build_net", "--out", str(out)],
                       cwd=os.path.join(os.path.dirname(__file__), "workloads"), check=True, capture_output=True)
        args += ["--priority-map", str(out)]
    _, metrics = compare(TWO_SERVERS, "gluon_train.py", f"gluon-{source}", proxy_args=args)
    for h, text in metrics.items():
        assert metric(text, "p3proxy_priority_source", source=source) == 1, f"{h} used {source}"


def test_heartbeats_fp16_rowsparse_pushpull():
    compare(TWO_SERVERS, "kv_ext.py", "ext", env={"PS_HEARTBEAT_INTERVAL": "1"})


def test_two_bit_compression():
    compare(TWO_SERVERS, "kv_gc.py", "gc")


def echo_server(host, port, stop):
    """A plain TCP echo service inside `host`."""
    code = (
        "import socket,sys\n"
        f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{cluster.ip(host)}',{port}));s.listen(16)\n"
        "while True:\n"
        " c,_=s.accept();d=c.recv(64);c.sendall(b'echo '+d);c.close()\n"
    )
    return subprocess.Popen(cluster.netns(host) + [cluster.PYTHON, "-c", code])


def echo_from(host, target, port):
    code = f"import socket;s=socket.create_connection(('{cluster.ip(target)}',{port}),timeout=5);s.sendall(b'ping');print(s.recv(64).decode())"
    return subprocess.run(cluster.netns(host) + [cluster.PYTHON, "-c", code], capture_output=True, text=True, timeout=20).stdout.strip()


def test_plain_tcp_service_stays_reachable():
    srv = echo_server("h2", 7777, None)
    try:
        time.sleep(0.5)
        with Proxies(ONE_SERVER.hosts(), "tcp") as proxies:
            assert echo_from("h3", "h2", 7777) == "echo ping", "before the job"
            results = {}
            job = threading.Thread(target=lambda: results.update(r=run_job(ONE_SERVER, "kv_raw.py", "tcp-job", {"NIT": "6"})))
            job.start()
            during = []
            while job.is_alive():
                during.append(echo_from("h3", "h2", 7777))
                time.sleep(0.2)
            job.join()
            assert during and all(d == "echo ping" for d in during), during
            assert echo_from("h3", "h2", 7777) == "echo ping", "after the job"
            assert len(results["r"].results) == 2
            assert metric(proxies.metrics()["h3"], "p3proxy_connections_total", route="opaque") >= 2
    finally:
        srv.kill()
