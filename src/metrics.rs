//! Every metric the proxy exports: names as constants, described once at start-up,
//! low-cardinality labels only (never keys or addresses). DESIGN.md §9 fixes the
//! names that tools and checks rely on.

use std::net::SocketAddr;

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

/// Bytes relayed, by `direction` (`outbound`: from a local app; `inbound`: to a local app).
pub const FORWARDED_BYTES: &str = "p3proxy_forwarded_bytes_total";
/// ZMTP messages relayed, by `direction`.
pub const FORWARDED_MESSAGES: &str = "p3proxy_forwarded_messages_total";
/// Bytes that failed to parse, by `kind`.
pub const PARSE_ERRORS: &str = "p3proxy_parse_errors_total";
/// Connections refused, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "p3proxy_connections_refused_total";
/// Requests in flight when their upstream died (ps-lite never resends them).
pub const REQUESTS_LOST: &str = "p3proxy_requests_lost_total";
/// Connections accepted, by `route` (tunnel, direct, same_host, opaque, tunnel_in).
pub const CONNECTIONS: &str = "p3proxy_connections_total";
/// Connections open now.
pub const CONNECTIONS_OPEN: &str = "p3proxy_connections_open";
/// Messages forwarded as fences because they are not ps-lite.
pub const NOT_PSLITE: &str = "p3proxy_not_pslite_messages_total";
/// Tunnel answers received, by `outcome`.
pub const TUNNEL_ANSWERS: &str = "p3proxy_tunnel_answers_total";
/// Nodes in the node table learned from ADD_NODE.
pub const NODES: &str = "p3proxy_nodes";

/// Bytes handed to output connections by the egress scheduler, by priority `class`.
pub const CLASS_BYTES: &str = "p3proxy_class_bytes_total";
/// Messages whose first byte the egress scheduler handed out, by `class`.
pub const CLASS_MESSAGES: &str = "p3proxy_class_messages_total";
/// Time from a message's arrival to its first byte handed out, by `class`.
pub const QUEUE_DELAY: &str = "p3proxy_queue_delay_seconds";
/// Slices of a message that interrupted a less urgent unfinished one on its connection.
pub const PREEMPTIONS: &str = "p3proxy_preemptions_total";
/// Slices sent to peer proxies.
pub const SLICES_SENT: &str = "p3proxy_slices_sent_total";
/// Slices received from peer proxies and reassembled.
pub const SLICES_REASSEMBLED: &str = "p3proxy_slices_reassembled_total";
/// Bytes held for reassembly now, over every tunnel session.
pub const REASSEMBLY_BYTES: &str = "p3proxy_reassembly_bytes";
/// Bytes queued in the egress scheduler now.
pub const SCHEDULER_QUEUED_BYTES: &str = "p3proxy_scheduler_queued_bytes";
/// 1 for the key-priority source in use, by `source`.
pub const PRIORITY_SOURCE: &str = "p3proxy_priority_source";

/// Keys split into slice keys in front of a local server.
pub const KEYS_SPLIT: &str = "p3proxy_keys_split_total";
/// Keys above the split threshold left whole, by `reason`.
pub const SPLIT_REFUSED: &str = "p3proxy_split_refused_total";
/// Servers whose traffic was stopped because a split layout could not serve a
/// request (or a response bypassed the proxy), by `reason`.
pub const SPLIT_FAILURES: &str = "p3proxy_split_failures_total";
/// Requests for split keys turned into slice-key requests.
pub const SPLIT_REQUESTS: &str = "p3proxy_split_requests_total";
/// Slice-key requests sent to local servers.
pub const SLICE_REQUESTS: &str = "p3proxy_slice_requests_total";
/// Responses merged from slice-key responses.
pub const SPLIT_RESPONSES_MERGED: &str = "p3proxy_split_responses_merged_total";
/// Requests to a local server held for order, by the `reason` they first waited for
/// (`core::order`: ps-lite's server queue is not first-in first-out).
pub const REQUESTS_HELD_FOR_ORDER: &str = "p3proxy_requests_held_for_order_total";

/// Journal writes that failed.
pub const JOURNAL_ERRORS: &str = "p3proxy_journal_errors_total";

/// Class labels (no allocation per sample).
const CLASS_LABELS: [&str; 4] = ["0", "1", "2", "3"];
/// Queue delay buckets, seconds: from a slice time at 10 Gbit/s to seconds.
const QUEUE_DELAY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
];

/// Every `kind` of `PARSE_ERRORS`, each exported from the start at zero, so that the
/// first error is an increase a rate or an alert sees.
pub const PARSE_ERROR_KINDS: [&str; 6] = [
    "zmtp_framing",
    "zmtp_handshake",
    "zmtp_mechanism",
    "tunnel_frame",
    "tunnel_reassembly",
    "tunnel_message",
];

