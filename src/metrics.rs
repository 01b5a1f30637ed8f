//! Every metric the proxy exports, in one table: each row gives the name (a constant
//! of its own), the kind, the unit, the HELP text and the label, and which series exist
//! at zero from the start; `describe` and the zero series are driven by it, and the
//! rest of the crate records through the functions here (no raw `counter!` outside).
//! Low-cardinality labels only (never keys or addresses). DESIGN.md §9 fixes the names
//! that tools and checks rely on.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::core::live::LiveEvent;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// Which series of a metric exist from the start (at zero), so that a scrape before
/// any traffic already shows them and the first event is an increase a rate sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    /// None (labelled by something open-ended, or registered by their user).
    No,
    /// The one series without labels.
    Plain,
    /// One series per label value.
    Each(&'static [&'static str]),
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The exported name.
    pub name: &'static str,
    /// Its kind.
    pub kind: Kind,
    /// Its unit, if it has one.
    pub unit: Option<Unit>,
    /// The HELP text.
    pub help: &'static str,
    /// Its label's name, if it has one (every metric has at most one).
    pub label: Option<&'static str>,
    /// The series exported at zero from the start.
    pub zero: Zero,
}

/// Declares the table: a constant per name, and [`TABLE`] with every row.
macro_rules! metrics_table {
    ($(
        $(#[doc = $doc:literal])*
        $konst:ident = $name:literal, $kind:ident, $unit:expr, $label:expr, $zero:expr, $help:literal;
    )*) => {
        $(
            $(#[doc = $doc])*
            pub const $konst: &str = $name;
        )*
        /// Every metric the proxy exports.
        pub const TABLE: &[Metric] = &[
            $(Metric {
                name: $name,
                kind: Kind::$kind,
                unit: $unit,
                help: $help,
                label: $label,
                zero: $zero,
            },)*
        ];
    };
}

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

const DIRECTIONS: [&str; 2] = [OUTBOUND, INBOUND];
/// How a frame body passed: spliced, or copied through a buffer.
pub const PASS_HOW: [&str; 2] = ["splice", "copy"];
/// Directions of `ORDER_RECORDS`.
pub const ORDER_DIRECTIONS: [&str; 2] = ["sent", "received"];
const HOLD_REASONS: [&str; 3] = crate::core::order::HoldReason::LABELS;

metrics_table! {
    /// Bytes relayed, by `direction` (`outbound`: from a local app; `inbound`: to a local app).
    FORWARDED_BYTES = "p3proxy_forwarded_bytes_total", Counter, Some(Unit::Bytes), Some("direction"), Zero::Each(&DIRECTIONS),
        "Bytes relayed, by direction (outbound: from a local app; inbound: to a local app).";
    /// ZMTP messages relayed, by `direction`.
    FORWARDED_MESSAGES = "p3proxy_forwarded_messages_total", Counter, None, Some("direction"), Zero::Each(&DIRECTIONS),
        "ZMTP messages relayed, by direction.";
    /// Streams closed on bytes that failed to parse, by `kind`.
    PARSE_ERRORS = "p3proxy_parse_errors_total", Counter, None, Some("kind"), Zero::Each(&PARSE_ERROR_KINDS),
        "Streams closed because their bytes broke ZMTP framing or a limit, by kind.";
    /// Connections refused, by `reason`.
    CONNECTIONS_REFUSED = "p3proxy_connections_refused_total", Counter, None, Some("reason"), Zero::No,
        "Connections refused, by reason.";
    /// Requests in flight when their upstream died (ps-lite never resends them).
    REQUESTS_LOST = "p3proxy_requests_lost_total", Counter, None, None, Zero::Plain,
        "Requests in flight when their upstream died; ps-lite never resends them.";
    /// Connections accepted, by `route` (tunnel, direct, same_host, opaque, tunnel_in).
    CONNECTIONS = "p3proxy_connections_total", Counter, None, Some("route"), Zero::No,
        "Connections accepted, by route.";
    /// Connections open now.
    CONNECTIONS_OPEN = "p3proxy_connections_open", Gauge, None, None, Zero::Plain,
        "Connections open now.";
    /// Messages forwarded as fences because they are not ps-lite.
    NOT_PSLITE = "p3proxy_not_pslite_messages_total", Counter, None, None, Zero::Plain,
        "Well-framed ZMTP messages that are not ps-lite, forwarded unchanged as fences.";
    /// Tunnel answers received, by `outcome`.
    TUNNEL_ANSWERS = "p3proxy_tunnel_answers_total", Counter, None, Some("outcome"), Zero::No,
        "Answers from peer proxies to tunnel requests, by outcome.";
    /// Nodes in the node table learned from ADD_NODE.
    NODES = "p3proxy_nodes", Gauge, None, None, Zero::Plain,
        "Nodes in the job's node table, from the scheduler's ADD_NODE broadcast.";
    /// Bytes handed to output connections by the egress scheduler, by priority `class`.
    CLASS_BYTES = "p3proxy_class_bytes_total", Counter, Some(Unit::Bytes), Some("class"), Zero::No,
        "Bytes handed to output connections by the egress scheduler, by priority class (0 = top).";
    /// Messages whose first byte the egress scheduler handed out, by `class`.
    CLASS_MESSAGES = "p3proxy_class_messages_total", Counter, None, Some("class"), Zero::No,
        "Messages started by the egress scheduler, by priority class.";
    /// Time from a message's arrival to its first byte handed out, by `class`.
    QUEUE_DELAY = "p3proxy_queue_delay_seconds", Histogram, Some(Unit::Seconds), Some("class"), Zero::No,
        "Time from a message's arrival to its first byte handed out, by priority class.";
    /// Slices of a message that interrupted a less urgent unfinished one on its connection.
    PREEMPTIONS = "p3proxy_preemptions_total", Counter, None, None, Zero::Plain,
        "Slices that interrupted a less urgent unfinished message on the same connection.";
    /// Frame bodies that went from socket to socket without being read in, by `how`.
    PASSED_BODIES = "p3proxy_passed_bodies_total", Counter, None, Some("how"), Zero::Each(&PASS_HOW),
        "Frame bodies relayed without being read into the proxy: by splice(2), or copied through a small buffer where the kernel refused.";
    /// Their bytes, by `how`.
    PASSED_BYTES = "p3proxy_passed_bytes_total", Counter, Some(Unit::Bytes), Some("how"), Zero::Each(&PASS_HOW),
        "Bytes of frame bodies relayed without being read into the proxy, by how.";
    /// Slices sent to peer proxies.
    SLICES_SENT = "p3proxy_slices_sent_total", Counter, None, None, Zero::Plain,
        "Slices sent to peer proxies.";
    /// Times a tunnel lane waited for its peer host's pace (`pace`).
    PACED_WAITS = "p3proxy_paced_waits_total", Counter, None, None, Zero::Plain,
        "Times a tunnel connection waited for its peer host's pace (pace = true: link_rate_bps / workers per peer host).";
    /// Slices received from peer proxies and reassembled.
    SLICES_REASSEMBLED = "p3proxy_slices_reassembled_total", Counter, None, None, Zero::Plain,
        "Slices received from peer proxies and reassembled.";
    /// Bytes held for reassembly now, over every tunnel session.
    REASSEMBLY_BYTES = "p3proxy_reassembly_bytes", Gauge, Some(Unit::Bytes), None, Zero::Plain,
        "Bytes held for reassembly now, over every tunnel session.";
    /// Bytes queued in the egress scheduler now.
    SCHEDULER_QUEUED_BYTES = "p3proxy_scheduler_queued_bytes", Gauge, Some(Unit::Bytes), None, Zero::No,
        "Bytes queued in the egress scheduler now.";
    /// 1 for the key-priority source in use, by `source`.
    PRIORITY_SOURCE = "p3proxy_priority_source", Gauge, None, Some("source"), Zero::No,
        "1 for the key-priority source in use (key, learned, map), by source.";
    /// The worker whose learned order this proxy uses.
    ORDER_ORIGIN = "p3proxy_order_origin", Gauge, None, None, Zero::No,
        "Node id of the worker whose learned order this proxy uses: the job's lowest that proxies passed on (absent until one is known).";
    /// Records of the job's order passed between proxies, by `direction`.
    ORDER_RECORDS = "p3proxy_order_records_total", Counter, None, Some("direction"), Zero::Each(&ORDER_DIRECTIONS),
        "Records of the job's learned order passed on to peer proxies (sent) or taken from them (received).";
    /// Keys split into slice keys in front of a local server.
    KEYS_SPLIT = "p3proxy_keys_split_total", Counter, None, None, Zero::Plain,
        "Keys split into slice keys in front of a local server.";
    /// Keys above the split threshold left whole, by `reason`.
    SPLIT_REFUSED = "p3proxy_split_refused_total", Counter, None, Some("reason"), Zero::No,
        "Keys above the split threshold left whole, by reason.";
    /// Servers whose traffic was stopped because a split layout could not serve a
    /// request (or a response bypassed the proxy), by `reason`.
    SPLIT_FAILURES = "p3proxy_split_failures_total", Counter, None, Some("reason"), Zero::No,
        "Servers whose traffic was stopped: a request its split layout cannot serve, or a bypass, by reason.";
    /// Requests for split keys turned into slice-key requests.
    SPLIT_REQUESTS = "p3proxy_split_requests_total", Counter, None, None, Zero::Plain,
        "Requests for split keys turned into slice-key requests.";
    /// Slice-key requests sent to local servers.
    SLICE_REQUESTS = "p3proxy_slice_requests_total", Counter, None, None, Zero::Plain,
        "Slice-key requests sent to local servers.";
    /// Responses merged from slice-key responses.
    SPLIT_RESPONSES_MERGED = "p3proxy_split_responses_merged_total", Counter, None, None, Zero::Plain,
        "Responses merged from slice-key responses.";
    /// Requests to a local server held for order, by the `reason` they first waited for
    /// (`core::order`: ps-lite's server queue is not first-in first-out).
    REQUESTS_HELD_FOR_ORDER = "p3proxy_requests_held_for_order_total", Counter, None, Some("reason"), Zero::Each(&HOLD_REASONS),
        "Requests to a local server held for order (ps-lite's server queue may serve a later request first), by the reason they first waited for: earlier_pull, init_in_flight, not_initialized.";
    /// Time between the first and the last worker's push of a key reaching a local
    /// server's proxy (the key waits that long for its aggregation).
    PUSH_PAIR_LAG = "p3proxy_push_pair_lag_seconds", Histogram, Some(Unit::Seconds), None, Zero::No,
        "Time between the first and the last worker's push of a key reaching a local server's proxy: how long the key waits at the server for its slowest worker.";
    /// The job's iteration period as this proxy sees it: the median of the last five
    /// iterations of the workers on this host (`core::live`).
    ITERATION = "p3proxy_iteration_seconds", Gauge, Some(Unit::Seconds), None, Zero::No,
        "The job's iteration period as this proxy sees it: the median of the last 5 iterations of the workers on this host (first request to the next iteration's first request).";
    /// Every iteration period of the workers on this host.
    ITERATION_PERIODS = "p3proxy_iteration_period_seconds", Histogram, Some(Unit::Seconds), None, Zero::No,
        "Iteration periods of the workers on this host, one observation per iteration.";
    /// How long the next forward pass waited for its first layer (median of the last five).
    FIRST_LAYER_WAIT = "p3proxy_first_layer_wait_seconds", Gauge, Some(Unit::Seconds), None, Zero::No,
        "How long the next forward pass waited for its first layer: from a worker's last request of an iteration to the response for the key it pushed last; the median of the last 5 iterations.";
    /// The share of the iteration from its first request to its last response.
    COMM_SHARE = "p3proxy_communication_share_ratio", Gauge, None, None, Zero::No,
        "The share of the iteration period from its first request to its last response (median of the last 5 iterations).";
    /// What an iteration could save against the ideal bound (with `link_rate_bps`).
    ESTIMATED_SAVING = "p3proxy_estimated_saving_seconds", Gauge, Some(Unit::Seconds), None, Zero::No,
        "What an iteration could save against the ideal bound (compute, or the worker's busier link direction at link_rate_bps, whichever is longer); the median of the last 5 iterations. Only with link_rate_bps set.";
    /// While requests wait for answers, the share of the time no answer is on the link
    /// (`core::answer_idle`; with `link_rate_bps`).
    ANSWER_IDLE = "p3proxy_answer_idle_ratio", Gauge, None, None, Zero::No,
        "While data requests relayed by this proxy wait for their answers, the share of the time no answer is on the link (answers held at link_rate_bps): high when a server waits for its slowest worker and the answers pile up at the end. Over the last window of at least 1 s of waiting; only with link_rate_bps set.";
    /// The age of the oldest request relayed and not yet answered: the hang detector.
    OLDEST_REQUEST_AGE = "p3proxy_oldest_request_age_seconds", Gauge, Some(Unit::Seconds), None, Zero::Plain,
        "Age of the oldest data request relayed by this proxy and not yet answered (0: none); a job that hangs makes it grow.";
    /// Data requests relayed and not yet answered.
    REQUESTS_UNANSWERED = "p3proxy_requests_unanswered", Gauge, None, None, Zero::Plain,
        "Data requests relayed by this proxy and not yet answered.";
    /// From a request to its response, by the responding `server` (its node id).
    SERVER_REQUEST_LATENCY = "p3proxy_server_request_seconds", Histogram, Some(Unit::Seconds), Some("server"), Zero::No,
        "Time from a data request to its response as this proxy saw them, by server node id: a slow server or an uneven key spread shows here.";
    /// Request and response bytes, by `server`.
    SERVER_BYTES = "p3proxy_server_bytes_total", Counter, Some(Unit::Bytes), Some("server"), Zero::No,
        "Data bytes of answered requests and their responses, by server node id.";
    /// Journal writes that failed.
    JOURNAL_ERRORS = "p3proxy_journal_errors_total", Counter, None, None, Zero::Plain,
        "Journal writes that failed.";
}

/// Describes every metric of [`TABLE`] (HELP text and units) and makes its zero series
/// exist.
pub fn describe() {
    for m in TABLE {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
        let values: &[&'static str] = match m.zero {
            Zero::No => continue,
            Zero::Plain => &[""],
            Zero::Each(values) => values,
        };
        for &v in values {
            let labels: Vec<(&'static str, &'static str)> = match m.label {
                Some(l) if !v.is_empty() => vec![(l, v)],
                _ => Vec::new(),
            };
            match m.kind {
                Kind::Counter => counter!(m.name, &labels).increment(0),
                Kind::Gauge => gauge!(m.name, &labels).set(0.0),
                Kind::Histogram => {}
            }
        }
    }
}

/// The row of `name`.
fn row(name: &str) -> &'static Metric {
    TABLE
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the metrics table"))
}

/// Counts `n` events of the unlabelled counter `name` (a constant of this module).
pub fn count(name: &'static str, n: u64) {
    debug_assert!(
        row(name).label.is_none() && row(name).kind == Kind::Counter,
        "{name}"
    );
    counter!(name).increment(n);
}

/// Counts `n` events of counter `name` with its label set to `value`.
pub fn count_by(name: &'static str, value: &'static str, n: u64) {
    let label = row(name)
        .label
        .unwrap_or_else(|| panic!("{name} has no label"));
    counter!(name, label => value).increment(n);
}

/// Records `seconds` in the unlabelled histogram `name`.
pub fn observe(name: &'static str, seconds: f64) {
    debug_assert!(
        row(name).label.is_none() && row(name).kind == Kind::Histogram,
        "{name}"
    );
    histogram!(name).record(seconds);
}

/// Sets the unlabelled gauge `name`.
pub fn set(name: &'static str, value: f64) {
    debug_assert!(
        row(name).label.is_none() && row(name).kind == Kind::Gauge,
        "{name}"
    );
    gauge!(name).set(value);
}

/// Iteration period buckets, seconds.
const ITERATION_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
];
/// Server request latency buckets, seconds: a small pull to a synchronous round.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// Installs the Prometheus recorder (call inside the tokio runtime); the handle
/// renders the exposition (`io::admin` serves it with the admin endpoints).
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(ITERATION_PERIODS.into()),
            &ITERATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(SERVER_REQUEST_LATENCY.into()),
            &LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(QUEUE_DELAY.into()),
            &QUEUE_DELAY_BUCKETS,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PUSH_PAIR_LAG.into()),
            &QUEUE_DELAY_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// What the job watch reported, with its estimates after it.
