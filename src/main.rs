//! The `p3proxy` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use p3proxy::config::Config;
use p3proxy::io::{run, serve_admin, Admin, Bound, Env, LogControl, Shared};

/// Big message buffers are reused, not mapped afresh for every message (`io::memory`).
#[global_allocator]
static ALLOCATOR: p3proxy::io::memory::Allocator = p3proxy::io::memory::Allocator;

/// Transparent sidecar for ps-lite (MXNet dist_sync) jobs.
///
/// Exit codes: 0 success, 1 runtime failure (a listener could not bind, ...), 2 bad
/// command line or configuration.
#[derive(Debug, Parser)]
#[command(name = "p3proxy", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the proxy (as root, next to the redirect installed by scripts/redirect).
    Run(Box<RunArgs>),
    /// Validate a configuration file and exit.
    Check {
        /// The TOML file.
        config: PathBuf,
    },
    /// Print the version.
    Version,
    /// Watch ps-lite traffic passively (a capture file or a live interface) and show
    /// where each iteration's time goes: per node pair, per iteration, per key.
    Inspect(InspectArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["iface", "pcap"])))]
struct InspectArgs {
    /// Capture live on this interface (as root), for `--seconds`.
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// Read a pcap or pcapng file (gzipped if it ends in .gz).
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// How long to capture live.
    #[arg(long, default_value_t = 30.0, value_name = "S")]
    seconds: f64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Write a Chrome-trace timeline (chrome://tracing, Perfetto) of every request.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Layer order from a priority map (scripts/priority-map) instead of learning it.
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// Link rate for busy times and the estimate: 1gbit, 10gbit, 100mbit, or bits/s.
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    rate: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (lower.as_str(), 1.0)
    };
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v * mult),
        _ => Err(format!(
            "{s:?} is not a rate (1gbit, 100mbit, or bits per second)"
        )),
    }
}

/// A flag set by SIGINT or SIGTERM (a live capture then reports what it saw).
fn stop_on_signal() -> &'static std::sync::atomic::AtomicBool {
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        runtime.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    &STOP
}

