"""scripts/simulate: the job simulator (`p3proxy-sim`, src/sim/) for the README.

1. Validation: W=2 workers, 1 server, 1 Gbit/s, 300 ms compute, side by side with the
   training benchmark's measurements of the same jobs on the testbed (topology a):
   direct, key order and p3proxy's default (the deferred order) from
   bench/results/order-cut/, strict layer order from bench/results/sizing-a/ (p3proxy's
   default then).
2. Scale: what the testbed cannot run: 2-64 workers, 1-8 servers, 1-100 Gbit/s, for
   direct (FIFO), key order, strict layer order and the deferred-tail order.

Writes bench/results/sim/{validation.md,scale.md,sim.json,scale.png} (or --out).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "target", "release", "p3proxy-sim")
ORDERS = "direct,key,layer,defer20"
# The testbed's measurement of each simulated system (file, system).
MEASURED = {"direct": ("order-cut", "direct"), "layer": ("sizing-a", "p3proxy"), "key": ("order-cut", "p3proxy-key"),
            "defer20": ("order-cut", "p3proxy")}


def sim(args):
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([SIM, "--out", out] + args, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(os.path.join(out, "sim.json")))


def measured(model, system):
    name, label = MEASURED[system]
    rows = json.load(open(os.path.join(ROOT, "bench", "results", name, "bench.json")))["rows"]
    for r in rows:
        if r["model"] == model and r["topology"] == "a" and r["system"] == label:
            return r["median_s"], f"bench/results/{name}"
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sim"))
    ap.add_argument("--workers", default="2,8,32,64")
    ap.add_argument("--servers", default="1,2,8")
    ap.add_argument("--rates", default="1,10,100")
    ap.add_argument("--orders", default=ORDERS)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    val = sim(["--orders", ORDERS])
    lines = ["| model | order | simulated s | testbed s | simulated / testbed | testbed run |", "|---|---|---|---|---|---|"]
    for r in val:
        t, src = measured(r["model"], r["order"]) if r["order"] in MEASURED else (None, None)
        ratio = f"{r['iteration_s'] / t:.2f}" if t else "-"
        lines.append(f"| {r['model']} x{r['scale']} | {r['order']} | {r['iteration_s']:.3f} | "
                     f"{t and f'{t:.3f}' or '-'} | {ratio} | {src or '-'} |")
    validation = "\n".join(lines)
    open(os.path.join(a.out, "validation.md"), "w").write(validation + "\n")
    print(validation, flush=True)

    rows = []
    for w in a.workers.split(","):
        print(f"simulating {w} workers ...", file=sys.stderr, flush=True)
        rows += sim(["--workers", w, "--servers", a.servers, "--rates", a.rates, "--orders", a.orders])
    for r in val + rows:
        r.pop("iterations_s", None)  # the medians are enough for the report
    json.dump({"validation": val, "scale": rows}, open(os.path.join(a.out, "sim.json"), "w"), indent=1)
    orders = a.orders.split(",")
    head = "| model | workers | servers | Gbit/s | " + " | ".join(f"{o} (x ideal)" for o in orders) + " | best |"
    lines = [head, "|" + "---|" * (5 + len(orders))]
    key = lambda r: (r["model"], r["workers"], r["servers"], r["rate_gbits"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["order"]] = r
    for (m, w, s, rate), by in groups.items():
        cells = [f"{by[o]['iteration_s']:.3f} ({by[o]['iteration_s'] / by[o]['ideal_s']:.2f})" for o in orders]
        fastest = min(by[o]["iteration_s"] for o in orders)
        level = [o for o in orders if by[o]["iteration_s"] <= fastest * 1.005]
        best = "all level" if len(level) == len(orders) else ", ".join(level)
        lines.append(f"| {m} | {w} | {s} | {rate:g} | " + " | ".join(cells) + f" | {best} |")
    scale = "\n".join(lines)
    open(os.path.join(a.out, "scale.md"), "w").write(scale + "\n")
    print(scale)
    chart(groups, orders, a.out)


def chart(groups, orders, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no chart", file=sys.stderr)
        return
    models = sorted({k[0] for k in groups})
    rates = sorted({k[3] for k in groups})
    fig, axes = plt.subplots(len(models), len(rates), figsize=(4 * len(rates), 3.2 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            servers = max(k[2] for k in groups if k[0] == m)
            ws = sorted(k[1] for k in groups if k[0] == m and k[3] == rate and k[2] == servers)
            for o in orders:
                ax.plot(ws, [groups[(m, w, servers, rate)][o]["iteration_s"] / groups[(m, w, servers, rate)][o]["ideal_s"] for w in ws],
                        marker="o", label=o)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m}, {servers} servers, {rate:g} Gbit/s", fontsize=9)
            ax.set_xlabel("workers")
            ax.set_ylabel("x ideal bound")
            ax.axhline(1514 / 1448, color="k", linestyle="--", linewidth=0.8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scale.png"), dpi=90)


if __name__ == "__main__":
    main()