#[derive(Debug)]
pub struct JobEvents {
    /// The events, in order.
    pub events: Vec<LiveEvent>,
    /// The iteration estimate.
    pub iteration: Option<Duration>,
    /// The first-layer wait estimate.
    pub first_layer_wait: Option<Duration>,
    /// The communication share estimate.
    pub comm_share: Option<f64>,
    /// The saving estimate.
    pub saving: Option<Duration>,
}

/// Records what the job watch reported.
pub fn job_events(job: &JobEvents) {
    for ev in &job.events {
        match *ev {
            LiveEvent::Iteration { period, .. } => {
                histogram!(ITERATION_PERIODS).record(period.as_secs_f64());
            }
            LiveEvent::FirstLayerWait(_) => {}
            LiveEvent::Answered {
                server,
                latency,
                bytes,
            } => {
                let server = server.to_string();
                histogram!(SERVER_REQUEST_LATENCY, "server" => server.clone())
                    .record(latency.as_secs_f64());
                counter!(SERVER_BYTES, "server" => server).increment(bytes);
            }
        }
    }
    if let Some(d) = job.iteration {
        gauge!(ITERATION).set(d.as_secs_f64());
    }
    if let Some(d) = job.first_layer_wait {
        gauge!(FIRST_LAYER_WAIT).set(d.as_secs_f64());
    }
    if let Some(r) = job.comm_share {
        gauge!(COMM_SHARE).set(r);
    }
    if let Some(d) = job.saving {
        gauge!(ESTIMATED_SAVING).set(d.as_secs_f64());
    }
}

