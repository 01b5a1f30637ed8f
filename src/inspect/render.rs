//! The inspection for people (a table and a text timeline), for scripts (JSON), and
//! for a trace viewer (Chrome trace format: chrome://tracing, Perfetto).

use std::fmt::Write;

use super::analysis::{IterationRow, TraceEvent};
use super::streams::StreamKind;
use super::Inspection;

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The report as text tables, with a timeline of the median iteration.
pub fn table(ins: &Inspection) -> String {
    let r = &ins.report;
    let s = &r.summary;
    let mut out = String::new();
    let c = &ins.capture;
    let tunnels = ins
        .connections
        .iter()
        .filter(|c| c.kind == StreamKind::Tunnel)
        .count();
    let zmtp = ins
        .connections
        .iter()
        .filter(|c| c.kind == StreamKind::Zmtp)
        .count();
    let _ = writeln!(
        out,
        "capture: {} packets, {} TCP segments, {:.1} s; {} ZMTP and {} p3proxy tunnel connections, {} messages",
        c.packets, c.tcp_segments, c.duration_s, zmtp, tunnels, c.messages
    );
    if r.nodes.is_empty() {
        let _ = writeln!(out, "nodes: the ADD_NODE broadcast was not captured (node ids from identities, server hosts from traffic)");
    } else {
        let nodes: Vec<String> = r
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}@{}",
                    n.node,
                    n.addr.map(|a| a.to_string()).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(out, "nodes: {}", nodes.join(" "));
    }
    for conn in ins.connections.iter().filter(|c| c.error.is_some()) {
        let _ = writeln!(
            out,
            "  connection {} {} -> {} not followed: {}",
            conn.conn,
            conn.client,
            conn.server,
            conn.error.as_deref().unwrap_or_default()
        );
    }
    let _ = writeln!(out, "\nmessages by node pair:");
    let _ = writeln!(
        out,
        "  {:<6} {:<22} {:<7} {:>9} {:>9} {:>14}",
        "from", "to", "path", "messages", "keys", "bytes"
    );
    for p in &r.pairs {
        let _ = writeln!(
            out,
            "  {:<6} {:<22} {:<7} {:>9} {:>9} {:>14}",
            p.from,
            p.to,
            if p.tunnel { "tunnel" } else { "direct" },
            p.messages,
            p.keys,
            p.bytes
        );
    }
    let _ = writeln!(
        out,
        "\niterations (seconds; wait = the next forward pass waiting on its first layer, key {}, layer order {}; pair lag = median from the first to the last worker's push of a key; answer wait = requests waiting for their answers, answer idle = of that, no answer on the wire):",
        s.first_layer_key.map_or("-".into(), |k| k.to_string()),
        s.layer_order
    );
    let _ = writeln!(
        out,
        "  {:>5} {:>8} {:>7} {:>7} {:>6} {:>10} {:>9} {:>7} {:>7} {:>8} {:>11} {:>11}",
        "iter",
        "start",
        "period",
        "comm",
        "wait",
        "link MB",
        "link busy",
        "ideal",
        "saving",
        "pair lag",
        "answer wait",
        "answer idle"
    );
    for it in &r.iterations {
        let _ = writeln!(
            out,
            "  {:>5} {:>8.3} {:>7} {:>7.3} {:>6.3} {:>10.1} {:>9.3} {:>7} {:>7} {:>8} {:>11.3} {:>11.3}",
            it.index,
            it.start_s,
            secs(it.period_s),
            it.comm_s,
            it.first_layer_wait_s,
            it.busiest_link_mb,
            it.link_busy_s,
            secs(it.ideal_s),
            secs(it.saving_s),
            secs(it.pair_lag_s),
            it.answer_wait_s,
            it.answer_idle_s
        );
    }
    let _ = writeln!(
        out,
        "\nsummary over {} iterations (the first one seen left out): median period {} s, first-layer wait {} s, push pair lag {} s, answers idle {} of their wait, busiest link {} MB/iteration at {:.2} Gbit/s",
        s.iterations,
        secs(s.median_period_s),
        secs(s.median_first_layer_wait_s),
        secs(s.median_pair_lag_s),
        s.answer_idle_share
            .map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
        s.median_busiest_link_mb.map_or("-".into(), |v| format!("{v:.1}")),
        s.rate_bps / 1e9
    );
    match (s.median_period_s, s.median_ideal_s) {
        (Some(p), Some(i)) if i > p => {
            let _ = writeln!(
                out,
                "estimate: none - iterations take less than the busiest link's bytes need at {:.2} Gbit/s: is --rate right?",
                s.rate_bps / 1e9
            );
        }
        (Some(p), Some(i)) => {
            let _ = writeln!(
                out,
                "estimate: ideal bound {i:.3} s per iteration (compute or the busiest link); priority scheduling and slicing could save up to {:.3} s ({:.2}x)",
                p - i,
                p / i
            );
        }
        _ => {}
    }
    let _ = writeln!(
        out,
        "\nkeys, first layer first (latency: request's first byte to response's last byte):"
    );
    let _ = writeln!(
        out,
        "  {:>5} {:>8} {:>9} {:>12} {:>10} {:>11}",
        "layer", "key", "requests", "bytes", "latency", "push at"
    );
    for k in &r.keys {
        let _ = writeln!(
            out,
            "  {:>5} {:>8} {:>9} {:>12} {:>10.4} {:>11.4}",
            k.layer, k.key, k.requests, k.bytes, k.median_latency_s, k.median_push_offset_s
        );
    }
    if let Some(tl) = timeline(ins, 64) {
        out.push('\n');
        out.push_str(&tl);
    }
    if r.unmatched_responses > 0 || r.not_pslite_messages > 0 {
        let _ = writeln!(
            out,
            "\n{} responses without a captured request, {} messages that are not ps-lite",
            r.unmatched_responses, r.not_pslite_messages
        );
    }
    out
}

