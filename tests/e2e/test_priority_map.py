"""scripts/priority-map: the map it writes for real model-zoo models follows the model's
own layer order (checked against bench/models.py's trace: parameters grouped by block, in
forward order), keys are Trainer's, the three inputs agree, and the proxy loads the map
and refuses a wrong-sized one with a clear error."""
import os
import subprocess
import sys

import pytest

import cluster

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(cluster.ROOT, "scripts", "priority-map")
sys.path.insert(0, os.path.join(cluster.ROOT, "bench"))
import models  # noqa: E402


def write_map(tmp_path, *args):
    out = tmp_path / "map.toml"
    r = subprocess.run([SCRIPT, *args, "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return out, read_map(out)


def read_map(path):
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("model", ["vgg19", "resnet50_v1"])
def test_map_follows_the_models_layer_order(tmp_path, model):
    path, m = write_map(tmp_path, "--model", model)
    layers, params = models.layers(model)
    assert m["keys"] == len(params)
    prio = m["priority"]
    # Every parameter of a layer shares its priority; layers in forward order have
    # strictly increasing priorities; the first layer is 1.
    per_layer = [sorted({prio[p.key] for p in layer.params}) for layer in layers]
    assert all(len(ps) == 1 for ps in per_layer), per_layer
    flat = [ps[0] for ps in per_layer]
    assert flat == sorted(flat) and len(set(flat)) == len(flat), flat
    assert flat[0] == 1
    if model == "vgg19":
        # Gluon's name sort puts conv10-15 at keys 2-13, before conv1: the map undoes it.
        names = sorted(p.name for p in params)
        assert names[2] == "vgg0_conv10_bias" and prio[2] > prio[names.index("vgg0_conv1_weight")]
    else:
        # The classifier gets keys 5-6 from the name sort, and the last priority here.
        dense = [p.key for p in params if "dense" in p.name]
        assert all(prio[k] == max(prio) for k in dense)
    # The proxy loads it.
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'cluster_cidr = ["10.0.0.0/8"]\npriority = "map"\npriority_map = "{path}"\n[exempt]\nmark = 0x1000\n')
    r = subprocess.run([cluster.PROXY, "check", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_symbol_and_builder_inputs_agree_with_the_zoo_name(tmp_path):
    import mxnet as mx
    from mxnet.gluon.model_zoo import vision

    _, by_name = write_map(tmp_path, "--model", "resnet18_v1")
    sym_file = tmp_path / "net-symbol.json"
    vision.get_model("resnet18_v1")(mx.sym.var("data")).save(str(sym_file))
    _, by_symbol = write_map(tmp_path, "--symbol", str(sym_file))
    assert by_symbol["priority"] == by_name["priority"]
    (tmp_path / "mynet.py").write_text("from mxnet.gluon.model_zoo import vision\ndef build():\n    return vision.get_model('resnet18_v1')\n")
    _, by_builder = write_map(tmp_path, "--builder", "mynet:build")
    assert by_builder["priority"] == by_name["priority"]


def test_bad_inputs_and_a_wrong_sized_map_are_refused(tmp_path):
    r = subprocess.run([SCRIPT, "--model", "no_such_model", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and "no_such_model" in r.stderr
    r = subprocess.run([SCRIPT, "--symbol", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and "no such file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("keys = 38\npriority = [1, 2, 3]\n")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'cluster_cidr = ["10.0.0.0/8"]\npriority = "map"\npriority_map = "{bad}"\n[exempt]\nmark = 0x1000\n')
    r = subprocess.run([cluster.PROXY, "check", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid `priority_map`" in r.stderr and "declares 38 keys but lists 3 priorities" in r.stderr, r.stderr
