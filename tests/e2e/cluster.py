"""Runs real MXNet 1.9.1 jobs on the namespace testbed (scripts/testbed), with or
without p3proxy + scripts/redirect on chosen hosts, and collects what they printed
and what the proxies counted."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TESTBED = os.path.join(ROOT, "scripts", "testbed")
REDIRECT = os.path.join(ROOT, "scripts", "redirect")
# P3PROXY_SPLICE=off: every proxy the tests start reads every byte in (scripts/test runs
# the suite both ways).
PROXY_FLAGS = ["--no-splice"] if os.environ.get("P3PROXY_SPLICE") == "off" else []
PROXY = os.path.abspath(os.environ.get("P3PROXY_BIN", os.path.join(ROOT, "target", "release", "p3proxy")))
PYTHON = os.environ.get("P3_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
WORKLOADS = os.path.join(os.path.dirname(__file__), "workloads")
PREFIX = os.environ.get("P3TB_PREFIX", "p3tb")
NET = os.environ.get("P3TB_NET", "10.77.0")
CIDR = f"{NET}.0/24"
SCHED_PORT = 9091
LOGS = os.environ.get("P3_E2E_LOGS", "/tmp/p3proxy-e2e")


def ip(host):
    return f"{NET}.{10 + int(host[1:])}"


def netns(host):
    return ["ip", "netns", "exec", f"{PREFIX}-{host}"]


def sh(*cmd, check=True, **kw):
    done = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr.strip()}")
    return done


def testbed_up(hosts, rate="1gbit", qdisc=False):
    sh(TESTBED, "up", "--hosts", str(hosts), "--rate", rate, *(["--qdisc"] if qdisc else []))


def testbed_down():
    sh(TESTBED, "down", check=False)


@dataclass
class Topology:
    """Which host runs what. Host names are h1, h2, ..."""

    scheduler: str
    servers: list
    workers: list

    def hosts(self):
        return sorted({self.scheduler, *self.servers, *self.workers}, key=lambda h: int(h[1:]))


def scrape(host, port=9464, address="127.0.0.1", path="/metrics"):
    """The proxy's Prometheus text (or another admin path), fetched inside the host's namespace."""
    out = sh(*netns(host), PYTHON, "-c", f"import urllib.request;print(urllib.request.urlopen('http://{address}:{port}{path}', timeout=5).read().decode())")
    return out.stdout


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z0-9_:]+)(\{([^}]*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


class Proxies:
    """p3proxy and its redirect on some hosts; stopped and removed on exit."""

    def __init__(self, hosts, tag, args=(), metrics_on_host=False, as_uid=None, binary=None):
        """`metrics_on_host`: each proxy serves metrics on its host address (port 9464),
        reachable from the other hosts, instead of its 127.0.0.1. `as_uid`: run each proxy
        as that uid with no capability at all (the redirect exempts the uid; the caller's
        config says `[exempt] uid`). `binary`: another p3proxy build (a baseline)."""
        self.as_uid = as_uid
        self.binary = binary or PROXY
        self.hosts = list(hosts)
        self.procs = {}
        self.tag = tag
        self.args = list(args)
        self.metrics_on_host = metrics_on_host

    def __enter__(self):
        os.makedirs(LOGS, exist_ok=True)
        for h in self.hosts:
            log = open(os.path.join(LOGS, f"{self.tag}-proxy-{h}.log"), "w")
            env = dict(os.environ, P3PROXY_LOG=os.environ.get("P3PROXY_LOG", "info"))
            args = list(self.args) + PROXY_FLAGS
            if "--journal" not in args:
                # Every proxy its own fresh journal (they share this machine's filesystem).
                journal = os.path.join(LOGS, f"{self.tag}-journal-{h}.jsonl")
                if os.path.exists(journal):
                    os.remove(journal)
                if self.as_uid is not None:
                    # The unprivileged proxy creates its journal in a directory of its own.
                    jdir = os.path.join(LOGS, f"{self.tag}-journal-{h}")
                    os.makedirs(jdir, exist_ok=True)
                    os.chown(jdir, self.as_uid, self.as_uid)
                    journal = os.path.join(jdir, "journal.jsonl")
                    if os.path.exists(journal):
                        os.remove(journal)
                args += ["--journal", journal]
            if self.metrics_on_host:
                args += ["--metrics", f"{ip(h)}:9464"]
            user = []
            if self.as_uid is not None:
                user = ["setpriv", f"--reuid={self.as_uid}", f"--regid={self.as_uid}", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
            self.procs[h] = subprocess.Popen(netns(h) + user + [self.binary, "run", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        for h in self.hosts:
            deadline = time.time() + 10
            while sh(*netns(h), "ss", "-Hltn", "sport = :15301").stdout.strip() == "":
                if self.procs[h].poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"p3proxy on {h} did not start; see {LOGS}/{self.tag}-proxy-{h}.log")
                time.sleep(0.05)
            exempt = ["--uid", str(self.as_uid)] if self.as_uid is not None else []
            sh(*netns(h), REDIRECT, "install", "--proxy-port", "15301", "--cidr", CIDR, *exempt)
        return self

    def admin(self, host, path="/metrics"):
        """A path of the proxy's admin surface on `host` (its metrics address)."""
        return scrape(host, address=ip(host) if self.metrics_on_host else "127.0.0.1", path=path)

    def metrics(self):
        return {h: self.admin(h) for h in self.hosts}

    def slice_requests(self):
        """Slice requests every proxy sent to its local servers so far."""
        return sum(metric(text, "p3proxy_slice_requests_total") for text in self.metrics().values())

    def cpu_seconds(self):
        """CPU time (user + system) each proxy has used so far."""
        out = {}
        for h, p in self.procs.items():
            st = proc_stat(p.pid)
            out[h] = st and st.user + st.system
            if st and os.environ.get("P3_CPU_SPLIT"):
                print(f"proxy {h}: user {st.user} s, system {st.system} s", flush=True)
        return out

    def __exit__(self, *exc):
        self.cpu = self.cpu_seconds()
        states = {}
        for h in self.hosts:
            # Each proxy's /debug/state at the end (learned order, layouts), beside its log.
            try:
                state = self.admin(h, "/debug/state")
                with open(os.path.join(LOGS, f"{self.tag}-state-{h}.json"), "w") as f:
                    f.write(state)
                states[h] = json.loads(state)
            except Exception:  # noqa: BLE001 - a proxy that died has no state; the job says why
                pass
        self.states = states
        self.answer_idle_share = None
        try:
            texts = self.metrics()
            self.slices = sum(metric(t, "p3proxy_slice_requests_total") for t in texts.values())
            lags = sum(metric(t, "p3proxy_push_pair_lag_seconds_count") for t in texts.values())
            # Mean time from the first to the last worker's push of a key at the servers' proxies.
            self.pair_lag = sum(metric(t, "p3proxy_push_pair_lag_seconds_sum") for t in texts.values()) / lags if lags else None
            # At the servers' proxies (those that measured a pair lag), with --link-rate: the
            # share of the time requests waited with no answer on the link.
            answers = [states[h]["job"].get("answers") for h, t in texts.items()
                       if h in states and metric(t, "p3proxy_push_pair_lag_seconds_count") > 0]
            waiting = sum(a["waiting_s"] for a in answers if a)
            if waiting > 0:
                self.answer_idle_share = sum(a["idle_s"] for a in answers if a) / waiting
        except Exception:  # noqa: BLE001 - a proxy that died has no metrics; the job says why
            self.slices = self.pair_lag = None
        for h in self.hosts:
            sh(*netns(h), REDIRECT, "remove", check=False)
        for h, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@dataclass