fn inspect(args: &InspectArgs) -> ExitCode {
    use p3proxy::inspect::{analysis::Options, inspect_iface, inspect_pcap, render};
    let priority = match &args.map {
        None => None,
        Some(path) => {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    p3proxy::core::priority::PriorityMap::parse(&t).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(map) => Some(
                    map.priorities
                        .iter()
                        .enumerate()
                        .map(|(k, &p)| (k as u64, p))
                        .collect(),
                ),
                Err(e) => {
                    eprintln!("error: priority map {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        }
    };
    let options = Options {
        rate_bps: args.rate,
        priority,
        ..Options::default()
    };
    let progress = |s: &p3proxy::inspect::CaptureStats| {
        eprintln!("... {} packets, {} messages", s.packets, s.messages)
    };
    let result = match (&args.pcap, &args.iface) {
        (Some(path), _) => inspect_pcap(path, options, progress),
        (None, Some(iface)) => {
            eprintln!(
                "capturing on {iface} for {} s (SIGINT or SIGTERM ends it early)",
                args.seconds
            );
            inspect_iface(iface, args.seconds, stop_on_signal(), options, progress)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let ins = match result {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.trace {
        if let Err(e) = std::fs::write(path, render::chrome_trace(&ins)) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    if args.json {
        println!("{}", render::json(&ins));
    } else {
        print!("{}", render::table(&ins));
        if let Some(path) = &args.trace {
            println!(
                "\nChrome trace ({} events): {}",
                ins.trace.len(),
                path.display()
            );
        }
    }
    ExitCode::SUCCESS
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Configuration file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Redirect listener [default: 127.0.0.1:15301].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Tunnel listener [default: 0.0.0.0:15302; in static mode none unless given].
    #[arg(long)]
    tunnel: Option<SocketAddr>,
    /// Prometheus endpoint [default: 127.0.0.1:9464].
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Inbound-capture listener, e.g. 0.0.0.0:15303, for worker hosts that run no proxy [default: off]: connections from other hosts to this host's registered ps-lite ports are captured (iptables nat PREROUTING; needs CAP_NET_ADMIN)
    #[arg(long, value_name = "ADDR")]
    inbound: Option<SocketAddr>,
    /// Static mode, for tests only: relay every accepted connection to HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<SocketAddr>,
    /// Turn priority scheduling off: relay each session as it comes, one tunnel
    /// connection per session, no slices (the baseline the benchmark compares with).
    #[arg(long)]
    no_schedule: bool,
    /// Read every byte in and write it out, also frame bodies that could go from
    /// socket to socket with splice(2).
    #[arg(long)]
    no_splice: bool,
    /// The ps-lite scheduler's port on this host, if known (else learned from its self connection).
    #[arg(long, value_name = "PORT")]
    scheduler_port: Option<u16>,
    /// Where key priorities come from [default: learned].
    #[arg(long, value_enum)]
    priority: Option<p3proxy::config::PrioritySource>,
    /// Priority map file (with `--priority map`), written by scripts/priority-map.
    #[arg(long, value_name = "FILE")]
    priority_map: Option<PathBuf>,
    /// The learned order: 0 = strict layer order; above 0, production order with the
    /// last layers holding this share of the bytes deferred to the end [default: 0 where
    /// a worker shares a server's host, 0.2 elsewhere].
    #[arg(long, value_name = "SHARE")]
    learned_defer: Option<f64>,
    /// The host's link rate (1gbit, 500mbit, or bits per second), for the live saving
    /// estimate and the answer idle share [default: none].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    link_rate: Option<f64>,
    /// Pace each peer host's tunnel traffic at the link rate / workers (needs a link rate).
    #[arg(long)]
    pace: bool,
    /// Threads that move bytes [default: 1].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Journal file [default: /run/p3proxy/journal.jsonl]: split layouts and what a
    /// restarted proxy needs to continue the job.
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
    /// Never split keys in front of local servers.
    #[arg(long)]
    no_split: bool,
    /// Smallest slice a split key is cut into, in bytes [default: 160000].
    #[arg(long, value_name = "N")]
    split_slice_bytes: Option<u64>,
    /// Split slices of sqrt(key bytes * N) bytes (0: every slice --split-slice-bytes)
    /// [default: 160000 where a worker shares the server's host, else 0].
    #[arg(long, value_name = "N")]
    split_cost_bytes: Option<u64>,
    /// Most slice requests per server and iteration [default: 2048].
    #[arg(long, value_name = "N")]
    split_max_requests: Option<u64>,
    /// Slice payload between proxies, in bytes [default: 160000, 40,000 float32 parameters].
    #[arg(long, value_name = "BYTES")]
    slice_bytes: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.log_json);
    match cli.command {
        Cmd::Version => {
            println!("p3proxy {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::Inspect(args) => inspect(&args),
        Cmd::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run(args) => {
            let config = match build_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            // One thread by default, like linkerd2-proxy: a sidecar should not compete
            // with the job for cores, and cross-thread wake-ups cost more than they give.
            let runtime = if config.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(config.threads);
                b
            }
            .enable_all()
            .build()
            .expect("tokio runtime");
            match runtime.block_on(serve(config, log)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn build_config(args: &RunArgs) -> Result<Config, p3proxy::config::ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(a) = args.listen {
        config.listen = a;
    }
    if let Some(a) = args.metrics {
        config.metrics = Some(a);
    }
    if let Some(u) = args.upstream {
        config.upstream = Some(u);
        // Static mode binds no tunnel listener unless asked to.
        config.tunnel = None;
    }
    if let Some(a) = args.tunnel {
        config.tunnel = Some(a);
    }
    if let Some(a) = args.inbound {
        config.inbound = Some(a);
    }
    if args.no_schedule {
        config.schedule = false;
    }
    if args.no_splice {
        config.splice = false;
    }
    if let Some(n) = args.slice_bytes {
        config.slice_bytes = n;
    }
    if let Some(p) = args.scheduler_port {
        config.scheduler_port = Some(p);
    }
    if let Some(p) = args.priority {
        config.priority = p;
    }
    if let Some(m) = &args.priority_map {
        config.priority_map = Some(m.clone());
    }
    if let Some(d) = args.learned_defer {
        config.learned_defer = Some(d);
    }
    if let Some(r) = args.link_rate {
        config.link_rate_bps = Some(r.round() as u64);
    }
    if args.pace {
        config.pace = true;
    }
    if let Some(n) = args.threads {
        config.threads = n;
    }
    if let Some(j) = &args.journal {
        config.journal = Some(j.clone());
    }
    if args.no_split {
        config.split = false;
    }
    if let Some(n) = args.split_slice_bytes {
        config.split_slice_bytes = n;
    }
    if let Some(n) = args.split_cost_bytes {
        config.split_cost_bytes = Some(n);
    }
    if let Some(n) = args.split_max_requests {
        config.split_max_requests = n;
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: Config, log: LogControl) -> anyhow::Result<()> {
    use anyhow::Context;
    let bound = Bound::bind(&config).await.context("binding listeners")?;
    let admin = match config.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics endpoint {addr}"))?;
            let handle = p3proxy::metrics::install().context("metrics recorder")?;
            Some((listener, handle))
        }
        None => None,
    };
    let mut env = Env::system();
    if let Some(up) = config.upstream {
        env = env.with_static_upstream(up);
    }
    tracing::info!(listen = ?bound.addrs(), metrics = ?config.metrics, upstream = ?config.upstream, "p3proxy running");
    let shared = Shared::new(config, env, &bound)?;
    if let Some((listener, metrics)) = admin {
        let admin = Admin {
            metrics,
            shared: shared.clone(),
            log: Some(log),
        };
        tokio::spawn(serve_admin(listener, std::sync::Arc::new(admin)));
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    run(bound, shared, shutdown).await;
    Ok(())
}

/// Logs to stderr with the filter of `P3PROXY_LOG` (default `info`), which the admin
/// endpoint `PUT /log-level` can change at run time.
fn init_logging(json: bool) -> LogControl {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_from_env("P3PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    let current = handle.clone();
    let get = move || current.with_current(|f| f.to_string()).unwrap_or_default();
    let now = get.clone();
    LogControl {
        get: Box::new(get),
        set: Box::new(move |text| {
            let filter = EnvFilter::try_new(text).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())?;
            Ok(now())
        }),
    }
}
