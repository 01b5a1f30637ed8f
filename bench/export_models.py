"""Writes the models the simulator uses (bench/profiles/NAME.json) from the same traces
the training benchmark runs (bench/models.py): layers in forward order with their
share of the FLOPs, and each pushed parameter's key (Gluon's, name-sorted) and bytes
(float32, after scaling). Needs MXNet; the files are committed so that the simulator
does not.

    .venv/bin/python bench/export_models.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")

for name, scale in [("vgg19", 0.1), ("resnet50_v1", 0.5)]:
    layers, _ = models.layers(name, scale)
    total = sum(l.flops for l in layers) or 1.0
    doc = {
        "model": name,
        "scale": scale,
        "layers": [
            {"name": l.name, "flops_share": l.flops / total,
             "params": [{"key": p.key, "bytes": 4 * p.numel} for p in l.params if p.pushed]}
            for l in layers
        ],
    }
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{path}: {len(doc['layers'])} layers, {sum(len(l['params']) for l in doc['layers'])} keys")
