"""Faults on the testbed: a server dies in the middle of a job through p3proxy - the
connections that depended on it are closed within a second, the requests that were in
flight are counted (the alert's series) and logged with the nodes; then the documented
recovery - restart the job (and the proxies) - trains to the same bits as a direct job,
and `scripts/redirect remove` restores direct operation."""
import os
import re
import signal
import threading
import time
from datetime import datetime

import pytest

import cluster
from cluster import Proxies, Topology, metric, run_job

TOPO = Topology("h1", ["h2"], ["h3", "h4"])


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(4)
    yield
    cluster.testbed_down()


def our_pids(host, needle):
    """Processes in `host`'s namespace that this test started (their command line names
    the workload)."""
    out = cluster.sh("ip", "netns", "pids", f"{cluster.PREFIX}-{host}", check=False).stdout.split()
    pids = []
    for pid in out:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd and "timeout" not in cmd.split()[0]:
            pids.append(int(pid))
    return pids


def log_time(line):
    stamp = re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")[:26] + "+00:00").timestamp()


def test_a_server_dying_mid_job_is_seen_counted_and_recovered_from():
    direct = run_job(TOPO, "kv_raw.py", "faults-direct", {"NIT": "4"})
    errors = {}
    with Proxies(TOPO.hosts(), "faults") as proxies:
        def job():
            try:
                run_job(TOPO, "kv_raw.py", "faults-doomed", {"NIT": "100000"}, timeout=120)
            except Exception as e:  # the job fails: its server was killed
                errors["job"] = e
        t = threading.Thread(target=job)
        t.start()
        # Let it train, then kill the server.
        deadline = time.time() + 60
        while metric(cluster.scrape("h3"), "p3proxy_forwarded_bytes_total", direction="outbound") < 50e6:
            assert time.time() < deadline, "the job did not start"
            time.sleep(0.5)
        pids = our_pids("h2", "kv_raw.py")
        assert pids, "the server process"
        killed_at = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(3)
        metrics = proxies.metrics()
        workers_killed_at = time.time()
        # The workers hang (ps-lite never resends): end them, by id.
        for h in ("h1", "h3", "h4"):
            for pid in our_pids(h, "kv_raw.py"):
                os.kill(pid, signal.SIGKILL)
        t.join(60)
    assert "job" in errors, "the doomed job failed"
    lost = {h: metric(metrics[h], "p3proxy_requests_lost_total") for h in TOPO.hosts()}
    assert sum(lost.values()) > 0, lost
    logs = {h: open(f"{cluster.LOGS}/faults-proxy-{h}.log").read() for h in TOPO.hosts()}
    died = [l for h in ("h2", "h3", "h4") for l in logs[h].splitlines()
            if "upstream died with requests in flight" in l]
    assert died, "logged"
    assert any("requester=ps9" in re.sub(r"\x1b\[[0-9;]*m", "", l) or "requester=ps11" in re.sub(r"\x1b\[[0-9;]*m", "", l)
               for l in died), died
    # Every connection to the server closed within a second of its death (before the
    # test ended the workers).
    server = cluster.ip("h2") + ":"
    closes = [log_time(l) for h in ("h2", "h3", "h4") for l in logs[h].splitlines()
              if ("upstream died" in l or "upstream closed" in l) and server in re.sub(r"\x1b\[[0-9;]*m", "", l)
              and killed_at - 0.5 <= log_time(l) < workers_killed_at]
    assert len(closes) >= 2 and max(closes) - killed_at < 1.0, (killed_at, closes)

    # Recovery as documented: restart the proxies and the job.
    with Proxies(TOPO.hosts(), "faults-restarted"):
        again = run_job(TOPO, "kv_raw.py", "faults-again", {"NIT": "4"})
    assert again.results == direct.results
    # And without proxies, once the redirect is gone (Proxies removes it), direct works.
    for h in TOPO.hosts():
        assert cluster.sh(*cluster.netns(h), cluster.REDIRECT, "status", check=False).returncode == 3
    assert run_job(TOPO, "kv_raw.py", "faults-direct-again", {"NIT": "4"}).results == direct.results
