"""The optimizer as Module hands it to the kvstore: created with `param_idx2name`
and per-parameter multipliers (here no weight decay on the bias). The servers look
the multipliers up by MXNet key, so p3proxy must leave the keys whole."""
import os
import sys

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

kv = mx.kv.create("dist_sync")
names = {0: "fc1_weight", 1: "fc1_bias", 2: "fc2_weight"}
opt = mx.optimizer.create("sgd", learning_rate=0.1, momentum=0.9, wd=1e-3, param_idx2name=names)
opt.set_wd_mult({"fc1_bias": 0.0})
kv.set_optimizer(opt)
shapes = {0: (300, 300), 1: (300,), 2: (400, 200)}
rng = np.random.RandomState(1)
for k, s in shapes.items():
    kv.init(k, mx.nd.array(rng.uniform(-1, 1, s).astype(np.float32)))
outs = {k: mx.nd.zeros(s) for k, s in shapes.items()}
rng = np.random.RandomState(50 + kv.rank)
for step in range(3):
    for k in sorted(shapes):
        kv.pushpull(k, mx.nd.array(rng.uniform(-1, 1, shapes[k]).astype(np.float32)), out=outs[k])
    # One round at a time: the server counts requests, not workers, so a worker that
    # ran a round ahead would be merged into the other's round.
    mx.nd.waitall()
report(kv, [outs[k] for k in sorted(outs)])
