"""A real Prometheus (the Debian package) scrapes the proxies of a testbed job, with the
shipped alert rules loaded: the p3proxy series are in its HTTP API with the values the
proxies report, the rules load, and the split-refused alert really fires on a job whose
optimizer is not allowlisted while the healthy job fires nothing."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from datetime import datetime

import pytest

import cluster
from cluster import Proxies, Topology, metric, run_job

TOPO = Topology("h1", ["h2"], ["h3", "h4"])
PROM_HOST = "h1"
PROM_ADDR = "127.0.0.1:19090"
RULES = os.path.join(cluster.ROOT, "configs", "prometheus", "alerts.yml")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    cluster.testbed_up(4)
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, work / "alerts.yml")
    targets = ", ".join(f'"{cluster.ip(h)}:9464"' for h in TOPO.hosts())
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - alerts.yml\n"
        f"scrape_configs:\n  - job_name: p3proxy\n    static_configs:\n      - targets: [{targets}]\n")
    os.makedirs(cluster.LOGS, exist_ok=True)
    log = open(os.path.join(cluster.LOGS, "prometheus.log"), "w")
    proc = subprocess.Popen(cluster.netns(PROM_HOST) + [
        "prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={PROM_ADDR}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if api("/-/ready", raw=True):
                    break
            except Exception:
                pass
            assert proc.poll() is None and time.time() < deadline, f"prometheus did not start; see {log.name}"
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        cluster.testbed_down()


def api(path, raw=False, **params):
    url = f"http://{PROM_ADDR}{path}" + (("?" + urllib.parse.urlencode(params)) if params else "")
    out = cluster.sh(*cluster.netns(PROM_HOST), cluster.PYTHON, "-c",
                     f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=5).read().decode())")
    if raw:
        return out.stdout
    body = json.loads(out.stdout)
    assert body["status"] == "success", body
    return body["data"]


def query(expr):
    """Instant query: {instance: value}."""
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in api("/api/v1/query", query=expr)["result"]}


def wait_for_scrape(since):
    """Until every target has been scraped after `since` (unix seconds)."""
    deadline = time.time() + 15
    while time.time() < deadline:
        targets = api("/api/v1/targets")["activeTargets"]
        # Prometheus publishes static targets only after its discovery's first update (throttled
        # to 5 s), so an empty list means "not yet", not "all scraped".
        if targets and all(t["health"] == "up" and scrape_time(t["lastScrape"]) > since for t in targets):
            return targets
        time.sleep(0.5)
    raise AssertionError(f"targets not scraped: {targets}")


def scrape_time(rfc3339):
    """Unix seconds of Prometheus' RFC 3339 time (nanoseconds cut to microseconds)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    assert m, rfc3339
    frac = (m.group(2) or ".0")[:7]
    return datetime.fromisoformat(m.group(1) + frac + ("+00:00" if m.group(3) == "Z" else m.group(3))).timestamp()


def instance(h):
    return f"{cluster.ip(h)}:9464"


def test_prometheus_scrapes_the_proxies_of_a_job_and_loads_the_rules(prometheus):
    with Proxies(TOPO.hosts(), "prom", metrics_on_host=True) as proxies:
        job = run_job(TOPO, "gluon_train.py", "prom-job", {"STEPS": "6"})
        assert len(job.results) == 2, job.logs
        mine = proxies.metrics()
        done = time.time()
        targets = wait_for_scrape(done)
        assert sorted(t["labels"]["instance"] for t in targets) == sorted(instance(h) for h in TOPO.hosts())
        sent = query('p3proxy_forwarded_bytes_total{direction="outbound"}')
        split = query("p3proxy_keys_split_total")
        lost = query("p3proxy_requests_lost_total")
        slice_requests = query("p3proxy_slice_requests_total")
        delay = query("sum by (instance) (p3proxy_queue_delay_seconds_count)")
        # promtool lints what the proxies export (names, HELP, types).
        for h, text in mine.items():
            lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0, f"{h}: {lint.stdout}{lint.stderr}"
        # While the proxies run (once they stop, P3proxyDown rightly goes pending).
        assert api("/api/v1/alerts")["alerts"] == [], "a healthy job fires nothing"
    for h in TOPO.hosts():
        # The job is over: what Prometheus holds is what the proxy itself reported.
        assert sent[instance(h)] == metric(mine[h], "p3proxy_forwarded_bytes_total", direction="outbound") > 0, h
        assert lost[instance(h)] == 0, h
        assert delay[instance(h)] > 0, h
    assert split[instance("h2")] == 1, "the server's proxy split the big key"
    assert slice_requests[instance("h2")] > 0
    assert split[instance("h3")] == 0
    groups = api("/api/v1/rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"P3proxyRequestsLost", "P3proxySplitFailed", "P3proxySplitRefused", "P3proxyParseErrors",
            "P3proxyJournalErrors", "P3proxyDown"} <= set(rules)
    assert all(r["health"] == "ok" for r in rules.values()), rules


