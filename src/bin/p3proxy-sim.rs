//! `p3proxy-sim`: the job simulator (`p3proxy::sim`) from the command line;
//! `scripts/simulate` runs it for the README's tables.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use p3proxy::sim::{simulate, Order, Profile, SimConfig};

/// Simulates MXNet dist_sync jobs through p3proxy over its real scheduler.
#[derive(Parser, Debug)]
#[command(name = "p3proxy-sim")]
struct Args {
    /// Model profiles (bench/profiles/NAME.json).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bench/profiles/vgg19.json,bench/profiles/resnet50_v1.json"
    )]
    profiles: Vec<PathBuf>,
    /// Worker counts.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    workers: Vec<usize>,
    /// Server counts.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    servers: Vec<usize>,
    /// Link rates in Gbit/s.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    rates: Vec<f64>,
    /// Orders: direct, key, layer, deferNN (NN: percent of the bytes deferred).
    #[arg(long, value_delimiter = ',', default_value = "direct,key,layer")]
    orders: Vec<String>,
    /// Compute per iteration, ms.
    #[arg(long, default_value_t = 300.0)]
    compute_ms: f64,
    /// Measured iterations (after 2 of warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Server time per request, microseconds [default: 50].
    #[arg(long)]
    request_us: Option<f64>,
    /// Server time per (slice) key update, microseconds [default: 400].
    #[arg(long)]
    update_us: Option<f64>,
    /// Server time per byte of a request and of an update, ns [default: 2,3].
    #[arg(long, value_delimiter = ',')]
    ns_per_byte: Option<Vec<f64>>,
    /// Bytes one connection keeps in flight [default: 1048576].
    #[arg(long)]
    window: Option<u64>,
    /// Worker w starts w times this late, ms (do the workers fall back in step?).
    #[arg(long, default_value_t = 0.0)]
    skew_ms: f64,
    /// Write the table (markdown) and rows (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn order(name: &str) -> Result<Order, String> {
    Ok(match name {
        "direct" => Order::Direct,
        "key" => Order::Key,
        "layer" => Order::Layer,
        t if t.starts_with("tail") => {
            let pct: f64 = t[4..]
                .parse()
                .map_err(|_| format!("{t}: tailNN, NN a percentage"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!("{t}: the tail is 0 to 100 percent of the bytes"));
            }
            Order::Tail { tail: pct / 100.0 }
        }
        t if t.starts_with("defer") => {
            let pct: f64 = t[5..]
                .parse()
                .map_err(|_| format!("{t}: deferNN, NN a percentage"))?;
            if !(0.0..=100.0).contains(&pct) {
                return Err(format!(
                    "{t}: the deferred tail is 0 to 100 percent of the bytes"
                ));
            }
            Order::Defer { tail: pct / 100.0 }
        }
        other => {
            return Err(format!(
                "unknown order {other:?}: direct, key, layer, tailNN or deferNN"
            ))
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p3proxy-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let orders = args
        .orders
        .iter()
        .map(|o| order(o))
        .collect::<Result<Vec<_>, _>>()?;
    if args.workers.iter().chain(&args.servers).any(|&n| n == 0) {
        return Err("workers and servers: at least 1".into());
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !args.rates.iter().all(|&r| positive(r))
        || !(positive(args.compute_ms) || args.compute_ms == 0.0)
        || args.iters == 0
    {
        return Err("rates above 0, compute at least 0 ms, at least 1 iteration".into());
    }
    let mut lines = vec![
        "| model | workers | servers | Gbit/s | order | iteration s | x ideal | x wire | vs direct | requests/iter |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut rows = Vec::new();
    for path in &args.profiles {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let profile = Profile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for &w in &args.workers {
            for &s in &args.servers {
                for &rate in &args.rates {
                    let mut direct = None;
                    for &o in &orders {
                        let mut config = SimConfig::reference(w, s, o);
                        config.rate_bps = rate * 1e9;
                        config.compute = Duration::from_secs_f64(args.compute_ms / 1000.0);
                        config.iters = args.iters;
                        config.skew = Duration::from_secs_f64(args.skew_ms.max(0.0) / 1000.0);
                        if let Some(w) = args.window {
                            config.window = w;
                        }
                        if let Some(us) = args.request_us {
                            config.server.request = Duration::from_secs_f64(us / 1e6);
                        }
                        if let Some(us) = args.update_us {
                            config.server.update = Duration::from_secs_f64(us / 1e6);
                        }
                        if let Some(ns) = &args.ns_per_byte {
                            config.server.request_ns_per_byte = ns[0];
                            config.server.update_ns_per_byte = *ns.get(1).unwrap_or(&ns[0]);
                        }
                        let started = std::time::Instant::now();
                        let r = simulate(&profile, &config);
                        let it = r.iteration.as_secs_f64();
                        if o == Order::Direct {
                            direct = Some(it);
                        }
                        let vs = direct.map_or("-".to_string(), |d| format!("{:.2}x", d / it));
                        eprintln!(
                            "{} W={w} S={s} {rate} Gbit/s {}: {it:.3} s ({:.1} s to simulate)",
                            profile.model,
                            o.label(),
                            started.elapsed().as_secs_f64()
                        );
                        lines.push(format!(
                            "| {} x{} | {w} | {s} | {rate} | {} | {it:.3} | {:.2} | {:.2} | {vs} | {:.0} |",
                            profile.model,
                            profile.scale,
                            o.label(),
                            it / r.ideal.as_secs_f64(),
                            it / r.wire.as_secs_f64(),
                            r.requests_per_iter
                        ));
                        rows.push(serde_json::json!({
                            "model": profile.model, "scale": profile.scale, "workers": w, "servers": s,
                            "rate_gbits": rate, "order": o.label(), "iteration_s": it,
                            "iterations_s": r.iterations.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
                            "ideal_s": r.ideal.as_secs_f64(), "wire_s": r.wire.as_secs_f64(),
                            "requests_per_iter": r.requests_per_iter,
                        }));
                    }
                }
            }
        }
    }
    let table = lines.join("\n");
    println!("{table}");
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join("sim.md"), table + "\n").map_err(|e| e.to_string())?;
        let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("sim.json"), json).map_err(|e| e.to_string())?;
    }
    Ok(())
}