/// The answers' idle share of the last window with requests waiting.
pub fn answer_idle(share: f64) {
    gauge!(ANSWER_IDLE).set(share);
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
    paced_waits: Counter,
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
            paced_waits: counter!(PACED_WAITS),
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

    /// Counts a lane that waited for its peer host's pace.
    pub fn paced_wait(&self) {
        self.paced_waits.increment(1);
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

/// The job's order in use is worker `origin`'s.
pub fn order_origin(origin: u32) {
    gauge!(ORDER_ORIGIN).set(f64::from(origin));
}

/// Counts an order record passed on (`sent`) or taken from a peer (`received`).
pub fn order_record(direction: &'static str) {
    debug_assert!(ORDER_DIRECTIONS.contains(&direction), "{direction}");
    counter!(ORDER_RECORDS, "direction" => direction).increment(1);
}

/// Counts a stream closed on a parse error (`kind`: one of `PARSE_ERROR_KINDS`).
pub fn parse_error(kind: &'static str) {
    debug_assert!(PARSE_ERROR_KINDS.contains(&kind), "{kind}");
    counter!(PARSE_ERRORS, "kind" => kind).increment(1);
}

/// Connections open now, by route (for `/debug/state`).
static OPEN_BY_ROUTE: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Connections open now, by route.
pub fn open_by_route() -> Vec<(&'static str, u64)> {
    let open = OPEN_BY_ROUTE.lock().unwrap_or_else(|e| e.into_inner());
    open.iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| (*r, *n))
        .collect()
}

/// Tracks an open connection until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    route: &'static str,
}