def test_the_split_refused_alert_fires_for_a_job_whose_optimizer_is_not_allowlisted(prometheus):
    with Proxies(TOPO.hosts(), "prom-lamb", metrics_on_host=True):
        job = run_job(TOPO, "gluon_train.py", "prom-lamb-job", {"STEPS": "6", "OPTIMIZER": "lamb"})
        assert len(job.results) == 2, job.logs
        wait_for_scrape(time.time())
        deadline = time.time() + 10
        while time.time() < deadline:
            firing = [a for a in api("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
            if firing:
                break
            time.sleep(0.5)
    assert [(a["labels"]["alertname"], a["labels"]["instance"], a["labels"]["reason"]) for a in firing] == [
        ("P3proxySplitRefused", instance("h2"), "optimizer_not_allowed")], firing
    assert firing[0]["labels"]["severity"] == "warning"


def server_pid(host):
    """The ps-lite server's Python process in `host`'s namespace (not its `timeout`)."""
    pids = cluster.sh("ip", "netns", "pids", f"{cluster.PREFIX}-{host}").stdout.split()
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except FileNotFoundError:
            continue
        if cmd and cmd[0].endswith(b"python") and any(b"emulated_job.py" in c for c in cmd):
            return int(pid)
    raise AssertionError(f"no server process in {host}: {pids}")


def admin_get(host, path):
    url = f"http://{instance(host)}{path}"
    out = cluster.sh(*cluster.netns(PROM_HOST), cluster.PYTHON, "-c",
                     f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=5).read().decode())")
    return out.stdout


def test_a_stopped_server_drives_the_oldest_request_age_until_the_stall_alert_fires(prometheus):
    """SIGSTOP the job's server mid-run: nothing answers, every worker host's oldest
    request ages, and Prometheus fires P3proxyJobStalled from the shipped rules; after
    SIGCONT the job finishes and the age falls back."""
    job_args = ["--model", "vgg19", "--scale", "0.02", "--iters", "60", "--warmup", "1", "--compute-ms", "200"]
    job = os.path.join(cluster.ROOT, "bench", "emulated_job.py")
    with Proxies(TOPO.hosts(), "prom-stall", metrics_on_host=True) as proxies:
        done = {}
        runner = threading.Thread(target=lambda: done.update(
            result=run_job(TOPO, job, "prom-stall-job", timeout=300, args=job_args)))
        runner.start()
        deadline = time.time() + 60
        while not all(metric(proxies.metrics()[h], "p3proxy_iteration_period_seconds_count") >= 2
                      for h in TOPO.workers):
            assert runner.is_alive() and time.time() < deadline, "the job did not get going"
            time.sleep(0.5)
        assert json.loads(admin_get("h3", "/debug/state"))["job"]["iteration_s"] > 0
        pid = server_pid("h2")
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        try:
            firing = []
            deadline = stopped + 90
            workers = {instance(h) for h in TOPO.workers}
            while time.time() < deadline and not {a["labels"]["instance"] for a in firing} >= workers:
                firing = [a for a in api("/api/v1/alerts")["alerts"]
                          if a["state"] == "firing" and a["labels"]["alertname"] == "P3proxyJobStalled"]
                time.sleep(1)
            fired_after = time.time() - stopped
            state = json.loads(admin_get("h3", "/debug/state"))
            ages = query("p3proxy_oldest_request_age_seconds")
        finally:
            os.kill(pid, signal.SIGCONT)
        print(f"P3proxyJobStalled fired {fired_after:.0f} s after SIGSTOP; ages {ages}")
        assert {a["labels"]["instance"] for a in firing} >= workers, firing
        # The scheduler's host relays no data request: nothing ages there.
        assert instance("h1") not in {a["labels"]["instance"] for a in firing}
        assert firing[0]["labels"]["severity"] == "critical"
        assert state["requests"]["unanswered"] > 0 and state["requests"]["oldest_age_s"] > 30, state["requests"]
        runner.join(timeout=240)
        plot_dashboard(stopped - 20, time.time() + 2, os.path.join(cluster.LOGS, "dashboard.png"))
        assert not runner.is_alive()
        assert len(done["result"].results) == 2, done["result"].logs
        # Answered again: the age falls back under the threshold, and the alert resolves.
        wait_for_scrape(time.time())
        assert all(v < 30 for v in query("p3proxy_oldest_request_age_seconds").values())


DASHBOARD = os.path.join(cluster.ROOT, "configs", "grafana", "p3proxy-dashboard.json")
# The panels an operator watches for a job's health, plotted as Grafana would.
HEALTH_PANELS = ("Iteration time", "First-layer wait", "Oldest unanswered request", "Server request latency",
                 "Bytes relayed", "Queue delay p99 by class")


def plot_dashboard(start, end, path):
    """Plots the dashboard's job-health panels from this Prometheus over [start, end]:
    each panel's own queries, with Grafana's variables filled in."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {p["title"]: p for p in json.load(open(DASHBOARD))["panels"]}
    fig, axes = plt.subplots(3, 2, figsize=(14, 10))
    for ax, title in zip(axes.flat, HEALTH_PANELS):
        panel = panels[title]
        for target in panel["targets"]:
            expr = target["expr"].replace('instance=~"$instance"', 'instance=~".*"').replace("$__rate_interval", "5s")
            series = api("/api/v1/query_range", query=expr, start=start, end=end, step=1)["result"]
            for s in series:
                legend = re.sub(r"\{\{(\w+)\}\}", lambda m: s["metric"].get(m.group(1), ""), target.get("legendFormat", ""))
                t = [float(v[0]) - start for v in s["values"]]
                y = [float(v[1]) for v in s["values"]]
                ax.plot(t, y, label=legend or expr[:40])
        ax.set_title(title)
        ax.set_xlabel("s")
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", ""))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("p3proxy dashboard panels from a real Prometheus: a job whose server is stopped at t=20 s")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
