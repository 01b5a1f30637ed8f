"""The parameter list of a real model, as gluon.Trainer sees it, with per-layer
compute costs: shapes come from a symbolic trace (no weights downloaded, no compute).

- keys: a parameter's index in the name-sorted list of all parameters (Trainer's
  `_param2idx`), BatchNorm running statistics included (initialized, never pushed);
- layers: parameters grouped by their block, in true forward order (the symbol's
  `list_arguments()`, then `list_auxiliary_states()`);
- cost: forward FLOPs of the layer (convolution and dense dominate).
"""
from dataclasses import dataclass, field

STAT_SUFFIXES = ("running_mean", "running_var")


@dataclass
class Param:
    name: str
    key: int
    numel: int  # after scaling
    pushed: bool  # has a gradient (running statistics do not)


@dataclass
class Layer:
    name: str
    flops: float
    params: list = field(default_factory=list)


def _prefix(name):
    return name.rsplit("_", 2)[0] if name.endswith(STAT_SUFFIXES) else name.rsplit("_", 1)[0]


def tiny():
    """A small real Gluon model for smoke runs."""
    from mxnet import gluon

    net = gluon.nn.HybridSequential(prefix="tiny_")
    with net.name_scope():
        net.add(gluon.nn.Conv2D(16, 3, activation="relu"), gluon.nn.BatchNorm(), gluon.nn.MaxPool2D(4),
                gluon.nn.Conv2D(32, 3, activation="relu"), gluon.nn.Flatten(),
                gluon.nn.Dense(256, activation="relu"), gluon.nn.Dense(10))
    return net, (1, 3, 32, 32)


def build(name):
    if name == "tiny":
        return tiny()
    from mxnet.gluon.model_zoo import vision

    return vision.get_model(name), (1, 3, 224, 224)


def layers(name, scale=1.0):
    """(layers in forward order, params in key order) of model `name` scaled by `scale`."""
    import mxnet as mx

    net, data_shape = build(name)
    sym = net(mx.sym.var("data"))
    arg_names = [a for a in sym.list_arguments() if a != "data"]
    aux_names = sym.list_auxiliary_states()
    arg_shapes, _, aux_shapes = sym.infer_shape(data=data_shape)
    shapes = dict(zip(sym.list_arguments(), arg_shapes))
    shapes.update(zip(aux_names, aux_shapes))
    internals = sym.get_internals()
    _, out_shapes, _ = internals.infer_shape(data=data_shape)
    outputs = dict(zip(internals.list_outputs(), out_shapes))

    all_names = sorted(net.collect_params().keys())
    assert set(all_names) == set(arg_names) | set(aux_names), "the trace sees every parameter"
    params = []
    for key, n in enumerate(all_names):
        numel = 1
        for d in shapes[n]:
            numel *= d
        params.append(Param(n, key, max(1, int(round(numel * scale))), not n.endswith(STAT_SUFFIXES)))
    by_name = {p.name: p for p in params}

    order, by_prefix = [], {}
    for n in arg_names + aux_names:
        pre = _prefix(n)
        if pre not in by_prefix:
            by_prefix[pre] = Layer(pre, 0.0)
            order.append(by_prefix[pre])
        by_prefix[pre].params.append(by_name[n])
    for layer in order:
        out = outputs.get(layer.name + "_fwd_output")
        w = shapes.get(layer.name + "_weight")
        spatial = 1
        if out is not None and len(out) == 4:
            spatial = out[2] * out[3]
        if w is not None and len(w) >= 2:
            wn = 1
            for d in w:
                wn *= d
            layer.flops = 2.0 * wn * spatial
        else:
            # Elementwise layers (BatchNorm, ...): a few operations per output.
            elems = 1
            for d in (out or (1,)):
                elems *= d
            layer.flops = 4.0 * elems
    return order, params


if __name__ == "__main__":
    import sys

    for model, scale in [("vgg19", 0.1), ("resnet50_v1", 0.5), ("tiny", 1.0)]:
        ls, ps = layers(model, scale)
        total = sum(p.numel for p in ps if p.pushed)
        print(f"{model} x{scale}: {len(ls)} layers, {len(ps)} keys, {total / 1e6:.1f}M pushed parameters, "
              f"first layer keys {[p.key for p in ls[0].params]}, {sum(l.flops for l in ls) / 1e9:.1f} GFLOP", file=sys.stderr)
