"""Load and soak on the testbed, bounded in count and time: SOAK_GB (default 3) GB of
ps-lite pushes from h1 to h2 through both proxies (redirect, sliced tunnel, scheduling),
in several back-to-back sessions: every byte arrives unaltered and in order (checksums of
both sides), the proxies' memory stays flat and their file descriptors come back. Each
session outruns the link by more than the sender's memory budget, so the receiver's
reassembly bound is tested too (it once closed sessions under this load).
`SOAK_GB=20` for a long run."""
import json
import os
import subprocess
import time

import pytest

import cluster
from cluster import Proxies, metric

LOADGEN = os.path.join(os.path.dirname(cluster.PROXY), "p3proxy-loadgen")
PORT = 9091  # the h2 proxy is told it is the scheduler's port: tunnels to it are admitted
SIZE = 1 << 20
SESSIONS = 3
BUDGET_KB = 512 * 1024  # the default memory_budget_bytes
IDLE_WAIT = 3  # s: the proxy checks for an idle queue once a second
IDLE_MAX_KB = 64 * 1024
IDLE_GROWTH_KB = 8 * 1024


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(2)
    yield
    cluster.testbed_down()


def status_kb(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def session(count):
    recv = subprocess.Popen(cluster.netns("h2") + [LOADGEN, "recv", "--listen", f"{cluster.ip('h2')}:{PORT}"],
                            stdout=subprocess.PIPE, text=True)
    assert "listening" in recv.stdout.readline()
    send = cluster.sh(*cluster.netns("h1"), LOADGEN, "send", "--to", f"{cluster.ip('h2')}:{PORT}",
                      "--size", str(SIZE), "--count", str(count), timeout=600)
    out, _ = recv.communicate(timeout=60)
    return json.loads(send.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])


def test_gigabytes_through_two_proxies_arrive_unaltered_with_flat_memory():
    total = float(os.environ.get("SOAK_GB", "3")) * 1e9
    count = int(total / SIZE / SESSIONS)
    with Proxies(["h1", "h2"], "soak", ["--scheduler-port", str(PORT)]) as proxies:
        pids = {h: p.pid for h, p in proxies.procs.items()}
        started = time.time()
        moved = 0
        rss = []
        for i in range(SESSIONS):
            sent, got = session(count)
            assert (got["bytes"], got["messages"]) == (sent["bytes"], sent["messages"]), (sent, got)
            assert got["checksum"] == sent["checksum"], f"session {i}: bytes altered or reordered"
            moved += sent["bytes"]
            # Idle now: within a second the proxy gives the freed pages back.
            time.sleep(IDLE_WAIT)
            rss.append({h: status_kb(pid, "VmRSS") for h, pid in pids.items()})
            if i == 0:
                # The first session fills the egress buffers once (the sender outruns the
                # link; the scheduler holds up to its memory budget) and opens the tunnel
                # connections: the baseline.
                fds0 = {h: fds(pid) for h, pid in pids.items()}
        secs = time.time() - started
        time.sleep(1)  # connections of the last session close
        fds1 = {h: fds(pid) for h, pid in pids.items()}
        peak = {h: status_kb(pid, "VmHWM") for h, pid in pids.items()}
        text = proxies.metrics()
    print(f"soak: {moved / 1e9:.1f} GB in {secs:.0f} s through each proxy; peak RSS kB {peak}; "
          f"idle RSS kB after each session {rss}; fds {fds0} -> {fds1}")
    for h in pids:
        # At its peak bounded by the egress budget (512 MiB) and allocator slack; idle
        # after each session, what it holds is small (the freed pages went back) and
        # does not grow from session to session (a leak of even 1% of the bytes that
        # went through would be some 10 MB a session).
        assert peak[h] < 2 * BUDGET_KB + 64 * 1024, f"{h}: peak {peak[h]} kB"
        assert max(r[h] for r in rss) < IDLE_MAX_KB, f"{h}: idle RSS {rss}"
        growth = rss[-1][h] - rss[0][h]
        assert growth < IDLE_GROWTH_KB, f"{h}: idle memory grew by {growth} kB: {rss}"
        assert fds1[h] <= fds0[h] + 2, f"{h}: file descriptors {fds0[h]} -> {fds1[h]}"
        assert metric(text[h], "p3proxy_parse_errors_total") == 0
        assert metric(text[h], "p3proxy_requests_lost_total") == 0
    assert metric(text["h1"], "p3proxy_slices_sent_total") > moved / 160_000 * 0.9, "it went as slices"
    assert metric(text["h2"], "p3proxy_reassembly_bytes") == 0
