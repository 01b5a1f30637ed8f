"""End-to-end: real MXNet 1.9.1 dist_sync jobs across network namespaces, run without
and then with p3proxy + redirect; the results must be bitwise identical, and the
proxies' metrics must show that they carried the traffic, worker-server traffic
through tunnels.

Two workers everywhere: float sums of more workers depend on arrival order."""
import json
import math
import os
import re
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


def journaled_layouts(tag, topo):
    """The split layouts the servers' proxies journaled in job `tag`."""
    out = []
    for h in dict.fromkeys(topo.servers):
        path = os.path.join(cluster.LOGS, f"{tag}-journal-{h}.jsonl")
        if os.path.exists(path):
            out += [json.loads(line)["layout"] for line in open(path) if '"record":"layout"' in line]
    return out


def sqrt_rule(total, cost=160_000, smallest=160_000, elem=4):
    """README "How big the slices are": sqrt(total * cost) bytes, at least `smallest`,
    in whole elements."""
    return max(smallest, math.isqrt(total * cost)) // elem * elem


def server_total(metrics, topo, name, **labels):
    """Sum of a metric over the proxies of the server hosts."""
    return sum(metric(metrics[h], name, **labels) for h in dict.fromkeys(topo.servers) if h in metrics)


def weights(result):
    """The weights' digest of a worker's RESULT line."""
    return re.search(r"sha=(\w+)", result).group(1)


def compare(topo, workload, tag, proxied_hosts=None, env=None, expect_tunnels=True, proxy_args=(), split=None, refused=(),
            workers_agree=False):
    """Runs `workload` without and with proxies; `split`: the number of keys the
    servers' proxies must have split; `refused`: reasons they must have refused for;
    `workers_agree`: every worker ends with the same weights (worker-side updates)."""
    direct = run_job(topo, workload, f"{tag}-direct", env)
    assert len(direct.results) == len(topo.workers), direct.logs
    for attempt in range(2 if workers_agree else 0):
        # Workers that must agree and do not: MXNet's server served a worker's requests
        # out of order (README, "Request order at the server"; seen once in CI with two
        # servers), so this direct run is no reference. At most two more.
        if len({weights(r) for r in direct.results.values()}) == 1:
            break
        print(f"{tag}: the direct run's workers disagree ({direct.results}); running it again", flush=True)
        direct = run_job(topo, workload, f"{tag}-direct{attempt + 2}", env)
    if workers_agree:
        assert len({weights(r) for r in direct.results.values()}) == 1, f"no direct run whose workers agree: {direct.results}"
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
        assert metric(text, "p3proxy_split_failures_total") == 0, f"{h}: a split layout failed"
    if split is not None:
        assert server_total(metrics, topo, "p3proxy_keys_split_total") == split, "keys split"
        # Every layout was journaled (before its first slice request went out).
        journaled = sum(open(os.path.join(cluster.LOGS, f"{tag}-journal-{h}.jsonl")).read().count('"record":"layout"')
                        for h in dict.fromkeys(topo.servers) if h in hosts)
        assert journaled == split, "layouts in the journals"
        if split:
            assert server_total(metrics, topo, "p3proxy_slice_requests_total") > server_total(metrics, topo, "p3proxy_split_requests_total") > 0
            # Merged where the response ends: by a worker's proxy from the parts the server's
            # proxy streamed, or by the server's proxy itself on the same host.
            assert sum(metric(t, "p3proxy_split_responses_merged_total") for t in metrics.values()) > 0
            # Every worker's push of a key reached the servers' proxies: the pair lag was
            # measured (at least one key per round), and no lag exceeds the job itself.
            lags = server_total(metrics, topo, "p3proxy_push_pair_lag_seconds_count")
            assert lags >= 3, f"pair lags measured: {lags}"
            assert server_total(metrics, topo, "p3proxy_push_pair_lag_seconds_sum") < 60 * lags
    for reason in refused:
        assert server_total(metrics, topo, "p3proxy_split_refused_total", reason=reason) > 0, f"refused: {reason}"
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


# kv_raw's keys above one slice (160,000 bytes): key 1 (4.4 MB; with two servers MXNet
# already spreads it over both) and key 9 (360 KB).
def test_raw_one_server():
    compare(ONE_SERVER, "kv_raw.py", "raw1", split=2)


def test_raw_two_servers():
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "raw2", split=3)
    # The node table was learned (1 scheduler + 2 servers + 2 workers).
    assert metric(metrics["h4"], "p3proxy_nodes") == 5
    # No worker on a server's host: every slice the smallest.
    assert {l["slice"] for l in journaled_layouts("raw2", TWO_SERVERS)} == {160_000}


def test_paced_tunnels_keep_results_bitwise_equal():
    """`--pace`: each peer host's tunnels at the link rate / workers (issue 27); the
    workers' proxies really waited for it."""
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "paced", split=3, proxy_args=["--link-rate", "1gbit", "--pace"])
    assert all(metric(metrics[w], "p3proxy_paced_waits_total") > 0 for w in TWO_SERVERS.workers), \
        {w: metric(metrics[w], "p3proxy_paced_waits_total") for w in TWO_SERVERS.workers}