/// A text timeline of the iteration with the median period: one row per key (first
/// layer on top), from its request's first byte to its response's last byte.
pub fn timeline(ins: &Inspection, width: usize) -> Option<String> {
    let r = &ins.report;
    let mut steady: Vec<&IterationRow> = r
        .iterations
        .iter()
        .filter(|i| i.period_s.is_some())
        .skip(1)
        .collect();
    if steady.is_empty() {
        return None;
    }
    steady.sort_by(|a, b| a.period_s.partial_cmp(&b.period_s).expect("finite"));
    let it = steady[steady.len() / 2];
    let (from, span) = (it.start_s, it.period_s?);
    let worker = ins.trace.iter().map(|e| e.pid).min()?;
    let mut events: Vec<&TraceEvent> = ins
        .trace
        .iter()
        .filter(|e| e.pid == worker && e.ts / 1e6 >= from && e.ts / 1e6 < from + span)
        .collect();
    if events.is_empty() {
        return None;
    }
    let layer = |key: u64| {
        r.keys
            .iter()
            .find(|k| k.key == key)
            .map_or(usize::MAX, |k| k.layer)
    };
    events.sort_by_key(|e| (layer(e.tid), e.ts as u64));
    let scale = width as f64 / span;
    let mut out = format!(
        "timeline of iteration {} (median period {:.3} s), worker W{worker}, one column = {:.1} ms; \
         '=' request to response, first layer on top:\n",
        it.index,
        span,
        span / width as f64 * 1e3
    );
    const MAX_ROWS: usize = 40;
    let step = events.len().div_ceil(MAX_ROWS).max(1);
    for e in events.iter().step_by(step) {
        let a = (((e.ts / 1e6 - from) * scale) as usize).min(width - 1);
        let b = ((((e.ts + e.dur) / 1e6 - from) * scale).ceil() as usize).clamp(a + 1, width);
        let _ = writeln!(
            out,
            "  key {:>5} |{}{}{}|",
            e.tid,
            " ".repeat(a),
            "=".repeat(b - a),
            " ".repeat(width - b)
        );
    }
    if step > 1 {
        let _ = writeln!(out, "  (every {step}th of {} keys shown)", events.len());
    }
    Some(out)
}

/// The report as JSON.
pub fn json(ins: &Inspection) -> String {
    serde_json::to_string_pretty(ins).expect("serializable")
}

/// The trace events in Chrome's trace format.
pub fn chrome_trace(ins: &Inspection) -> String {
    #[derive(serde::Serialize)]
    struct Trace<'a> {
        #[serde(rename = "traceEvents")]
        trace_events: &'a [TraceEvent],
        #[serde(rename = "displayTimeUnit")]
        display_time_unit: &'static str,
    }
    serde_json::to_string(&Trace {
        trace_events: &ins.trace,
        display_time_unit: "ms",
    })
    .expect("serializable")
}
