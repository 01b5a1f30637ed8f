"""One node of the benchmark job. Workers run an emulated training loop over the real
parameter list of a model and send exactly what gluon.Trainer sends with its defaults
(DESIGN.md section 3); compute is emulated by sleeping.

Per iteration (compute total C, a third forward, two thirds backward, split by FLOPs):
  forward:  for each layer in forward order: wait for its weights, sleep its share;
  backward: for each layer from the last: sleep its share, write a fresh gradient into
            each of its parameters' gradient arrays, issue their pushpull (priority=-key).
With the optimizer on the workers (MXNET_UPDATE_ON_KVSTORE=0, or a kvstore that cannot
run it, like dist_p3_sync), pushpull returns summed gradients and the worker updates.
`--api raw`: push then pull per key, no optimizer anywhere (hand-written kvstore code).

Prints `RESULT rank=R sha=...` (digest of every final weight) and `TIMES [...]`
(iteration start-to-start times in seconds after warm-up) and, with --timeline,
`TIMELINE {...}` (per key: pushpull issue and completion times of one iteration).
"""
import argparse
import hashlib
import json
import os
import sys
import threading
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

BATCH = 32

p = argparse.ArgumentParser()
p.add_argument("--model", default="vgg19")
p.add_argument("--scale", type=float, default=0.1)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--compute-ms", type=float, default=300.0)
p.add_argument("--api", choices=["gluon", "raw"], default="gluon")
p.add_argument("--timeline", action="store_true")
args = p.parse_args()

kv = mx.kv.create(os.environ.get("P3_KVSTORE", "dist_sync"))
layers, params = models.layers(args.model, args.scale)
total_flops = sum(l.flops for l in layers) or 1.0
fwd = [args.compute_ms / 1000 / 3 * l.flops / total_flops for l in layers]
bwd = [2 * f for f in fwd]

# What Trainer does: the optimizer goes to the servers unless told otherwise or the
# kvstore cannot run it.
update_on_kvstore = (
    args.api == "gluon"
    and os.environ.get("MXNET_UPDATE_ON_KVSTORE", "1") != "0"
    and kv.is_capable("optimizer")
)
optimizer = mx.optimizer.create("sgd", learning_rate=0.01, momentum=0.9, wd=1e-4, rescale_grad=1.0 / BATCH)
if update_on_kvstore:
    kv.set_optimizer(optimizer)
updater = None if update_on_kvstore or args.api == "raw" else mx.optimizer.get_updater(optimizer)

weights = {p.key: mx.nd.full((p.numel,), 0.01 * (p.key % 7 + 1)) for p in params}
grads = {p.key: mx.nd.zeros((p.numel,)) for p in params if p.pushed}
# Trainer's broadcast: init (rank 0 pushes), then pull.
for p_ in params:
    kv.init(p_.key, weights[p_.key])
for p_ in params:
    kv.pull(p_.key, out=weights[p_.key], priority=-p_.key)
mx.nd.waitall()

times, starts, timeline = [], [], {}
timeline_iter = args.warmup + args.iters // 2
# One iteration more than measured: its start ends the last measured one.
for it in range(args.warmup + args.iters + 1):
    t0 = time.perf_counter()
    starts.append(t0)
    for layer, f in zip(layers, fwd):
        for p_ in layer.params:
            weights[p_.key].wait_to_read()
        time.sleep(f)
    issued = {}
    for layer, b in zip(reversed(layers), reversed(bwd)):
        time.sleep(b)
        for p_ in layer.params:
            if not p_.pushed:
                continue
            k = p_.key
            # A fresh gradient, the same on every run: deterministic results.
            grads[k][:] = 0.001 * (kv.rank + 1) * ((it + k) % 5 + 1)
            issued[k] = time.perf_counter() - t0
            if args.api == "raw":
                kv.push(k, grads[k], priority=-k)
                kv.pull(k, out=weights[k], priority=-k)
            elif update_on_kvstore:
                kv.pushpull(k, grads[k], out=weights[k], priority=-k)
            else:
                kv.pushpull(k, grads[k], priority=-k)
    if updater is not None:
        # Trainer.step: allreduce, then the update on the worker.
        for k in sorted(grads):
            updater(k, grads[k], weights[k])
    if args.timeline and it == timeline_iter:
        done = {}

        def wait(k, arr=None):
            (arr if arr is not None else weights[k]).wait_to_read()
            done[k] = time.perf_counter() - t0

        waiters = [threading.Thread(target=wait, args=(k, weights[k] if update_on_kvstore or args.api == "raw" else grads[k])) for k in grads]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
        timeline = {str(k): [issued[k], done[k]] for k in grads}
mx.nd.waitall()
times = [b - a for a, b in zip(starts[args.warmup:-1], starts[args.warmup + 1:])]

h = hashlib.sha256()
for k in sorted(weights):
    h.update(np.ascontiguousarray(weights[k].asnumpy()).tobytes())
print(f"RESULT rank={kv.rank} sha={h.hexdigest()} update_on_kvstore={update_on_kvstore}", flush=True)
print("TIMES " + json.dumps(times), flush=True)
if args.timeline:
    order = [p_.key for l in layers for p_ in l.params if p_.pushed]
    print("TIMELINE " + json.dumps({"keys_forward_order": order, "layers": [[l.name, [p_.key for p_ in l.params if p_.pushed]] for l in layers], "spans": timeline}), flush=True)
