"""2-bit gradient compression (capture run D): kSetGradientCompression and compressed
pushes with their dummy meta key, on a small and a big (split) key."""
import os
import sys

import mxnet as mx

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

kv = mx.kv.create("dist_sync")
kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
kv.init(0, mx.nd.zeros((64,)))
kv.init(1, mx.nd.zeros((1100, 1000)))
o = {0: mx.nd.zeros((64,)), 1: mx.nd.zeros((1100, 1000))}
for it in range(2):
    for k in (0, 1):
        kv.push(k, mx.nd.ones(o[k].shape) * (kv.rank + 1) * (it + 1))
        kv.pull(k, out=o[k])
mx.nd.waitall()
report(kv, [o[0], o[1]])
