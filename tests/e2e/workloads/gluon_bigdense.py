"""The job a new user tries first, as issue 24 describes it: a small Gluon CNN whose
dense layer has more than 1M parameters (MXNet's big-array rule spreads it over every
server), Gluon's defaults (server-side SGD with momentum, one pushpull per key per
step), a few steps. Fixed seeds: the result is a pure function of the bytes exchanged.
With 2 servers MXNet 1.9.1 itself sometimes aborts it (`init N first`): README,
"Request order at the server"."""
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402


def build_net():
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Conv2D(8, kernel_size=3, activation="relu"),
        gluon.nn.MaxPool2D(),
        gluon.nn.Conv2D(16, kernel_size=3, activation="relu"),
        gluon.nn.Flatten(),
        gluon.nn.Dense(600, activation="relu"),  # 600 x 1936 = 1.16M: on every server
        gluon.nn.Dense(10),
    )
    return net


def main():
    mx.random.seed(42)
    np.random.seed(42)
    kv = mx.kv.create("dist_sync")
    net = build_net()
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4}, kvstore=kv)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(7 + kv.rank)
    for _ in range(int(os.environ.get("STEPS", "4"))):
        x = mx.nd.array(rng.uniform(0, 1, (16, 1, 28, 28)).astype(np.float32))
        y = mx.nd.array(rng.randint(0, 10, (16,)).astype(np.float32))
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(16)
    mx.nd.waitall()
    params = net.collect_params()
    report(kv, [params[n].data() for n in sorted(params.keys())],
           f"update_on_kvstore={trainer._update_on_kvstore}")


if __name__ == "__main__":
    main()