def test_colocated_servers_and_workers():
    _, metrics = compare(COLOCATED, "kv_raw.py", "coloc", split=3)
    for h in ("h2", "h3"):
        assert metric(metrics[h], "p3proxy_connections_total", route="same_host") > 0
    # A worker on each server's host: slices sized by the square-root rule (key 1's
    # 2.2 MB parts as 4 slices of 593 KB where uniform slices made 14).
    layouts = journaled_layouts("coloc", COLOCATED)
    assert sorted((l["total"], l["slice"], l["count"]) for l in layouts) == sorted(
        (l["total"], sqrt_rule(l["total"]), -(-l["total"] // sqrt_rule(l["total"]))) for l in layouts)
    assert max(l["slice"] for l in layouts) > 160_000, layouts


def test_proxies_on_worker_hosts_only():
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "workersonly", proxied_hosts=["h4", "h5"], expect_tunnels=False, split=0)
    for w in ("h4", "h5"):
        # No proxy on the server hosts: the workers' proxies went direct.
        assert metric(metrics[w], "p3proxy_connections_total", route="direct") > 0
        assert metric(metrics[w], "p3proxy_connections_total", route="tunnel") == 0


def test_unproxied_workers_leave_keys_whole_without_inbound_capture():
    """Proxies on the scheduler's and servers' hosts only: the workers reach the servers
    directly, so the servers' proxies never see a request and split nothing."""
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "noworkerproxy", proxied_hosts=["h1", "h2", "h3"],
                         expect_tunnels=False, split=0)
    for s in ("h2", "h3"):
        assert metric(metrics[s], "p3proxy_split_requests_total") == 0
        assert metric(metrics[s], "p3proxy_connections_total", route="inbound") == 0


def test_inbound_capture_splits_keys_for_workers_that_run_no_proxy():
    """The same job with inbound capture on the server hosts (`--inbound`): the workers'
    connections to the servers' registered ports are redirected to the proxy, which splits
    the keys and merges the responses itself before they go to the unproxied workers."""
    _, metrics = compare(TWO_SERVERS, "kv_raw.py", "inbound", proxied_hosts=["h1", "h2", "h3"], expect_tunnels=False,
                         proxy_args=["--inbound", "0.0.0.0:15303"], split=3)
    for s in ("h2", "h3"):
        # Both workers' request connections (and the scheduler's) came in through the capture.
        assert metric(metrics[s], "p3proxy_connections_total", route="inbound") >= 2, s
        assert metric(metrics[s], "p3proxy_split_responses_merged_total") > 0, s
        # The rules went with the proxy, and only ever matched the registered ports.
        assert "P3PROXY_INBOUND" not in cluster.sh(*cluster.netns(s), "iptables", "-t", "nat", "-S").stdout
    log = open(os.path.join(cluster.LOGS, "inbound-proxy-h2.log")).read()
    assert "inbound connections to this node are captured" in log


def test_the_inbound_listener_is_not_a_relay():
    """Connecting to the inbound port itself (not redirected) reaches nothing."""
    with Proxies(["h2"], "inbound-direct", ["--inbound", "0.0.0.0:15303"]) as proxies:
        out = cluster.sh(*cluster.netns("h3"), cluster.PYTHON, "-c",
                         f"import socket;s=socket.create_connection(('{cluster.ip('h2')}',15303),3);s.sendall(b'\\xff'+bytes(9)+b'\\x7f');"
                         "s.settimeout(3)\ntry: print(repr(s.recv(64)))\nexcept ConnectionResetError: print('reset')")
        assert out.stdout.strip() in ("b''", "reset"), out  # closed, not one byte answered
        text = proxies.metrics()["h2"]
        assert metric(text, "p3proxy_connections_refused_total", reason="own_port") == 1
        assert "-j P3PROXY_INBOUND" in cluster.sh(*cluster.netns("h2"), "iptables", "-t", "nat", "-S").stdout


# The Gluon model's one key above a slice: the 300x576 Dense weight (691 KB).
@pytest.mark.parametrize("topo", [ONE_SERVER, TWO_SERVERS, COLOCATED], ids=["1server", "2servers", "colocated"])
def test_gluon_model_with_server_side_optimizer(topo):
    direct, _ = compare(topo, "gluon_train.py", "gluon", split=1)
    assert all("update_on_kvstore=True optimizer=sgd" in r for r in direct.results.values())


def test_gluon_model_with_adam_on_the_servers():
    direct, _ = compare(TWO_SERVERS, "gluon_train.py", "gluon-adam", env={"OPTIMIZER": "adam"}, split=1)
    assert all("update_on_kvstore=True optimizer=adam" in r for r in direct.results.values())


def test_gluon_model_with_worker_side_updates():
    env = {"MXNET_UPDATE_ON_KVSTORE": "0"}
    direct, _ = compare(TWO_SERVERS, "gluon_train.py", "gluon-noupd", env=env, split=1, workers_agree=True)
    assert all("update_on_kvstore=False" in r for r in direct.results.values())


@pytest.mark.parametrize("topo,args", [(ONE_SERVER, ()), (COLOCATED, ()), (ONE_SERVER, ("--no-schedule",))],
                         ids=["separate-hosts", "colocated", "no-schedule"])
def test_a_pull_is_served_before_the_same_workers_later_request_for_its_key(topo, args):
    """MXNet's ps-lite server serves queued requests from a heap, not first-in
    first-out: behind a busy server (an optimizer that takes half a second on another
    key), a pushpull sent right after a pull of the same key can be served first, and
    the pull returns the value after the round (direct runs got this wrong in 5 of 6
    when measured). The proxy in front of the server holds the pushpull until
    the pull is answered: every pull sees the value before its round. Colocated, the
    local worker's requests take the same-host relay; with --no-schedule the tunnels
    are plain relays: the pull held in a write buffer must go out before the wait."""
    tag = "order-" + ("colocated" if topo is COLOCATED else "noschedule" if args else "separate")
    with Proxies(topo.hosts(), tag, args) as proxies:
        proxied = run_job(topo, "kv_pull_then_pushpull.py", f"{tag}-proxied", env={"ROUNDS": "3"}, timeout=60)
        metrics = proxies.metrics()
    assert len(proxied.results) == 2 and len(set(proxied.results.values())) == 1, proxied.results
    assert all("pull_ok=True" in r for r in proxied.results.values()), proxied.results
    # Each worker's pushpull of each round waited for its pull.
    assert server_total(metrics, topo, "p3proxy_requests_held_for_order_total") == 2 * 3


def test_a_request_for_a_key_waits_for_its_init_to_be_served():
    """The server takes a push to an unknown key as its init. Rank 0 pushes a new key
    while the server is busy (an optimizer that takes half a second on another key),
    meets the other worker at a barrier, and that worker pulls the key: both wait in
    the server's heap, and direct the pull is served first and the server stops with
    `init N first` (README, "Request order at the server"). Through p3proxy the pull
    waits until the init is answered: every run finishes, identical, every pull sees
    the pushed value, and each round's pull was held for the init."""
    rounds = 3
    results = []
    for i in range(3):
        tag = f"init-order{i}"
        with Proxies(ONE_SERVER.hosts(), tag) as proxies:
            proxied = run_job(ONE_SERVER, "kv_init_then_pull.py", f"{tag}-proxied",
                              env={"ROUNDS": str(rounds)}, timeout=60)
            metrics = proxies.metrics()
        assert len(proxied.results) == 2 and all("pull_ok=True" in r for r in proxied.results.values()), proxied.results
        results.append(proxied.results)
        held = sum(server_total(metrics, ONE_SERVER, "p3proxy_requests_held_for_order_total", reason=r)
                   for r in ("init_in_flight", "not_initialized"))
        assert held >= rounds, held
    assert all(r == results[0] for r in results), results


def test_lamb_on_the_servers_is_left_unsplit():
    """LAMB normalises by the whole tensor: slices would train differently."""
    compare(TWO_SERVERS, "gluon_train.py", "gluon-lamb", env={"OPTIMIZER": "lamb"}, split=0, refused=["optimizer_not_allowed"])


def test_module_style_per_key_multipliers_are_left_unsplit():
    compare(TWO_SERVERS, "kv_module.py", "module", split=0, refused=["optimizer_multipliers"])


def test_a_request_the_layout_cannot_serve_stops_the_job():
    """Key 9 is split, then pushed row-sparse: the job must stop, loudly, not train on."""
    with Proxies(ONE_SERVER.hosts(), "break") as proxies:
        with pytest.raises(RuntimeError) as failed:
            run_job(ONE_SERVER, "kv_break.py", "break-proxied", timeout=25)
        metrics = proxies.metrics()
    # The dense round went through the split key; the row-sparse push never reached the server.
    assert str(failed.value).count("dense round done") == 2 and "RESULT" not in str(failed.value)
    assert metric(metrics["h2"], "p3proxy_keys_split_total") == 1
    assert metric(metrics["h2"], "p3proxy_split_failures_total", reason="layout_mismatch") == 1
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(cluster.LOGS, "break-proxy-h2.log")).read())
    assert "STOPPING the server's traffic" in log and "key=Some(9)" in log, log[-3000:]
    assert "a RowSparse Float32 request; the split layout holds Default Float32" in log, log[-3000:]


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
    """fp16 key 11 (200 KB) is split under a multi-precision optimizer."""
    compare(TWO_SERVERS, "kv_ext.py", "ext", env={"PS_HEARTBEAT_INTERVAL": "1"}, split=1)


def test_two_bit_compression():
    compare(TWO_SERVERS, "kv_gc.py", "gc", split=0, refused=["compression"])


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
