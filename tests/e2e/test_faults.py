"""Faults on the testbed: a server dies in the middle of a job through p3proxy - the
connections that depended on it are closed within a second, the requests that were in
flight are counted (the alert's series) and logged with the nodes; then the documented
recovery - restart the job (and the proxies) - trains to the same bits as a direct job,
and `scripts/redirect remove` restores direct operation."""
import json
import os
import re
import signal
import subprocess
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
        # Stopped first: a kill between two rounds (each worker's pulls answered, its next
        # pushes not yet sent) would lose no request (seen once in CI). Stopped, the server
        # answers nothing more, so the workers' next requests stay in flight.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.time() + 10
        while not any(json.loads(proxies.admin(h, "/debug/state"))["requests"]["unanswered"] > 0 for h in ("h3", "h4")):
            assert time.time() < deadline, "requests in flight at the stopped server"
            time.sleep(0.1)
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


def test_a_server_side_proxy_restarted_under_a_live_server_continues_its_journal():
    """The proxy in front of a server with a split key is killed mid-job while the server
    lives: meanwhile the workers' proxies never go around it (they close the apps'
    connections without READY, libzmq retries); restarted on its journal, it continues the
    split layout, admits the tunnels again, and never sends the split key's requests
    unsplit (the server, which only knows the slice keys, would fail loudly)."""
    others = ["h1", "h3", "h4"]
    journal = os.path.join(cluster.LOGS, "restart-journal-h2.jsonl")
    if os.path.exists(journal):
        os.remove(journal)

    def start_h2(tag):
        log = open(os.path.join(cluster.LOGS, f"{tag}-proxy-h2.log"), "w")
        p = subprocess.Popen(cluster.netns("h2") + [cluster.PROXY, "run", "--journal", journal, *cluster.PROXY_FLAGS],
                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while cluster.sh(*cluster.netns("h2"), "ss", "-Hltn", "sport = :15301").stdout.strip() == "":
            assert p.poll() is None and time.time() < deadline, f"{tag}: the proxy did not start"
            time.sleep(0.05)
        return p

    h2 = start_h2("restart-first")
    cluster.sh(*cluster.netns("h2"), cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", cluster.CIDR)
    errors = {}
    try:
        with Proxies(others, "restart") as proxies:
            def job():
                try:
                    run_job(TOPO, "gluon_train.py", "restart-job", {"STEPS": "100000"}, timeout=90)
                except Exception as e:
                    errors["job"] = e
            t = threading.Thread(target=job)
            t.start()
            deadline = time.time() + 60
            while metric(cluster.scrape("h2"), "p3proxy_split_requests_total") < 20:
                assert time.time() < deadline, "the split key was not trained"
                time.sleep(0.5)
            split_before = metric(cluster.scrape("h2"), "p3proxy_keys_split_total")
            h2.send_signal(signal.SIGKILL)
            h2.wait()
            time.sleep(3)  # down: the workers' proxies must not go around it
            down = proxies.metrics()
            h2 = start_h2("restart-second")
            time.sleep(5)
            after = cluster.scrape("h2")
            up = proxies.metrics()
            for h in ("h1", "h3", "h4"):
                for pid in our_pids(h, "gluon_train.py"):
                    os.kill(pid, signal.SIGKILL)
            for pid in our_pids("h2", "gluon_train.py"):
                os.kill(pid, signal.SIGKILL)
            t.join(60)
    finally:
        h2.send_signal(signal.SIGTERM)
        h2.wait(10)
        cluster.sh(*cluster.netns("h2"), cluster.REDIRECT, "remove", check=False)
    assert split_before == 1
    for w in ("h3", "h4"):
        assert metric(down[w], "p3proxy_connections_refused_total", reason="proxy_not_bypassed") > 0, w
        # Never direct to the server's host.
        assert metric(down[w], "p3proxy_connections_total", route="direct") == 0, w
        assert metric(up[w], "p3proxy_tunnel_answers_total", outcome="admitted") > \
            metric(down[w], "p3proxy_tunnel_answers_total", outcome="admitted"), f"{w}: tunnels admitted again"
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(cluster.LOGS, "restart-second-proxy-h2.log")).read())
    assert "continuing from the journal of a previous run" in log and "split_keys=1" in log, log[-2000:]
    # Whatever reached the restarted proxy for the split key went split (or was stopped),
    # never whole: the server saw no request for a key it does not have.
    assert metric(after, "p3proxy_split_failures_total", reason="layout_mismatch") == 0
    server_log = open(os.path.join(cluster.LOGS, "restart-job-server0-h2.log")).read()
    assert "Check failed" not in server_log and "not initialized" not in server_log.lower(), server_log[-2000:]