class ProcStat:
    user: float  # CPU seconds
    system: float
    minflt: int  # minor page faults


def proc_stat(pid):
    """A live process's CPU seconds and minor faults from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return ProcStat(int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]))


def process_cpu_seconds(pid):
    """User + system CPU seconds of a live process and its live descendants (a job's
    process may run under `timeout`); None once it is gone."""
    st = proc_stat(pid)
    if st is None:
        return None
    try:
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        return None
    return st.user + st.system + sum(process_cpu_seconds(c) or 0.0 for c in children)


@dataclass
class JobResult:
    results: dict = field(default_factory=dict)  # worker rank -> RESULT line
    logs: dict = field(default_factory=dict)
    hung: list = field(default_factory=list)  # processes killed after the results were in
    cpu: dict = field(default_factory=dict)  # "server0" -> CPU seconds (read every 0.2 s while it ran)


def netns_pids_kill(pid):
    """The command that kills a process's children (`timeout` wraps the job's python)."""
    return ["pkill", "-KILL", "-P", str(pid)]


def run_job(topo, workload, tag, env=None, timeout=120, args=(), exit_grace=None):
    """Runs one dist_sync job (`workload`: a script of workloads/, or a path, run with
    `args` on every node); returns the workers' RESULT lines by rank."""
    os.makedirs(LOGS, exist_ok=True)
    base = {
        "DMLC_PS_ROOT_URI": ip(topo.scheduler),
        "DMLC_PS_ROOT_PORT": str(SCHED_PORT),
        "DMLC_NUM_SERVER": str(len(topo.servers)),
        "DMLC_NUM_WORKER": str(len(topo.workers)),
        "OMP_NUM_THREADS": "1",
        "MXNET_ENGINE_TYPE": "ThreadedEnginePerDevice",
        "PYTHONUNBUFFERED": "1",
    }
    base.update(env or {})
    script = workload if os.path.isabs(workload) else os.path.join(WORKLOADS, workload)
    procs = []

    def start(role, host, i):
        e = dict(os.environ, **base, DMLC_ROLE=role, DMLC_NODE_HOST=ip(host))
        path = os.path.join(LOGS, f"{tag}-{role}{i}-{host}.log")
        cmd = netns(host) + ["timeout", str(timeout), PYTHON, script, *args]
        p = subprocess.Popen(cmd, env=e, stdout=open(path, "w"), stderr=subprocess.STDOUT)
        procs.append((role, i, path, p))

    start("scheduler", topo.scheduler, 0)
    for i, h in enumerate(topo.servers):
        start("server", h, i)
    for i, h in enumerate(topo.workers):
        start("worker", h, i)
    result = JobResult()
    failed = []
    if exit_grace is not None:
        # Wait for every worker's RESULT, then give the processes `exit_grace` seconds to
        # exit; stragglers (MXNet's P3 van sometimes hangs at shutdown) are killed and noted.
        deadline = time.time() + timeout
        workers = [(i, path) for role, i, path, _ in procs if role == "worker"]
        while time.time() < deadline and not all(p.poll() is not None for *_, p in procs):
            # Each server's CPU seconds so far (its last reading before it exits).
            for role, i, _, p in procs:
                if role == "server" and p.poll() is None:
                    result.cpu[f"server{i}"] = process_cpu_seconds(p.pid) or result.cpu.get(f"server{i}", 0.0)
            if all("RESULT" in open(path).read() for _, path in workers):
                grace_end = time.time() + exit_grace
                while time.time() < grace_end and not all(p.poll() is not None for *_, p in procs):
                    time.sleep(0.2)
                for role, i, _, p in procs:
                    if p.poll() is None:
                        subprocess.run(netns_pids_kill(p.pid), check=False)
                        p.kill()
                        result.hung.append(f"{role}{i}")
                break
            time.sleep(0.2)
    for role, i, path, p in procs:
        rc = p.wait()
        text = open(path).read()
        result.logs[f"{role}{i}"] = text
        if rc != 0 and f"{role}{i}" not in result.hung:
            failed.append(f"{role}{i} exited {rc}: {path}\n{text[-2000:]}")
        for line in text.splitlines():
            m = re.match(r"RESULT rank=(\d+) (.*)", line)
            if m:
                result.results[int(m.group(1))] = m.group(2)
    if failed:
        raise RuntimeError("job failed:\n" + "\n".join(failed))
    return result


def band_bytes(host, band="1:10"):
    """Bytes the switch port toward `host` sent in a priority band (1:10 = precedence 6-7)."""
    out = sh("tc", "-s", "class", "show", "dev", f"{PREFIX}-{host}").stdout
    m = re.search(rf"class htb {band} .*?\n\s*Sent (\d+) bytes", out)
    return int(m.group(1)) if m else 0
