"""A request no split layout can serve: key 9 is initialized dense (and split by
p3proxy), then pushed row-sparse. With splitting on, the proxy must stop the job
loudly rather than let the server take it."""
import os
import sys

import mxnet as mx

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

kv = mx.kv.create("dist_sync")
kv.init(9, mx.nd.ones((300, 300)))
out = mx.nd.zeros((300, 300))
kv.push(9, mx.nd.ones((300, 300)))
kv.pull(9, out=out)
out.wait_to_read()
print("dense round done", flush=True)
g = mx.nd.sparse.row_sparse_array((mx.nd.ones((2, 300)), mx.nd.array([1, 6], dtype="int64")), shape=(300, 300))
kv.push(9, g)
rs = mx.nd.sparse.zeros("row_sparse", (300, 300))
kv.row_sparse_pull(9, out=rs, row_ids=mx.nd.array([1, 6], dtype="int64"))
mx.nd.waitall()
report(kv, [rs.data])