/// Direction label: bytes from a local app, leaving through this proxy.
pub const OUTBOUND: &str = "outbound";
/// Direction label: bytes delivered to a local app.
pub const INBOUND: &str = "inbound";

/// Describes every metric (HELP text and units).
pub fn describe() {
    describe_counter!(
        FORWARDED_BYTES,
        Unit::Bytes,
        "Bytes relayed, by direction (outbound: from a local app; inbound: to a local app)."
    );
    describe_counter!(FORWARDED_MESSAGES, "ZMTP messages relayed, by direction.");
    describe_counter!(
        KEYS_SPLIT,
        "Keys split into slice keys in front of a local server."
    );
    describe_counter!(
        SPLIT_REFUSED,
        "Keys above the split threshold left whole, by reason."
    );
    describe_counter!(
        SPLIT_FAILURES,
        "Servers whose traffic was stopped: a request its split layout cannot serve, or a bypass, by reason."
    );
    describe_counter!(
        SPLIT_REQUESTS,
        "Requests for split keys turned into slice-key requests."
    );
    describe_counter!(SLICE_REQUESTS, "Slice-key requests sent to local servers.");
    describe_counter!(JOURNAL_ERRORS, "Journal writes that failed.");
    describe_counter!(
        REQUESTS_HELD_FOR_ORDER,
        "Requests to a local server held for order (ps-lite's server queue may serve a later request first), by the reason they first waited for: earlier_pull, init_in_flight, not_initialized."
    );
    describe_counter!(
        SPLIT_RESPONSES_MERGED,
        "Responses merged from slice-key responses."
    );
    describe_counter!(
        PARSE_ERRORS,
        "Streams closed because their bytes broke ZMTP framing or a limit, by kind."
    );
    describe_counter!(CONNECTIONS_REFUSED, "Connections refused, by reason.");
    describe_counter!(
        REQUESTS_LOST,
        "Requests in flight when their upstream died; ps-lite never resends them."
    );
    describe_counter!(CONNECTIONS, "Connections accepted, by route.");
    describe_gauge!(CONNECTIONS_OPEN, "Connections open now.");
    describe_counter!(
        NOT_PSLITE,
        "Well-framed ZMTP messages that are not ps-lite, forwarded unchanged as fences."
    );
    describe_counter!(
        TUNNEL_ANSWERS,
        "Answers from peer proxies to tunnel requests, by outcome."
    );
    describe_gauge!(
        NODES,
        "Nodes in the job's node table, from the scheduler's ADD_NODE broadcast."
    );
    describe_counter!(
        CLASS_BYTES,
        Unit::Bytes,
        "Bytes handed to output connections by the egress scheduler, by priority class (0 = top)."
    );
    describe_counter!(
        CLASS_MESSAGES,
        "Messages started by the egress scheduler, by priority class."
    );
    describe_histogram!(
        QUEUE_DELAY,
        Unit::Seconds,
        "Time from a message's arrival to its first byte handed out, by priority class."
    );
    describe_counter!(
        PREEMPTIONS,
        "Slices that interrupted a less urgent unfinished message on the same connection."
    );
    describe_counter!(SLICES_SENT, "Slices sent to peer proxies.");
    describe_counter!(
        SLICES_REASSEMBLED,
        "Slices received from peer proxies and reassembled."
    );
    describe_gauge!(
        REASSEMBLY_BYTES,
        Unit::Bytes,
        "Bytes held for reassembly now, over every tunnel session."
    );
    describe_gauge!(
        SCHEDULER_QUEUED_BYTES,
        Unit::Bytes,
        "Bytes queued in the egress scheduler now."
    );
    describe_gauge!(
        PRIORITY_SOURCE,
        "1 for the key-priority source in use (key, learned, map), by source."
    );
    // Make the fixed series exist from the start, so that a scrape before any
    // traffic already shows them at zero.
    for d in [OUTBOUND, INBOUND] {
        counter!(FORWARDED_BYTES, "direction" => d).increment(0);
        counter!(FORWARDED_MESSAGES, "direction" => d).increment(0);
    }
    for kind in PARSE_ERROR_KINDS {
        counter!(PARSE_ERRORS, "kind" => kind).increment(0);
    }
    for name in [
        REQUESTS_LOST,
        PREEMPTIONS,
        NOT_PSLITE,
        KEYS_SPLIT,
        SPLIT_REQUESTS,
        SLICE_REQUESTS,
        SPLIT_RESPONSES_MERGED,
        JOURNAL_ERRORS,
    ] {
        counter!(name).increment(0);
    }
    for reason in crate::core::order::HoldReason::ALL {
        counter!(REQUESTS_HELD_FOR_ORDER, "reason" => reason.label()).increment(0);
    }
    gauge!(NODES).set(0.0);
    counter!(SLICES_SENT).increment(0);
    counter!(SLICES_REASSEMBLED).increment(0);
    gauge!(REASSEMBLY_BYTES).set(0.0);
    gauge!(CONNECTIONS_OPEN).set(0.0);
}

