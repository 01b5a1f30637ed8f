"""Security on the testbed (DESIGN.md section 2): the proxy is never an open relay and
never a way to a loopback-only service, forged registrations are not learned, the
metrics endpoint is not reachable from other hosts, and the redirect exempts the proxy's
own sockets before anything is redirected."""
import json
import os
import re
import subprocess
import time

import pytest

import cluster
from cluster import Proxies, metric

LOADGEN = os.path.join(os.path.dirname(cluster.PROXY), "p3proxy-loadgen")
H2 = cluster.ip("h2")


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(3)
    yield
    cluster.testbed_down()


def loadgen(host, *args, timeout=30):
    out = cluster.sh(*cluster.netns(host), LOADGEN, *args, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def background(host, *cmd):
    return subprocess.Popen(cluster.netns(host) + list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


ECHO = ("import socket,sys,threading\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((sys.argv[1],int(sys.argv[2])));s.listen()\n"
        "n=0\n"
        "while True:\n"
        " c,_=s.accept();n+=1;print('accepted',n,flush=True);c.close()\n")


def test_no_open_relay_no_loopback_service_no_forged_registration():
    procs = []
    try:
        # On h2: a loopback-only service, a real ps-lite ROUTER on the host address (the
        # one legitimate node), and ROUTERs standing in for the scheduler.
        loopback_service = background("h2", cluster.PYTHON, "-c", ECHO, "127.0.0.1", "7000")
        procs.append(loopback_service)
        procs.append(background("h2", LOADGEN, "recv", "--listen", f"{H2}:7001"))
        for port in (9091, 9092, 9093, 9094):
            procs.append(background("h2", LOADGEN, "recv", "--listen", f"{H2}:{port}"))
        time.sleep(0.5)
        with Proxies(["h2"], "security") as proxies:
            # Registrations through h2's proxy (its redirect captures them): a loopback
            # address, the proxy's own tunnel port, a port nothing listens on, and the
            # real node.
            for port, (host, node_port) in zip((9091, 9092, 9093, 9094),
                                               [("127.0.0.1", 7000), (H2, 15302), (H2, 7002), (H2, 7001)]):
                loadgen("h2", "register", "--to", f"{H2}:{port}", "--host", host, "--port", str(node_port))
            time.sleep(0.3)
            ask = lambda target: loadgen("h3", "tunnel", "--to", f"{H2}:15302", "--target", target)["outcome"]  # noqa: E731
            assert ask(f"{H2}:7001") == "Admitted", "the registered node is reachable"
            for target in ("127.0.0.1:7000", f"{H2}:7002", f"{H2}:15302", f"{H2}:9464", f"{cluster.ip('h3')}:22", f"{cluster.ip('h3')}:7001"):
                assert ask(target) == "RefusedByPolicy", target
            # Garbage at the tunnel port is not relayed anywhere.
            out = cluster.sh(*cluster.netns("h3"), cluster.PYTHON, "-c",
                             f"import socket;s=socket.create_connection(('{H2}',15302),3);s.sendall(b'CONNECT 127.0.0.1:7000 HTTP/1.1\\r\\n\\r\\n');"
                             "s.settimeout(5)\ntry: print(repr(s.recv(100)))\nexcept ConnectionResetError: print('reset')")
            assert out.stdout.strip() in ("b''", "reset"), out
            # The metrics endpoint listens on h2's loopback only.
            refused = cluster.sh(*cluster.netns("h3"), cluster.PYTHON, "-c",
                                 f"import socket\ntry: socket.create_connection(('{H2}',9464),3); print('open')\nexcept OSError: print('refused')")
            assert refused.stdout.strip() == "refused"
            text = proxies.metrics()["h2"]
            # The redirect: the proxy's own sockets are exempt before anything is redirected.
            rules = cluster.sh(*cluster.netns("h2"), "iptables", "-t", "nat", "-S", "P3PROXY_OUTPUT").stdout.splitlines()
            exempt = next(i for i, r in enumerate(rules) if "--mark 0x1000/0x1000 -j RETURN" in r)
            first_redirect = next(i for i, r in enumerate(rules) if "REDIRECT" in r)
            assert exempt < first_redirect, rules
        log = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{cluster.LOGS}/security-proxy-h2.log").read())
    finally:
        for p in procs:
            p.kill()
    loopback_service.wait(5)
    assert "accepted" not in loopback_service.stdout.read(), "the loopback-only service was never reached"
    assert metric(text, "p3proxy_connections_refused_total", reason="loopback_target") == 1
    assert metric(text, "p3proxy_connections_refused_total", reason="unregistered_target") == 2
    assert metric(text, "p3proxy_connections_refused_total", reason="own_port") == 1
    assert metric(text, "p3proxy_connections_refused_total", reason="non_local_target") == 2
    assert metric(text, "p3proxy_connections_refused_total", reason="bad_preamble") == 1
    assert "registration ignored: nothing listens there" in log
    assert f"local node registered: tunnels to it are admitted addr={H2}:7001" in log
    assert log.count("local node registered") == 1, "only the real node was learned"


def test_the_proxy_runs_as_an_unprivileged_user_with_no_capability():
    """DESIGN.md section 2: with the uid exemption the proxy needs no capability at all."""
    from cluster import Topology, run_job

    topo = Topology("h1", ["h2"], ["h3", "h1"])
    os.makedirs(cluster.LOGS, exist_ok=True)
    config = os.path.join(cluster.LOGS, "unprivileged.toml")  # readable by the proxy's user
    with open(config, "w") as f:
        f.write(f'cluster_cidr = ["{cluster.CIDR}"]\n\n[exempt]\nuid = 65534\n')
    os.chmod(config, 0o644)
    direct = run_job(topo, "kv_raw.py", "unpriv-direct", {"NIT": "3"})
    with Proxies(["h1", "h2", "h3"], "unpriv", ["--config", str(config)], as_uid=65534) as proxies:
        for h, p in proxies.procs.items():
            status = open(f"/proc/{p.pid}/status").read()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            # setpriv execs the proxy in place: this is the proxy itself.
            assert fields["Uid"].split()[:2] == ["65534", "65534"], (h, fields["Uid"])
            assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0, (h, fields["CapEff"])
        proxied = run_job(topo, "kv_raw.py", "unpriv-proxied", {"NIT": "3"})
        text = proxies.metrics()
    assert proxied.results == direct.results
    assert metric(text["h3"], "p3proxy_connections_total", route="tunnel") > 0, "through the tunnels"
    assert sum(metric(t, "p3proxy_keys_split_total") for t in text.values()) > 0, "and split in front of the server"
