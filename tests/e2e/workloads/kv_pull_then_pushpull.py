"""A pull and then, without waiting for it, a pushpull of the same key while the
server is busy (here: its optimizer takes half a second on another key). Gluon's
first step does this right after its initial broadcast when the optimizer runs on
the workers. MXNet 1.9.1's ps-lite server takes queued requests from a heap in
which every message has priority 0, so it may serve the pushpull first; the pull
then returns the value after the round instead of before it. Program order says
the pull sees the value before the round: `pull_ok` on the RESULT line says
whether every pull did; the digest covers every output."""
import os
import sys
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402
from slow_optimizer import SlowSGD  # noqa: E402

BUSY = 9       # its update keeps the server's request thread busy
SMALL = 3      # pulled, then pushpulled
ROUNDS = int(os.environ.get("ROUNDS", "3"))

kv = mx.kv.create("dist_sync")
kv.set_optimizer(SlowSGD(slow_key=BUSY, seconds=0.5, learning_rate=0.1))
value = mx.nd.array(np.arange(1000, dtype=np.float32) * 0.5)
kv.init([SMALL, BUSY], [value, mx.nd.zeros((1000,))])
ok = True
outputs = []
for r in range(ROUNDS):
    busy = mx.nd.ones((1000,)) * (r + 1)
    grad = mx.nd.ones((1000,)) * (kv.rank + 1) * (r + 1)
    before = mx.nd.zeros((1000,))
    after = mx.nd.zeros((1000,))
    mx.nd.waitall()
    kv._barrier()
    kv.pushpull(BUSY, busy, out=busy)
    time.sleep(0.1)                     # the round of BUSY is in: its update runs
    kv.pull(SMALL, out=before)          # queued behind it
    kv.pushpull(SMALL, grad, out=after)  # sent before the pull's answer
    mx.nd.waitall()
    expected = value.asnumpy() if r == 0 else outputs[-1][1]
    ok = ok and np.array_equal(before.asnumpy(), expected)
    outputs.append((before.asnumpy(), after.asnumpy(), busy.asnumpy()))
report(kv, [a for triple in outputs for a in triple], f"pull_ok={ok}")