/// Installs the Prometheus exporter on `addr` (call inside the tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(QUEUE_DELAY.into()),
            &QUEUE_DELAY_BUCKETS,
        )?
        .install()?;
    describe();
    Ok(())
}

/// Counts one refused connection.
pub fn refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts one relayed message of `bytes` bytes.
pub fn forwarded(direction: &'static str, bytes: usize) {
    counter!(FORWARDED_MESSAGES, "direction" => direction).increment(1);
    counter!(FORWARDED_BYTES, "direction" => direction).increment(bytes as u64);
}

/// Counts bytes relayed opaquely (not ZMTP).
pub fn forwarded_opaque(direction: &'static str, bytes: u64) {
    counter!(FORWARDED_BYTES, "direction" => direction).increment(bytes);
}

/// The egress scheduler's metrics, registered once (the hot path does no lookups).
#[derive(Debug)]
pub struct EgressMetrics {
    class_bytes: [Counter; 4],
    class_messages: [Counter; 4],
    queue_delay: [Histogram; 4],
    slices_sent: Counter,
    preemptions: Counter,
    queued: Gauge,
}

impl EgressMetrics {
    /// Registers the series with the installed recorder.
    pub fn new() -> EgressMetrics {
        EgressMetrics {
            class_bytes: CLASS_LABELS.map(|c| counter!(CLASS_BYTES, "class" => c)),
            class_messages: CLASS_LABELS.map(|c| counter!(CLASS_MESSAGES, "class" => c)),
            queue_delay: CLASS_LABELS.map(|c| histogram!(QUEUE_DELAY, "class" => c)),
            slices_sent: counter!(SLICES_SENT),
            preemptions: counter!(PREEMPTIONS),
            queued: gauge!(SCHEDULER_QUEUED_BYTES),
        }
    }

    /// Records what the egress scheduler handed to a connection: `len` bytes of a
    /// message of `class`; a slice to a peer proxy if `sliced`; its queue delay on its
    /// first bytes; whether it preempted a less urgent message.
    pub fn transmitted(
        &self,
        class: usize,
        len: u64,
        sliced: bool,
        queue_delay: Option<Duration>,
        preempted: bool,
    ) {
        let class = class.min(CLASS_LABELS.len() - 1);
        self.class_bytes[class].increment(len);
        if let Some(d) = queue_delay {
            self.class_messages[class].increment(1);
            self.queue_delay[class].record(d.as_secs_f64());
        }
        if sliced {
            self.slices_sent.increment(1);
        }
        if preempted {
            self.preemptions.increment(1);
        }
    }

    /// Sets the bytes queued in the egress scheduler.
    pub fn queued(&self, bytes: u64) {
        self.queued.set(bytes as f64);
    }
}

impl Default for EgressMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Moves the reassembly gauge from one session's `before` to its `now`.
pub fn reassembly_held(before: u64, now: u64) {
    if before != now {
        gauge!(REASSEMBLY_BYTES).increment(now as f64 - before as f64);
    }
}

/// Says which key-priority source is in use.
pub fn priority_source(source: &'static str) {
    for s in ["key", "learned", "map"] {
        gauge!(PRIORITY_SOURCE, "source" => s).set(if s == source { 1.0 } else { 0.0 });
    }
}

/// Counts a stream closed on a parse error (`kind`: one of `PARSE_ERROR_KINDS`).
pub fn parse_error(kind: &'static str) {
    debug_assert!(PARSE_ERROR_KINDS.contains(&kind), "{kind}");
    counter!(PARSE_ERRORS, "kind" => kind).increment(1);
}

/// Tracks an open connection until dropped.
#[derive(Debug)]
pub struct OpenConnection(());

impl OpenConnection {
    /// Counts a new connection on `route`.
    pub fn new(route: &'static str) -> OpenConnection {
        counter!(CONNECTIONS, "route" => route).increment(1);
        gauge!(CONNECTIONS_OPEN).increment(1.0);
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_an_alert_relies_on_exists_at_zero_with_help_text() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let text = handle.render();
        for name in [
            REQUESTS_LOST,
            KEYS_SPLIT,
            JOURNAL_ERRORS,
            NODES,
            PARSE_ERRORS,
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
        }
        assert!(text.contains("p3proxy_requests_lost_total 0\n"), "{text}");
        for kind in PARSE_ERROR_KINDS {
            assert!(
                text.contains(&format!("{PARSE_ERRORS}{{kind=\"{kind}\"}} 0\n")),
                "{kind}:\n{text}"
            );
        }
        // Prometheus conventions: counters end in _total, and every name is ours.
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(name.starts_with("p3proxy_"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
    }
}
