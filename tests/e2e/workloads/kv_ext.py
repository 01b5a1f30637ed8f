"""The protocol's corners (capture run C): server-side optimizer with multi-precision,
fp16 keys, pushpull, row-sparse push and pull. Run with PS_HEARTBEAT_INTERVAL=1."""
import os
import sys
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

kv = mx.kv.create("dist_sync")
kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.1, multi_precision=True))
kv.init(0, mx.nd.ones((16,)) * 0.5)
kv.init(2, mx.nd.ones((16,)) * 0.5)
kv.init(5, mx.nd.ones((8,), dtype="float16"))
kv.init(7, mx.nd.ones((10, 4)).tostype("row_sparse"))
# An fp16 key big enough to be split (200 KB: a 160,000-byte slice and a 40,000-byte one).
kv.init(11, mx.nd.array(np.linspace(-1, 1, 100000).reshape(200, 500), dtype="float16"))
o11 = mx.nd.zeros((200, 500), dtype="float16")
o0 = mx.nd.zeros((16,))
o5 = mx.nd.zeros((8,), dtype="float16")
pp = mx.nd.zeros((16,))
kv.push(0, mx.nd.ones((16,)) * (kv.rank + 1))
kv.pull(0, out=o0)
kv.push(5, mx.nd.ones((8,), dtype="float16"))
kv.pull(5, out=o5)
kv.pushpull(2, mx.nd.ones((16,)) * (kv.rank + 2), out=pp)
for step in range(2):
    g11 = mx.nd.array(np.random.RandomState(kv.rank * 10 + step).uniform(-1, 1, (200, 500)), dtype="float16")
    kv.pushpull(11, g11, out=o11)
    o11.wait_to_read()  # one round at a time (the server counts requests, not workers)
g = mx.nd.sparse.row_sparse_array((mx.nd.ones((2, 4)) * (kv.rank + 1), mx.nd.array([1, 6], dtype="int64")), shape=(10, 4))
kv.push(7, g)
rs = mx.nd.sparse.zeros("row_sparse", (10, 4))
kv.row_sparse_pull(7, out=rs, row_ids=mx.nd.array([1, 2, 6], dtype="int64"))
mx.nd.waitall()
time.sleep(2.5)  # a few heartbeats go out
report(kv, [o0, o5, pp, rs.data, rs.indices, o11])
