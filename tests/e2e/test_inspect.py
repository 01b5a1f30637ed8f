"""`p3proxy inspect --iface` on the testbed: it watches the server host's NIC while a real
MXNet job trains (Gluon Trainer, VGG-19's layer shapes at a tenth, 300 ms of emulated
compute), first direct and then through p3proxy, and its per-iteration period agrees
with the job's own step times; through p3proxy it decodes the tunnels (their slices)."""
import json
import os
import signal
import statistics
import subprocess
import time

import pytest

import cluster
from cluster import Proxies, Topology, metric, run_job

TOPO = Topology("h1", ["h2"], ["h3", "h4"])
JOB = os.path.join(cluster.ROOT, "bench", "emulated_job.py")
JOB_ARGS = ["--model", "vgg19", "--scale", "0.1", "--iters", "8", "--warmup", "1", "--compute-ms", "300"]
WARMUP = int(JOB_ARGS[JOB_ARGS.index("--warmup") + 1])
# The period inspect sees and the job's own step time (both medians) may differ by this.
TOLERANCE = 0.10


@pytest.fixture(scope="module", autouse=True)
def testbed():
    cluster.testbed_up(4)
    yield
    cluster.testbed_down()


def job_times(result):
    for name, text in result.logs.items():
        if name.startswith("worker"):
            for line in text.splitlines():
                if line.startswith("TIMES "):
                    return json.loads(line[6:])
    raise AssertionError(f"no TIMES line: {list(result.logs)}")


