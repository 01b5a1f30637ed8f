"""A real Gluon model trained a few steps with Gluon's defaults on a dist_sync
kvstore: the optimizer runs on the servers (update_on_kvstore), one pushpull per key
per step. Fixed seeds: the result is a pure function of the bytes exchanged."""
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402



def build_net():
    """The model (also what scripts/priority-map --builder gluon_train:build_net traces)."""
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Conv2D(8, kernel_size=3, activation="relu"),
        gluon.nn.MaxPool2D(),
        gluon.nn.Conv2D(16, kernel_size=3, activation="relu"),
        gluon.nn.Flatten(),
        gluon.nn.Dense(300, activation="relu"),  # 300x576 weight
        gluon.nn.Dense(10),
    )
    return net


def main():
    mx.random.seed(42)
    np.random.seed(42)
    kv = mx.kv.create("dist_sync")
    net = build_net()
    net.initialize(mx.init.Xavier())
    # OPTIMIZER picks Gluon's optimizer (the default: SGD with momentum and weight decay).
    optimizer = os.environ.get("OPTIMIZER", "sgd")
    params = {"sgd": {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4}}.get(optimizer, {"learning_rate": 0.01})
    trainer = gluon.Trainer(net.collect_params(), optimizer, params, kvstore=kv)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(7 + kv.rank)
    for step in range(int(os.environ.get("STEPS", "4"))):
        x = mx.nd.array(rng.uniform(0, 1, (16, 1, 14, 14)).astype(np.float32))
        y = mx.nd.array(rng.randint(0, 10, (16,)).astype(np.float32))
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(16)
    mx.nd.waitall()
    params = net.collect_params()
    report(kv, [params[n].data() for n in sorted(params.keys())], f"update_on_kvstore={trainer._update_on_kvstore} optimizer={optimizer}")


if __name__ == "__main__":
    main()
