"""Raw kvstore push/pull, as hand-written kvstore code does: small keys, a key above
MXNET_KVSTORE_BIGARRAY_BOUND (split over every server), random values per rank."""
import os
import sys

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

kv = mx.kv.create("dist_sync")
shapes = {0: (64, 3, 3, 3), 1: (1100, 1000), 3: (1000,), 4: (257,), 9: (300, 300)}
rng = np.random.RandomState(1234)
for k, s in shapes.items():
    kv.init(k, mx.nd.array(rng.uniform(-1, 1, s).astype(np.float32)))
outs = {k: mx.nd.zeros(s) for k, s in shapes.items()}
rng = np.random.RandomState(100 + kv.rank)
for it in range(int(os.environ.get("NIT", "3"))):
    for k in sorted(shapes, reverse=True):
        kv.push(k, mx.nd.array(rng.uniform(-1, 1, shapes[k]).astype(np.float32)))
        kv.pull(k, out=outs[k])
    for o in outs.values():
        o.wait_to_read()
report(kv, [outs[k] for k in sorted(outs)])
