"""A request for a key that reaches the server before the key's init is served. The
server takes the first push of a key as its init (hand-written kvstore code may
initialize that way instead of `kv.init`): rank 0 pushes a new key and, without
waiting for it, meets the other worker at a barrier; that worker then pulls the key.
While the server is busy (its optimizer takes half a second on another key) both wait
in its queue, a heap in which every message has priority 0, and the pull may be
served first: the server stops with `init N first`. Program order says the pull sees
the pushed value: `pull_ok` on the RESULT line says whether every pull did; the digest
covers every output."""
import os
import sys
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402
from slow_optimizer import SlowSGD  # noqa: E402

BUSY = 9       # its update keeps the server's request thread busy
FIRST = 21     # round r initializes key FIRST + 2r by pushing it (BUSY's server of 1 or 2)
ROUNDS = int(os.environ.get("ROUNDS", "3"))

kv = mx.kv.create("dist_sync")
kv.set_optimizer(SlowSGD(slow_key=BUSY, seconds=0.5, learning_rate=0.1))
kv.init(BUSY, mx.nd.zeros((1000,)))
ok = True
outputs = []
for r in range(ROUNDS):
    key = FIRST + 2 * r
    value = mx.nd.array(np.arange(1000, dtype=np.float32) * (r + 1))
    busy = mx.nd.ones((1000,)) * (r + 1)
    pulled = mx.nd.zeros((1000,))
    mx.nd.waitall()
    kv._barrier()
    kv.pushpull(BUSY, busy, out=busy)
    time.sleep(0.1)                     # the round of BUSY is in: its update runs
    if kv.rank == 0:
        kv.push(key, value)             # the init, queued behind the update
    kv._barrier()
    if kv.rank != 0:
        kv.pull(key, out=pulled)        # queued behind it too
    mx.nd.waitall()
    kv._barrier()
    if kv.rank == 0:
        kv.pull(key, out=pulled)
    mx.nd.waitall()
    ok = ok and np.array_equal(pulled.asnumpy(), value.asnumpy())
    outputs.append((pulled.asnumpy(), busy.asnumpy()))
report(kv, [a for pair in outputs for a in pair], f"pull_ok={ok}")
