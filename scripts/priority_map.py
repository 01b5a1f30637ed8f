"""Writes a p3proxy priority map from the model itself, without touching the job
(DESIGN.md section 5, the `map` source).

  scripts/priority-map --model vgg19 --out vgg19.toml            # a model-zoo name
  scripts/priority-map --builder mymodels:build_net --out m.toml # module:function -> the block
  scripts/priority-map --symbol net-symbol.json --out m.toml     # an exported symbol

Forward order comes from a symbolic trace: `list_arguments()` (inputs excluded), then
`list_auxiliary_states()` (BatchNorm running statistics). Keys are what gluon.Trainer
gives: each parameter's index in the name order of all the parameters handed to it, so
build the model exactly as the job does (same prefixes, same blocks). Priority 1 is the
first layer; the parameters of one layer (weight, bias, statistics) share its priority.

Output (TOML): model, keys, and priority = [p0, p1, ...] indexed by key.
"""
import argparse
import importlib
import os
import sys

STAT_SUFFIXES = ("running_mean", "running_var", "moving_mean", "moving_var")
INPUTS = {"data", "label", "softmax_label"}


def layer_of(name):
    """A parameter's layer: its name without the parameter suffix."""
    for s in STAT_SUFFIXES:
        if name.endswith("_" + s):
            return name[: -len(s) - 1]
    return name.rsplit("_", 1)[0]


def from_symbol(sym, names=None):
    """(key order, forward order) of a symbol's parameters."""
    args = [a for a in sym.list_arguments() if a not in INPUTS]
    forward = args + list(sym.list_auxiliary_states())
    if names is None:
        names = forward
    missing = set(names) - set(forward)
    if missing:
        raise SystemExit(f"error: the trace does not use {len(missing)} parameter(s) handed to Trainer, e.g. {sorted(missing)[0]}")
    return sorted(names), forward


def from_block(net):
    import mxnet as mx

    sym = net(mx.sym.var("data"))
    if isinstance(sym, (list, tuple)):
        sym = mx.sym.Group(list(sym))
    return from_symbol(sym, list(net.collect_params().keys()))


def priorities(key_order, forward):
    """Priority by key: 1 + the rank of the parameter's layer in forward order."""
    rank = {}
    for n in forward:
        rank.setdefault(layer_of(n), len(rank) + 1)
    return [rank[layer_of(n)] for n in key_order]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a mxnet.gluon.model_zoo.vision name, e.g. vgg19, resnet50_v1")
    src.add_argument("--builder", help="module:function returning the Gluon block as the job builds it")
    src.add_argument("--symbol", help="an exported -symbol.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import mxnet as mx

    if a.model:
        from mxnet.gluon.model_zoo import vision

        try:
            net = vision.get_model(a.model)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        key_order, forward = from_block(net)
        name = a.model
    elif a.builder:
        module, _, func = a.builder.partition(":")
        if not func:
            raise SystemExit("error: --builder needs module:function")
        sys.path.insert(0, os.getcwd())
        net = getattr(importlib.import_module(module), func)()
        key_order, forward = from_block(net)
        name = a.builder
    else:
        if not os.path.exists(a.symbol):
            raise SystemExit(f"error: no such file: {a.symbol}")
        key_order, forward = from_symbol(mx.sym.load(a.symbol))
        name = os.path.basename(a.symbol)
    prio = priorities(key_order, forward)
    with open(a.out, "w") as f:
        f.write(f"# p3proxy priority map, written by scripts/priority-map from {name}.\n")
        f.write("# priority[k]: key k as gluon.Trainer numbers it; 1 = the first layer.\n")
        f.write(f"model = \"{name}\"\nkeys = {len(prio)}\npriority = [{', '.join(map(str, prio))}]\n")
    print(f"{a.out}: {len(prio)} keys, {max(prio)} layers, from {name}")


if __name__ == "__main__":
    main()
