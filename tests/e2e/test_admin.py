"""The admin surface of a real proxy on the testbed: `/ready` follows the redirect (the
proxy's own probe is captured only while the redirect is installed), and the log level
changes at run time through the real tracing filter."""
import json
import os
import time

import pytest

import cluster
from cluster import Proxies

HOST = "h1"
ADMIN = f"{cluster.ip(HOST)}:9464"


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(2)
    yield
    cluster.testbed_down()


def http(method, path, body=None):
    """(status, body) of one request to the proxy's admin port, from inside its host."""
    code = (
        "import urllib.request, urllib.error, sys\n"
        f"req = urllib.request.Request('http://{ADMIN}{path}', method={method!r}, data={body!r})\n"
        "try:\n"
        "    r = urllib.request.urlopen(req, timeout=5); print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode(), end='')\n")
    out = cluster.sh(*cluster.netns(HOST), cluster.PYTHON, "-c", code).stdout
    status, _, text = out.partition("\n")
    return int(status), text


def wait_status(path, want, seconds):
    deadline = time.time() + seconds
    while True:
        status, text = http("GET", path)
        if status == want:
            return time.time()
        assert time.time() < deadline, (path, status, text)
        time.sleep(0.2)


def test_ready_follows_the_redirect_and_the_log_level_changes_at_run_time():
    with Proxies([HOST], "admin", metrics_on_host=True) as proxies:
        # Proxies installs the redirect once the proxy listens: the probe gets captured.
        wait_status("/ready", 200, 10)
        state = json.loads(http("GET", "/debug/state")[1])
        assert state["redirect"] == {"probe": f"{cluster.ip(HOST)}:15309", "verified": True}, state
        assert http("GET", "/live") == (200, "live\n")
        # Without the redirect the job would bypass the proxy: not ready.
        cluster.sh(*cluster.netns(HOST), cluster.REDIRECT, "remove")
        removed = time.time()
        wait_status("/ready", 503, 10)
        assert json.loads(http("GET", "/debug/state")[1])["redirect"]["verified"] is False
        print(f"/ready went 503 {time.time() - removed:.1f} s after the redirect was removed")
        assert http("GET", "/live")[0] == 200
        cluster.sh(*cluster.netns(HOST), cluster.REDIRECT, "install", "--proxy-port", "15301",
                   "--cidr", cluster.CIDR)
        wait_status("/ready", 200, 10)
        # The log level, through the real tracing filter.
        assert http("GET", "/log-level") == (200, "info\n")
        assert http("PUT", "/log-level", b"p3proxy=debug,info") == (200, "p3proxy=debug,info\n")
        assert http("GET", "/log-level") == (200, "p3proxy=debug,info\n")
        status, text = http("PUT", "/log-level", b"p3proxy=[")
        assert status == 400 and text.startswith("invalid log filter"), text
        assert http("GET", "/log-level") == (200, "p3proxy=debug,info\n")
        log = os.path.join(cluster.LOGS, "admin-proxy-h1.log")
        deadline = time.time() + 10
        while "DEBUG" not in open(log).read():
            assert time.time() < deadline, "no debug line after the filter changed"
            time.sleep(0.2)
        assert proxies.procs[HOST].poll() is None
