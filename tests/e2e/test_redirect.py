"""scripts/redirect in a namespace of its own: install twice is harmless, remove
restores the nat table exactly, install refuses while nothing listens, and the
rules capture only what they should."""
import os
import subprocess

import pytest

import cluster

NS = "p3rd-test"


def ns(*cmd, check=True):
    return subprocess.run(["ip", "netns", "exec", NS, *cmd], check=check, capture_output=True, text=True)


def nat_rules():
    # Rules only (no counters, no comments/timestamps).
    return [l for l in ns("iptables-save", "-t", "nat").stdout.splitlines() if not l.startswith("#")]


@pytest.fixture()
def netns():
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    ns("ip", "link", "set", "lo", "up")
    # A rule of the user's own that must survive install and remove.
    ns("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")
    yield
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def test_install_twice_then_remove_restores_the_table(netns):
    before = nat_rules()
    listener = subprocess.Popen(["ip", "netns", "exec", NS, cluster.PYTHON, "-c",
                                 "import socket,time;s=socket.socket();s.bind(('127.0.0.1',15301));s.listen();time.sleep(30)"])
    try:
        for _ in range(50):
            if ns("ss", "-Hltn", "sport = :15301").stdout.strip():
                break
            import time
            time.sleep(0.1)
        for _ in range(2):
            out = ns(cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", "10.77.0.0/24")
            assert "redirect installed" in out.stdout
        rules = nat_rules()
        assert rules.count("-A OUTPUT -p tcp -j P3PROXY_OUTPUT") == 1, rules
        assert "-A P3PROXY_OUTPUT -m mark --mark 0x1000/0x1000 -j RETURN" in rules
        assert "-A P3PROXY_OUTPUT -p tcp -m multiport --dports 15301,15302,9464 -j RETURN" in rules
        assert "-A P3PROXY_OUTPUT -d 10.77.0.0/24 -p tcp -m tcp --sport 1024:65535 --dport 1024:65535 -j REDIRECT --to-ports 15301" in rules
        assert ns(cluster.REDIRECT, "status").returncode == 0
        ns(cluster.REDIRECT, "remove")
        assert nat_rules() == before
        assert ns(cluster.REDIRECT, "status", check=False).returncode == 3
        ns(cluster.REDIRECT, "remove")  # removing twice is harmless too
        assert nat_rules() == before
    finally:
        listener.kill()


def test_install_refuses_while_nothing_listens(netns):
    before = nat_rules()
    out = ns(cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", "10.77.0.0/24", check=False)
    assert out.returncode == 2
    assert "nothing listens on port 15301: start p3proxy first" in out.stderr
    assert nat_rules() == before


def test_bad_arguments_are_refused(netns):
    for args, msg in [
        ([], "--proxy-port PORT is required"),
        (["--proxy-port", "15301"], "--cidr CIDR is required"),
        (["--proxy-port", "15301", "--cidr", "10.0.0.0"], "bad CIDR '10.0.0.0'"),
        (["--proxy-port", "99999", "--cidr", "10.0.0.0/8"], "--proxy-port PORT is required (1-65535)"),
        (["--proxy-port", "15301", "--cidr", "10.0.0.0/8", "--bogus"], "unknown option --bogus"),
        (["--proxy-port", "15301", "--cidr", "10.0.0.0/8", "--skip-ports", "22,ssh"], "bad port 'ssh'"),
        (["--proxy-port", "15301", "--cidr", "10.0.0.0/8", "--skip-cidrs", "10.1.0.0"], "bad CIDR '10.1.0.0' in --skip-cidrs"),
    ]:
        out = ns(cluster.REDIRECT, "install", *args, check=False)
        assert out.returncode == 2 and msg in out.stderr, (args, out.stderr)


def test_uid_exemption(netns):
    ns(cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", "10.77.0.0/24", "--uid", "1000", "--force")
    rules = nat_rules()
    assert "-A P3PROXY_OUTPUT -m owner --uid-owner 1000 -j RETURN" in rules
    assert not any("--mark" in r for r in rules)
    ns(cluster.REDIRECT, "remove")


def test_skip_lists(netns):
    """Ports and addresses the redirect never captures, however many ports (multiport
    takes 15 per rule)."""
    ports = ",".join(str(p) for p in range(5000, 5012)) + ",6000:6010"
    ns(cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", "10.77.0.0/24", "--force",
       "--skip-ports", ports, "--skip-cidrs", "10.77.0.128/25,10.77.0.5/32")
    rules = nat_rules()
    returned = [r for r in rules if "--dports" in r and r.endswith("-j RETURN")]
    listed = ",".join(r.split("--dports ")[1].split(" ")[0] for r in returned)
    assert listed.split(",") == ["15301", "15302", "9464", *ports.split(",")], rules
    assert "-A P3PROXY_OUTPUT -d 10.77.0.128/25 -j RETURN" in rules
    assert "-A P3PROXY_OUTPUT -d 10.77.0.5/32 -j RETURN" in rules
    # Skips come before the REDIRECT.
    first_redirect = next(i for i, r in enumerate(rules) if "REDIRECT" in r)
    assert all(rules.index(r) < first_redirect for r in returned)
    assert rules.index("-A P3PROXY_OUTPUT -d 10.77.0.5/32 -j RETURN") < first_redirect
    ns(cluster.REDIRECT, "remove")


def test_mark_mask(netns):
    """Only the mask's bits are compared: a mark kube-proxy ORs in (0x4000) still exempts."""
    ns(cluster.REDIRECT, "install", "--proxy-port", "15301", "--cidr", "10.77.0.0/24", "--mark", "0x1000", "--mask", "0x3000", "--force")
    assert "-A P3PROXY_OUTPUT -m mark --mark 0x1000/0x3000 -j RETURN" in nat_rules()
    ns(cluster.REDIRECT, "remove")


def test_remove_also_removes_a_dead_proxys_inbound_chain(netns):
    before = nat_rules()
    ns("iptables", "-t", "nat", "-N", "P3PROXY_INBOUND")
    ns("iptables", "-t", "nat", "-A", "P3PROXY_INBOUND", "-p", "tcp", "--dport", "4000", "-j", "REDIRECT", "--to-ports", "15303")
    ns("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "P3PROXY_INBOUND")
    ns(cluster.REDIRECT, "remove")
    assert nat_rules() == before
