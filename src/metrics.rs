//! Every metric the proxy exports: names as constants, described once at start-up,
//! low-cardinality labels only (never keys or addresses). DESIGN.md §9 fixes the
//! names that tools and checks rely on.

use std::net::SocketAddr;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

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
    // Make the fixed series exist from the start, so that a scrape before any
    // traffic already shows them at zero.
    for d in [OUTBOUND, INBOUND] {
        counter!(FORWARDED_BYTES, "direction" => d).increment(0);
        counter!(FORWARDED_MESSAGES, "direction" => d).increment(0);
    }
    counter!(REQUESTS_LOST).increment(0);
    gauge!(CONNECTIONS_OPEN).set(0.0);
}

/// Installs the Prometheus exporter on `addr` (call inside the tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
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

/// Counts a stream closed on a parse error.
pub fn parse_error(kind: &'static str) {
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
