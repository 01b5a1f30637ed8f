"""Scheduling on the shaped testbed (two hosts, 1 Gbit/s, host NICs plain FIFO, switch
ports with precedence bands): a pnet capture on the receiving host's NIC shows that each
tunnel class connection carries one fixed DSCP, its class's; and a small push of the first
layer's key, handed to the proxy right behind a 40 MB push of the last layer's, reaches the
other host within a few slice times (measured and printed)."""
import json
import os
import subprocess
import time

import pytest

import cluster
from cluster import Proxies, ip, metric, netns

LOADGEN = os.path.join(os.path.dirname(cluster.PROXY), "p3proxy-loadgen")
PORT = 29111
BIG, SMALL = 40_000_000, 1000
SLICE_BYTES = 160_000
RATE_BPS = 1e9


@pytest.fixture(scope="module", params=["fifo", "qdisc"])
def testbed(request):
    """Host NICs plain FIFO (the product's target), then with scripts/qdisc installed."""
    args = ["--qdisc"] if request.param == "qdisc" else []
    cluster.sh(cluster.TESTBED, "up", "--hosts", "2", "--rate", "1gbit", *args)
    yield request.param
    cluster.testbed_down()


def spawn(host, *args):
    return subprocess.Popen(netns(host) + [LOADGEN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def first_line(p):
    line = p.stdout.readline()
    assert line, f"{p.args} printed nothing"
    return json.loads(line)


def lines(p, timeout=60):
    out, _ = p.communicate(timeout=timeout)
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def preempt(tag, proxy_args):
    """The big push then the small one from h1 to a ROUTER on h2, through the proxies;
    returns (arrivals, the time the small one was handed over, capture, metrics)."""
    with Proxies(["h1", "h2"], tag, ["--scheduler-port", str(PORT), *proxy_args]) as proxies:
        recv = spawn("h2", "recv", "--listen", f"{ip('h2')}:{PORT}", "--arrivals")
        cap = spawn("h2", "capture", "--iface", "eth0", "--port", "15302", "--seconds", "5")
        try:
            assert "listening" in first_line(recv)
            assert "capturing" in first_line(cap)
            sent = subprocess.run(netns("h1") + [LOADGEN, "preempt", "--to", f"{ip('h2')}:{PORT}", "--big", str(BIG), "--small", str(SMALL)],
                                  capture_output=True, text=True, timeout=60, check=True)
            small_sent = json.loads(sent.stdout.splitlines()[-1])["small_sent"]
            arrivals = [l for l in lines(recv) if "arrival" in l]
            conns = lines(cap)
        finally:
            for p in (recv, cap):
                if p.poll() is None:
                    p.kill()
        return arrivals, small_sent, conns, proxies.metrics()


def test_without_scheduling_the_urgent_push_waits(testbed):
    """The counterfactual: a plain relay (--no-schedule) keeps the app's order. How long
    the small push then waits after the app handed it over depends on where the big one
    queued: a relay that read the whole 40 MB push in before writing it on (as with
    --no-splice) took it off the app at once (about 0.32 s left to send); one that passes
    its body through as the link takes it (splice) holds the app back instead, and what
    is left is what the sockets on the way hold. Either way it is far more than the few
    slice times of the scheduled path (next test)."""
    if testbed != "fifo":
        pytest.skip("once is enough")
    arrivals, small_sent, _, _ = preempt("relay", ["--no-schedule"])
    assert [a["key"] for a in arrivals] == [29, 0], arrivals
    latency = arrivals[1]["arrival"] - small_sent
    print(f"\n[relay] first-layer push: {latency * 1000:.0f} ms after it was handed over (behind the 40 MB push)")
    slice_time = SLICE_BYTES * 8 / RATE_BPS
    assert latency > 25 * slice_time
    if cluster.PROXY_FLAGS == ["--no-splice"]:
        assert latency > 0.25


TRIALS = 3


def test_class_connections_carry_their_dscp_and_urgent_data_overtakes(testbed):
    slice_time = SLICE_BYTES * 8 / RATE_BPS
    latencies = []
    for trial in range(TRIALS):
        arrivals, small_sent, conns, metrics = preempt(f"sched-{testbed}-{trial}", [])
        # The urgent push arrived first, long before the 40 MB one, every time.
        assert [a["key"] for a in arrivals] == [0, 29], arrivals
        latency = arrivals[0]["arrival"] - small_sent
        big_done = arrivals[1]["arrival"] - small_sent
        print(f"\n[{testbed}] first-layer push: {latency * 1000:.1f} ms after it was handed over "
              f"({latency / slice_time:.1f} slice times of {slice_time * 1000:.2f} ms); "
              f"the 40 MB push completed {big_done * 1000:.0f} ms after it")
        assert big_done > 0.25, "the 40 MB push needs about 0.32 s at 1 Gbit/s: it was really queued"
        latencies.append(latency)
    # "A few slice times": the FIFO on the sending host's NIC still holds some packets of
    # the big push (its TCP window), so allow a margin over the slice time itself. The
    # median of three trials: on these 2 shared cores (the proxies, the load generator
    # and the capture all run here) one trial in a CI run once took 18 ms where the
    # others take 0.4-4.5 ms; without scheduling it is over 250 ms every time.
    median = sorted(latencies)[TRIALS // 2]
    assert median < 10 * slice_time, f"{[round(l * 1000, 1) for l in latencies]} ms"

    # Every tunnel connection from h1 kept one DSCP for its whole life, and the session
    # used all four classes: CS6 (main stream), CS4, CS2, CS0.
    tunnels = [c for c in conns if c["src"] == ip("h1") and c["dport"] == 15302]
    assert all(len(c["dscp"]) == 1 for c in tunnels), tunnels
    assert {c["dscp"][0] for c in tunnels} == {48, 32, 16, 0}, tunnels
    bulk = max(tunnels, key=lambda c: c["bytes"])
    # The packet capture (AF_PACKET, default socket buffer) may drop a few percent of the
    # packets when the 2 cores are busy; the proxy's own byte count below is exact.
    others = sum(c["bytes"] for c in tunnels if c is not bulk)
    assert bulk["dscp"] == [0] and bulk["bytes"] > 0.9 * BIG and others < 0.01 * BIG, \
        "the 40 MB push went on the CS0 connection, nothing big on the others"
    urgent = [c for c in tunnels if c["dscp"] == [32]]
    assert sum(c["bytes"] for c in urgent) > SMALL, "the first layer's push went on the CS4 connection"
    h1 = metrics["h1"]
    assert metric(h1, "p3proxy_slices_sent_total") >= BIG // SLICE_BYTES
    assert metric(h1, "p3proxy_class_bytes_total", **{"class": "3"}) >= BIG
    assert metric(h1, "p3proxy_queue_delay_seconds_count", **{"class": "1"}) >= 1
    assert metric(metrics["h2"], "p3proxy_slices_reassembled_total") >= BIG // SLICE_BYTES