impl OpenConnection {
    /// Counts a new connection on `route`.
    pub fn new(route: &'static str) -> OpenConnection {
        counter!(CONNECTIONS, "route" => route).increment(1);
        gauge!(CONNECTIONS_OPEN).increment(1.0);
        *OPEN_BY_ROUTE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route)
            .or_insert(0) += 1;
        OpenConnection { route }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_OPEN).decrement(1.0);
        if let Some(n) = OPEN_BY_ROUTE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.route)
        {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_each_metric_once_and_its_zero_series_exist_with_help() {
        let mut names: Vec<_> = TABLE.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a name twice");
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let text = handle.render();
        for m in TABLE {
            let zero = " 0\n";
            match m.zero {
                Zero::No => {}
                Zero::Plain => {
                    assert!(m.label.is_none(), "{}", m.name);
                    assert!(
                        text.contains(&format!("\n{}{zero}", m.name)),
                        "{}:\n{text}",
                        m.name
                    );
                }
                Zero::Each(values) => {
                    let label = m.label.expect("a labelled zero needs a label");
                    for v in values {
                        let series = format!("{}{{{label}=\"{v}\"}}{zero}", m.name);
                        assert!(text.contains(&series), "{series}:\n{text}");
                    }
                }
            }
            if m.zero != Zero::No {
                assert!(
                    text.contains(&format!("# HELP {} {}", m.name, m.help)),
                    "{}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn recording_uses_the_tables_label() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            count_by(SPLIT_REFUSED, "not_dense", 2);
            count_by(REQUESTS_HELD_FOR_ORDER, "init_in_flight", 1);
            count(KEYS_SPLIT, 3);
            set(NODES, 5.0);
        });
        let text = handle.render();
        for series in [
            "p3proxy_split_refused_total{reason=\"not_dense\"} 2\n",
            "p3proxy_requests_held_for_order_total{reason=\"init_in_flight\"} 1\n",
            "p3proxy_keys_split_total 3\n",
            "p3proxy_nodes 5\n",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }

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
