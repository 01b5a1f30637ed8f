"""The operator files shipped in configs/: the Kubernetes manifest against the Kubernetes
API schema (the official client's generated models) and DESIGN.md section 2, the
Prometheus alert rules with promtool (syntax and unit tests), and the Grafana dashboard
against the metrics the proxy really exports. No testbed needed."""
import glob
import json
import os
import re
import subprocess

import pytest
import yaml
from kubernetes import client

import cluster

CONFIGS = os.path.join(cluster.ROOT, "configs")
MANIFESTS = sorted(glob.glob(os.path.join(CONFIGS, "k8s", "*.yaml")))
MODELS = {("v1", "ConfigMap"): "V1ConfigMap", ("v1", "Service"): "V1Service", ("batch/v1", "Job"): "V1Job",
          ("v1", "Pod"): "V1Pod", ("apps/v1", "Deployment"): "V1Deployment"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}


def schema_errors(value, type_name, path):
    """Unknown fields and wrong types, walking the client's generated model types
    (`list[T]`/`dict(str, T)` in older clients, `List[T]`/`Dict[str, T]` in newer ones)."""
    type_name = re.sub(r"^Dict\[(.*)\]$", r"dict(\1)", re.sub(r"^List\[", "list[", type_name))
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{path}.{k}")]
    if type_name == "object":  # IntOrString, quantities, free-form
        return []
    if type_name in PRIMITIVES:
        return [] if isinstance(value, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool)) \
            else [f"{path}: expected {type_name}, got {value!r}"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json = {j: a for a, j in model.attribute_map.items()}
    errors = []
    for k, v in value.items():
        if k not in by_json:
            errors.append(f"{path}.{k}: unknown field of {type_name}")
        else:
            errors += schema_errors(v, model.openapi_types[by_json[k]], f"{path}.{k}")
    return errors


def documents():
    for path in MANIFESTS:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield os.path.basename(path), doc


def test_the_kubernetes_manifests_match_the_api_schema():
    assert MANIFESTS, "configs/k8s/ holds the example"
    api = client.ApiClient()
    kinds = []
    for name, doc in documents():
        model = MODELS.get((doc.get("apiVersion"), doc.get("kind")))
        assert model, f"{name}: {doc.get('apiVersion')} {doc.get('kind')} is not a kind this check knows"
        assert schema_errors(doc, model, f"{name}:{doc['kind']}") == []
        # Required fields: the generated constructors refuse a missing one.
        api._ApiClient__deserialize(doc, model)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "Job", "Service"]


def test_a_field_the_schema_does_not_have_is_caught():
    doc = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "x", "image": "y", "restartpolicy": "Always"}]}}
    assert schema_errors(doc, "V1Pod", "pod") == ["pod.spec.containers[0].restartpolicy: unknown field of V1Container"]
    doc["spec"]["containers"][0] = {"name": "x", "ports": [{"containerPort": "9464"}]}
    assert schema_errors(doc, "V1Pod", "pod") == ["pod.spec.containers[0].ports[0].containerPort: expected int, got '9464'"]
    with pytest.raises(Exception, match="name"):  # a container without its required name
        client.ApiClient()._ApiClient__deserialize({"spec": {"containers": [{"image": "y"}]}}, "V1Pod")


