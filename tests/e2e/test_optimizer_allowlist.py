"""The split allowlist (src/core/optimizer.rs) checked against the truth: MXNet 1.9.1's
own `Updater`, as a server runs it, updating one whole key and, separately, the slice
keys p3proxy would make of it (negative ints, as the server reads them), for a few
steps. Every allowlisted optimizer and schedule must give bitwise the same weights;
the optimizers DESIGN.md §7 excludes must not (so this test can fail)."""
import os
import re

import mxnet as mx
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = open(os.path.join(ROOT, "src", "core", "optimizer.rs")).read()


def listed(name):
    body = re.search(name + r": \[&str; \d+\] = \[(.*?)\];", SOURCE, re.S).group(1)
    return re.findall(r'"([^"]+)"', body)


ALLOWED = listed("ALLOWED_OPTIMIZERS")
SCHEDULERS = listed("ALLOWED_SCHEDULERS")
N = 100_003  # elements: an odd length, so the last slice is short
SLICE = 40_000
STEPS = 3
FIRST_SLICE_KEY = -(2**31)  # int(begin + 2^31 - begin) on the server


def cls(path):
    module, name = path.rsplit(".", 1)
    assert module in ("mxnet.optimizer.optimizer", "mxnet.lr_scheduler"), path
    return getattr(mx.optimizer if "optimizer" in module else mx.lr_scheduler, name)


def run(make_optimizer, dtype="float32", sliced=False):
    """Weights after STEPS updates of one key (whole, or as slice keys)."""
    opt = make_optimizer()
    updater = mx.optimizer.get_updater(opt)
    rng = np.random.RandomState(3)
    weight = rng.uniform(-1, 1, N).astype(dtype)
    bounds = [(i, min(i + SLICE, N)) for i in range(0, N, SLICE)] if sliced else [(0, N)]
    parts = [mx.nd.array(weight[a:b], dtype=dtype) for a, b in bounds]
    for _ in range(STEPS):
        grad = rng.uniform(-1, 1, N).astype(dtype)
        for i, ((a, b), w) in enumerate(zip(bounds, parts)):
            key = FIRST_SLICE_KEY + i if sliced else 3
            updater(key, mx.nd.array(grad[a:b], dtype=dtype), w)
    return np.concatenate([w.asnumpy() for w in parts])


def same(make_optimizer, dtype="float32"):
    whole = run(make_optimizer, dtype)
    sliced = run(make_optimizer, dtype, sliced=True)
    return whole.tobytes() == sliced.tobytes()


OPTIONS = {
    "SGD": dict(momentum=0.9, wd=1e-4, clip_gradient=0.5),
    "NAG": dict(momentum=0.9, wd=1e-4),
    "RMSProp": dict(centered=True),
    "Signum": dict(momentum=0.9, wd_lh=1e-3),
}


@pytest.mark.parametrize("path", ALLOWED)
def test_every_allowlisted_optimizer_updates_slices_like_the_whole_key(path):
    make = lambda: cls(path)(learning_rate=0.01, rescale_grad=0.5, **OPTIONS.get(path.rsplit(".", 1)[1], {}))
    assert same(make), f"{path}: slice keys trained differently from the whole key"


@pytest.mark.parametrize("path", SCHEDULERS)
def test_every_allowlisted_schedule_follows_the_global_count(path):
    args = {
        "FactorScheduler": dict(step=1, factor=0.5),
        "MultiFactorScheduler": dict(step=[1, 2], factor=0.5),
        "PolyScheduler": dict(max_update=10, base_lr=0.1),
        "CosineScheduler": dict(max_update=10, base_lr=0.1),
    }.get(path.rsplit(".", 1)[1], {})
    make = lambda: mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, lr_scheduler=cls(path)(**args))
    assert same(make), f"{path}: slice keys trained differently from the whole key"


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_fp16_with_multi_precision(name):
    make = lambda: getattr(mx.optimizer, name)(learning_rate=0.01, multi_precision=True)
    assert same(make, "float16")


@pytest.mark.parametrize("name", ["LAMB", "LARS", "SGLD", "Nadam"])
def test_the_excluded_optimizers_really_differ(name):
    assert f"mxnet.optimizer.optimizer.{name}" not in ALLOWED
    if name == "SGLD":  # random noise: not even two whole runs agree
        mx.random.seed(1)
        a = run(lambda: mx.optimizer.SGLD(learning_rate=0.01))
        b = run(lambda: mx.optimizer.SGLD(learning_rate=0.01))
        assert a.tobytes() != b.tobytes()
        return
    assert not same(lambda: getattr(mx.optimizer, name)(learning_rate=0.01)), f"{name} should differ when sliced"