def inspected_job(tag, tmp_path, proxied):
    out, err = tmp_path / f"{tag}.json", tmp_path / f"{tag}.err"
    trace = tmp_path / f"{tag}.trace.json"
    inspect = subprocess.Popen(cluster.netns("h2") + [cluster.PROXY, "inspect", "--iface", "eth0", "--seconds", "300",
                                                     "--json", "--trace", str(trace)],
                               stdout=open(out, "w"), stderr=open(err, "w"))
    try:
        time.sleep(1.0)  # the raw socket is open
        live = proxies = None
        if proxied:
            # The testbed's rate: the proxies measure how long answers idle on the link.
            with Proxies(TOPO.hosts(), tag, ["--link-rate", "1gbit"]) as proxies:
                started = time.monotonic()
                result = run_job(TOPO, JOB, tag, timeout=300, args=JOB_ARGS)
                proxies.job_seconds = time.monotonic() - started
                live = proxies.metrics()
        else:
            result = run_job(TOPO, JOB, tag, timeout=300, args=JOB_ARGS)
    finally:
        inspect.send_signal(signal.SIGTERM)
        code = inspect.wait(timeout=60)
    assert code == 0, err.read_text()
    return json.loads(out.read_text()), job_times(result), json.loads(trace.read_text()), live, proxies


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "p3proxy"])
def test_inspect_sees_the_jobs_own_iteration_times(tmp_path, proxied):
    tag = "inspect-" + ("p3proxy" if proxied else "direct")
    ins, times, trace, live, proxies = inspected_job(tag, tmp_path, proxied)
    report = ins["report"]
    job_median = statistics.median(times)
    seen = report["summary"]["median_period_s"]
    print(f"{tag}: job median step {job_median:.3f} s, inspect median period {seen:.3f} s, "
          f"first-layer wait {report['summary']['median_first_layer_wait_s']:.3f} s, "
          f"estimate x{report['summary']['estimated_speedup']:.2f}")
    assert abs(seen - job_median) <= TOLERANCE * job_median, (seen, times)
    assert report["summary"]["iterations"] >= 6
    # Worker-server traffic decoded, and matched with its responses.
    pairs = {(p["from"], p["to"], p["tunnel"]): p for p in report["pairs"]}
    for w in ("W9", "W11"):
        assert pairs[(w, "S8", proxied)]["keys"] > 0, pairs.keys()
        assert pairs[("S8", w, proxied)]["messages"] > 0
    assert all(c["error"] is None for c in ins["connections"] if c["kind"] in ("zmtp", "tunnel")), ins["connections"]
    kinds = {c["kind"] for c in ins["connections"]}
    assert ("tunnel" in kinds) == proxied
    assert len(report["keys"]) == 38  # VGG-19's weights and biases
    # Through p3proxy the wire order is the proxies': the order they announced is used.
    assert report["summary"]["layer_order"] == ("p3proxy" if proxied else "learned")
    assert len(trace["traceEvents"]) > 0
    # Answer idle: part of the time the iteration's requests waited for their answers.
    assert all(0 <= it["answer_idle_s"] <= it["answer_wait_s"] for it in report["iterations"]), report["iterations"]
    assert 0 < report["summary"]["answer_idle_share"] <= 1
    if not proxied:
        return
    # The live proxies tell the same story: each worker host's proxy reports the job's
    # iteration time, and the first-layer wait inspect found on the server's NIC.
    wait = report["summary"]["median_first_layer_wait_s"]
    for h in TOPO.workers:
        period = metric(live[h], "p3proxy_iteration_seconds")
        live_wait = metric(live[h], "p3proxy_first_layer_wait_seconds")
        share = metric(live[h], "p3proxy_communication_share_ratio")
        print(f"{h}: live iteration {period:.3f} s, first-layer wait {live_wait:.3f} s, comm share {share:.2f}")
        assert abs(period - job_median) <= TOLERANCE * job_median, (h, period, times)
        assert abs(live_wait - wait) <= max(0.02, TOLERANCE * job_median), (h, live_wait, wait)
        assert 0 < share <= 1
        assert metric(live[h], "p3proxy_iteration_period_seconds_count") >= 5
        assert metric(live[h], "p3proxy_server_request_seconds_count", server="8") > 0
        assert metric(live[h], "p3proxy_oldest_request_age_seconds") < 5
    # The server's host runs no worker: no iteration of its own. Its proxy measured,
    # over windows of at least a second of requests waiting, how long no answer was on
    # the link; the end-of-run state holds the totals (cluster.Proxies read them).
    assert "p3proxy_iteration_seconds " not in live["h2"]
    assert "\np3proxy_answer_idle_ratio " in live["h2"], "the server's proxy reported a window"
    idle = metric(live["h2"], "p3proxy_answer_idle_ratio")
    answers = {h: proxies.states[h]["job"]["answers"] for h in TOPO.hosts()}
    print(f"h2: answers idle {idle:.0%} of the last window's waiting; over the run {proxies.answer_idle_share:.0%} "
          f"of {answers['h2']['waiting_s']:.1f} s; inspect on h2's NIC: {report['summary']['answer_idle_share']:.0%}")
    assert 0 <= idle <= 1
    # Requests waited at the server for part of every iteration (never longer than the job
    # ran): per iteration about what inspect measured on h2's NIC (requests in until
    # their answers out; the median over its iterations), two measurements of one thing.
    # (Not "most of the job": that was the workers out of step, a push waiting for the
    # other worker's; since the two proxies learn the same order, 20-30% of it.)
    inspected = statistics.median(i["answer_wait_s"] for i in report["iterations"] if i["answer_wait_s"] is not None)
    per_iteration = answers["h2"]["waiting_s"] / (len(times) + WARMUP + 1)
    print(f"h2: requests waited {per_iteration:.3f} s per iteration at the proxy, {inspected:.3f} s on the NIC (inspect)")
    assert 0.5 * inspected < per_iteration < 2 * inspected
    assert answers["h2"]["waiting_s"] < proxies.job_seconds
    assert 0 < answers["h2"]["idle_s"] < answers["h2"]["waiting_s"]
    # Only requests answered through a host's link wait: no server on the workers' hosts.
    for h in TOPO.workers:
        assert answers[h]["waiting_s"] == 0, (h, answers[h])
