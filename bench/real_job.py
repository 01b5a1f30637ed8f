"""One node of the benchmark's real-model mode (`scripts/bench --real`): a tiny real Gluon
model trained with gluon.Trainer and its defaults on the dist_sync kvstore (real forward
and backward on the CPU, the optimizer on the servers unless MXNET_UPDATE_ON_KVSTORE=0 or
the kvstore cannot run it). Prints the same RESULT and TIMES lines as emulated_job.py."""
import argparse
import hashlib
import json
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="tiny")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--batch", type=int, default=32)
args, _ = p.parse_known_args()

mx.random.seed(42)
np.random.seed(42)
kv = mx.kv.create(os.environ.get("P3_KVSTORE", "dist_sync"))
net, data_shape = models.build(args.model)
net.initialize(mx.init.Xavier())
net.hybridize()
trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9, "wd": 1e-4}, kvstore=kv)
loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
rng = np.random.RandomState(7 + kv.rank)
shape = (args.batch,) + tuple(data_shape[1:])
starts = []
for it in range(args.warmup + args.iters + 1):
    starts.append(time.perf_counter())
    x = mx.nd.array(rng.uniform(0, 1, shape).astype(np.float32))
    y = mx.nd.array(rng.randint(0, 10, (args.batch,)).astype(np.float32))
    with autograd.record():
        loss = loss_fn(net(x), y)
    loss.backward()
    trainer.step(args.batch)
    loss.wait_to_read()
mx.nd.waitall()
times = [b - a for a, b in zip(starts[args.warmup:-1], starts[args.warmup + 1:])]
params = net.collect_params()
h = hashlib.sha256()
for n in sorted(params.keys()):
    h.update(np.ascontiguousarray(params[n].data().asnumpy()).tobytes())
print(f"RESULT rank={kv.rank} sha={h.hexdigest()} update_on_kvstore={trainer._update_on_kvstore}", flush=True)
print("TIMES " + json.dumps(times), flush=True)