def test_the_kubernetes_example_is_shaped_as_design_section_2_says(tmp_path):
    docs = {d["kind"]: d for _, d in documents()}
    pod = docs["Job"]["spec"]["template"]["spec"]
    sidecar, redirect = pod["initContainers"]
    # A native sidecar, started (startup probe) before the redirect is installed.
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert "restartPolicy" not in redirect
    # The proxy: non-root, no capability; the redirect exempts exactly its uid.
    uid = sidecar["securityContext"]["runAsUser"]
    assert uid != 0 and sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert redirect["command"][redirect["command"].index("--uid") + 1] == str(uid)
    assert "NET_ADMIN" in redirect["securityContext"]["capabilities"]["add"]
    # The liveness probe reaches metrics bound to the pod IP (the kubelet cannot reach 127.0.0.1).
    args = sidecar["args"]
    assert args[args.index("--metrics") + 1] == "$(POD_IP):9464"
    assert sidecar["livenessProbe"]["httpGet"]["port"] == "metrics"
    # Alive, then ready (serving, the redirect reaching it): the admin endpoints, not the
    # metrics text; startup cannot wait for the redirect, installed after it.
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/live"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/live"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
    # The skip lists: a port the redirect never captures, one relayed opaque at once.
    assert redirect["command"][redirect["command"].index("--skip-ports") + 1] == "443"
    assert {"name": "metrics", "containerPort": 9464} in sidecar["ports"]
    # The config the sidecar reads is valid, its uid exemption and CIDR match the redirect's,
    # and its journal is on the emptyDir.
    toml = docs["ConfigMap"]["data"]["p3proxy.toml"]
    (tmp_path / "p3proxy.toml").write_text(toml)
    check = subprocess.run([cluster.PROXY, "check", str(tmp_path / "p3proxy.toml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert re.search(rf"^uid = {uid}$", toml, re.M)
    cidr = redirect["command"][redirect["command"].index("--cidr") + 1]
    assert f'cluster_cidr = ["{cidr}"]' in toml
    assert re.search(r"^opaque_ports = \[22\]$", toml, re.M)
    journal_dir = os.path.dirname(re.search(r'^journal = "(.*)"$', toml, re.M).group(1))
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[journal_dir]]


def exported_metrics():
    """Metric names the proxy exports, from the table in src/metrics.rs."""
    src = open(os.path.join(cluster.ROOT, "src", "metrics.rs")).read()
    names = set(re.findall(r'^\s*[A-Z_]+ = "(p3proxy_[a-z_]+)", (?:Counter|Gauge|Histogram),', src, re.M))
    assert len(names) > 20, names
    return names


def referenced_metrics(text):
    names = set(re.findall(r"\b(p3proxy_[a-z_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n for n in names}


PROMETHEUS = os.path.join(CONFIGS, "prometheus")


def test_the_alert_rules_load_and_fire_on_what_they_should():
    for cmd in (["promtool", "check", "rules", "alerts.yml"], ["promtool", "test", "rules", "alerts_test.yml"],
                ["promtool", "check", "config", "prometheus.yml"]):
        out = subprocess.run(cmd, cwd=PROMETHEUS, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    rules = open(os.path.join(PROMETHEUS, "alerts.yml")).read()
    assert referenced_metrics(rules) <= exported_metrics(), referenced_metrics(rules) - exported_metrics()
    alerts = {r["alert"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"]}
    assert {"P3proxyRequestsLost", "P3proxySplitRefused", "P3proxyParseErrors", "P3proxyJobStalled"} <= alerts


def test_a_broken_alert_test_fails():
    """The unit tests can fail: the lost-requests alert does not fire on a healthy proxy."""
    broken = open(os.path.join(PROMETHEUS, "alerts_test.yml")).read().replace('values: "0 0 0 2 2 2"', 'values: "0 0 0 0 0 0"')
    path = os.path.join(PROMETHEUS, ".broken_test.yml")
    try:
        with open(path, "w") as f:
            f.write(broken)
        out = subprocess.run(["promtool", "test", "rules", ".broken_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True)
        assert out.returncode != 0 and "P3proxyRequestsLost" in out.stdout + out.stderr
    finally:
        os.remove(path)


def test_the_grafana_dashboard_uses_only_exported_metrics():
    dash = json.load(open(os.path.join(CONFIGS, "grafana", "p3proxy-dashboard.json")))
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = referenced_metrics("\n".join(exprs))
    assert used <= exported_metrics(), used - exported_metrics()
    # The metrics an operator needs first are on it.
    assert {"p3proxy_requests_lost_total", "p3proxy_keys_split_total", "p3proxy_queue_delay_seconds",
            "p3proxy_class_bytes_total", "p3proxy_split_refused_total", "p3proxy_iteration_seconds",
            "p3proxy_first_layer_wait_seconds", "p3proxy_oldest_request_age_seconds",
            "p3proxy_server_request_seconds"} <= used
    for e in exprs:
        assert e.count("(") == e.count(")"), e


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifests_are_plain_yaml_without_tabs(path):
    assert "\t" not in open(path).read()
