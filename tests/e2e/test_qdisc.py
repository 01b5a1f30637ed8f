"""scripts/qdisc on a veth inside namespaces of its own: the bands exist with strict
priorities, packets are classified by their DSCP (a CS6 datagram lands in the top band,
a CS0 one in the last), install refuses a foreign root qdisc, remove restores the default."""
import subprocess

import pytest

import cluster

A, B = "p3qd-a", "p3qd-b"


def ns(name, *cmd, check=True):
    return subprocess.run(["ip", "netns", "exec", name, *cmd], check=check, capture_output=True, text=True)


@pytest.fixture()
def pair():
    for n in (A, B):
        subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "netns", "add", n], check=True)
    subprocess.run(["ip", "link", "add", "qd0", "netns", A, "type", "veth", "peer", "name", "qd1", "netns", B], check=True)
    ns(A, "ip", "addr", "add", "10.79.0.1/24", "dev", "qd0")
    ns(B, "ip", "addr", "add", "10.79.0.2/24", "dev", "qd1")
    ns(A, "ip", "link", "set", "qd0", "up")
    ns(B, "ip", "link", "set", "qd1", "up")
    yield
    for n in (A, B):
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def band_packets(band):
    out = ns(A, "tc", "-s", "class", "show", "dev", "qd0", "classid", band).stdout
    return int(out.split("Sent ")[1].split(" pkt")[0].split()[-1])


def send_udp(tos, n=5):
    code = ("import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            f"s.setsockopt(socket.IPPROTO_IP,socket.IP_TOS,{tos})\n"
            f"for _ in range({n}): s.sendto(b'x'*100,('10.79.0.2',9))")
    ns(A, cluster.PYTHON, "-c", code)


def test_install_classify_remove(pair):
    default = ns(A, "tc", "qdisc", "show", "dev", "qd0", "root").stdout
    out = ns(A, cluster.ROOT + "/scripts/qdisc", "install", "--dev", "qd0", "--rate", "1gbit")
    assert "qdisc installed on qd0" in out.stdout
    ns(A, cluster.ROOT + "/scripts/qdisc", "install", "--dev", "qd0", "--rate", "1gbit")  # twice is harmless
    classes = ns(A, "tc", "class", "show", "dev", "qd0").stdout
    for band, prio in (("1:10", 0), ("1:20", 1), ("1:30", 2), ("1:40", 3)):
        assert f"class htb {band} parent 1:1 leaf" in classes and f"prio {prio} rate 8Kbit" in classes, classes
    before = {b: band_packets(b) for b in ("1:10", "1:20", "1:30", "1:40")}
    send_udp(0xC0)  # CS6
    send_udp(0x80)  # CS4
    send_udp(0x00)  # CS0
    after = {b: band_packets(b) for b in before}
    assert after["1:10"] - before["1:10"] >= 5
    assert after["1:20"] - before["1:20"] >= 5
    assert after["1:30"] - before["1:30"] == 0
    assert after["1:40"] - before["1:40"] >= 5
    assert ns(A, cluster.ROOT + "/scripts/qdisc", "status", "--dev", "qd0").returncode == 0
    ns(A, cluster.ROOT + "/scripts/qdisc", "remove", "--dev", "qd0")
    assert ns(A, "tc", "qdisc", "show", "dev", "qd0", "root").stdout == default
    assert ns(A, cluster.ROOT + "/scripts/qdisc", "status", "--dev", "qd0", check=False).returncode == 3


def test_refuses_a_foreign_root_qdisc(pair):
    ns(A, "tc", "qdisc", "replace", "dev", "qd0", "root", "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms")
    out = ns(A, cluster.ROOT + "/scripts/qdisc", "install", "--dev", "qd0", "--rate", "1gbit", check=False)
    assert out.returncode == 2 and "already has a root qdisc" in out.stderr
    assert "tbf" in ns(A, "tc", "qdisc", "show", "dev", "qd0", "root").stdout
    out = ns(A, cluster.ROOT + "/scripts/qdisc", "install", "--dev", "nosuch", "--rate", "1gbit", check=False)
    assert out.returncode == 2 and "no device 'nosuch'" in out.stderr
