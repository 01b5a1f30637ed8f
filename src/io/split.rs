//! The shell around `core::split`: feeds it the messages going to and coming from
//! local servers, waits where it says hold, logs and counts what it reports, and
//! tracks which workers' connections reach which server.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use p3proxy_parsers::pslite::{MessageKind, Meta, PsMessage};
use tokio::sync::futures::Notified;

use super::state::{SessionInfo, Shared};
use crate::core::journal::Record;
use crate::core::order::HoldReason;
use crate::core::slice::Part;
use crate::core::split::{
    real_keys, DataRequest, Failure, Pieces, RequestPlan, ResponsePlan, SplitEvent, Splitter,
};
use crate::core::topology::node_id_from_identity;
use crate::metrics;

/// What goes out instead of one message.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// The message itself.
    Pass,
    /// These messages (wire pieces) instead.
    Replace(Vec<Vec<Bytes>>),
    /// Nothing (a slice response held for its merge).
    Absorb,
    /// A merged response for `key` (wire pieces) instead.
    Merged(u64, Vec<Bytes>),
    /// Not yet, for this reason (`core::order`), and ask again by this time at the
    /// latest if nothing releases it first. Write out what went before, wait with
    /// [`OrderWait`], and ask again.
    Behind(HoldReason, Option<Instant>),
    /// The message itself, as a part the peer proxy merges.
    Part(Part),
}

/// A ps-lite message as frames of pieces (a relayed message, or a reassembled one).
pub(crate) struct Unit<'a> {
    pub(crate) meta: &'a Meta,
    pub(crate) meta_frame: &'a Bytes,
    pub(crate) data: &'a [Pieces],
}

impl<'a> Unit<'a> {
    /// Data frames of a decoded message as single pieces.
    pub(crate) fn data_of(ps: &PsMessage) -> Vec<Pieces> {
        ps.data
            .iter()
            .map(|f| Pieces::one(f.body.clone()))
            .collect()
    }
}

impl Shared {
    /// Asks the splitter (under the core's lock); then, with the lock let go, logs,
    /// counts and journals what it reported (a layout is on disk before its first
    /// slice request goes out, which is after this returns) and wakes held requests if
    /// it released any.
    pub(crate) fn with_splitter<R>(&self, ask: impl FnOnce(&mut Splitter) -> R) -> R {
        let (answer, events) = {
            let mut core = self.core();
            let answer = ask(&mut core.splitter);
            self.wake_held(&mut core.splitter);
            let events: Vec<SplitEvent> =
                std::iter::from_fn(|| core.splitter.poll_event()).collect();
            (answer, events)
        };
        self.split_events(events);
        answer
    }

    /// Logs and counts what the splitter reported.
    fn split_events(&self, events: Vec<SplitEvent>) {
        for event in events {
            match event {
                SplitEvent::Split {
                    server,
                    layout,
                    next_slice,
                } => {
                    // On disk before the first slice request goes out.
                    self.journal(
                        &Record::Layout {
                            server,
                            layout,
                            next_slice,
                        },
                        true,
                    );
                    metrics::count(metrics::KEYS_SPLIT, 1);
                    tracing::info!(%server, key = layout.key, bytes = layout.total, slices = layout.count, first_slice_key = layout.first, "key split");
                }
                SplitEvent::Refused {
                    server,
                    key,
                    reason,
                } => {
                    metrics::count_by(metrics::SPLIT_REFUSED, reason.label(), 1);
                    tracing::warn!(%server, key, reason = reason.label(), "key not split");
                }
                SplitEvent::Failed(f) => {
                    metrics::count_by(metrics::SPLIT_FAILURES, f.reason, 1);
                    tracing::error!(server = %f.server, key = ?f.key, reason = f.reason, detail = %f.detail,
                        "STOPPING the server's traffic: a request its split layout cannot serve (closing its connections rather than corrupting the job)");
                }
            }
        }
    }

    /// A message on its way to the ROUTER of `info.dst`: if that is a local server,
    /// the splitter decides what goes instead. `None` frames: not ps-lite (a fence).
    /// `since`: when the message was first asked about (its holds are bounded from
    /// then).
    pub(crate) async fn split_request(
        &self,
        info: &SessionInfo,
        unit: Option<Unit<'_>>,
        since: Instant,
    ) -> Result<Outgoing, Failure> {
        if !self.core().splitter.is_server(info.dst) {
            return Ok(Outgoing::Pass);
        }
        let Some(unit) = unit else {
            let r = self.with_splitter(|sp| sp.on_fence(info.dst));
            return r.map_or(Ok(Outgoing::Pass), Err);
        };
        let checked = match PsMessage::new(unit.meta.clone(), Vec::new()).kind() {
            MessageKind::Control(cmd) => {
                Some(self.with_splitter(|sp| sp.on_control(info.dst, cmd)))
            }
            MessageKind::Command {
                request: true,
                head,
            } => {
                let body = unit.meta.body.as_deref().unwrap_or_default();
                Some(self.with_splitter(|sp| sp.on_command(info.dst, head, body)))
            }
            MessageKind::Command { .. } => Some(None),
            MessageKind::Data { request, .. } => (!request).then_some(None),
        };
        if let Some(result) = checked {
            return result.map_or(Ok(Outgoing::Pass), Err);
        }
        let Some(sender) = node_id_from_identity(&info.identity) else {
            return Ok(Outgoing::Pass);
        };
        let keys = unit
            .data
            .first()
            .and_then(|p| p.le_words(u64::from_le_bytes))
            .unwrap_or_default();
        let empty = Pieces::default();
        let vals = unit.data.get(1).unwrap_or(&empty);
        let lens = unit
            .data
            .get(2)
            .and_then(|p| p.le_words(i32::from_le_bytes));
        let req = DataRequest {
            meta: unit.meta,
            meta_frame: unit.meta_frame,
            keys: &keys,
            vals,
            lens: lens.as_deref(),
        };
        tracing::trace!(dst = %info.dst, sender, ?keys, vals = vals.len, ?lens, head = unit.meta.head(), "data request to a local server");
        // Init pushes come from one worker only: they pair with nothing.
        let paired = unit.meta.is_push() && {
            let core = self.core();
            real_keys(unit.meta.head(), &keys)
                .iter()
                .all(|&k| core.splitter.knows_key(info.dst, k))
        };
        loop {
            // Armed before asking, so a change in between is not missed.
            let changed = self.order_released.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (plan, ask_by) = self.with_splitter(|sp| {
                sp.on_data_request_at(info.dst, sender, &req, since, Instant::now())
            });
            if paired && matches!(plan, RequestPlan::Forward | RequestPlan::Split(_)) {
                self.push_arrived(info.dst, real_keys(unit.meta.head(), &keys), sender, since);
            }
            match plan {
                RequestPlan::Forward => return Ok(Outgoing::Pass),
                RequestPlan::Split(msgs) => {
                    metrics::count(metrics::SPLIT_REQUESTS, 1);
                    metrics::count(metrics::SLICE_REQUESTS, msgs.len() as u64);
                    return Ok(Outgoing::Replace(msgs));
                }
                RequestPlan::Stop(f) => return Err(f),
                RequestPlan::Hold => {
                    tracing::debug!(dst = %info.dst, "first init push held until every worker reaches the server");
                    // A worker connecting wakes it; the core says when the hold ends.
                    let until = ask_by.unwrap_or_else(Instant::now);
                    let _ = tokio::time::timeout_at(until.into(), changed).await;
                }
                RequestPlan::Behind(reason) => return Ok(Outgoing::Behind(reason, ask_by)),
            }
        }
    }

    /// `worker`'s push of `keys` reached local server `server`'s proxy at `at`: how far
    /// behind the first worker's it came, once every worker's is in.
    pub(crate) fn push_arrived(&self, server: SocketAddr, keys: &[u64], worker: i32, at: Instant) {
        // `ago_us`: the arrival was `at`, this long before the line is written.
        tracing::trace!(%server, worker, ?keys, ago_us = at.elapsed().as_micros() as u64, "push arrived");
        let lags: Vec<Duration> = {
            let mut core = self.core();
            keys.iter()
                .filter_map(|&k| core.pair_lag.push_arrived(server, k, worker, at))
                .collect()
        };
        for lag in lags {
            metrics::observe(metrics::PUSH_PAIR_LAG, lag.as_secs_f64());
        }
    }

    /// A message from a local app's DEALER: if it is a local server's data response,
    /// the splitter may hold or merge it.
    pub(crate) fn split_response(
        &self,
        info: &SessionInfo,
        ps: &PsMessage,
        defer: bool,
    ) -> Result<Outgoing, Failure> {
        if !matches!(ps.kind(), MessageKind::Data { request: false, .. }) {
            return Ok(Outgoing::Pass);
        }
        let Some((server, worker)) = self.response_parties(info) else {
            return Ok(Outgoing::Pass);
        };
        let data = Unit::data_of(ps);
        let plan = self.with_splitter(|sp| {
            sp.on_data_response(server, worker, &ps.meta, &ps.meta_frame.body, &data, defer)
        });
        match plan {
            ResponsePlan::Forward => Ok(Outgoing::Pass),
            ResponsePlan::Absorb => Ok(Outgoing::Absorb),
            ResponsePlan::Merged { key, pieces } => {
                metrics::count(metrics::SPLIT_RESPONSES_MERGED, 1);
                Ok(Outgoing::Merged(key, pieces))
            }
            ResponsePlan::Part(part) => Ok(Outgoing::Part(part)),
            ResponsePlan::Stop(f) => Err(f),
        }
    }

    /// The local server a session's responses come from and the worker they go to,
    /// where the splitter may act on them (`None`: they pass as they are).
    pub(crate) fn response_parties(&self, info: &SessionInfo) -> Option<(i32, i32)> {
        let server = node_id_from_identity(&info.identity)?;
        self.core().splitter.server_addr(server)?;
        Some((server, self.node_at(info.dst)?))
    }

    /// Whether the splitter and the order rules act on a session's data messages of
    /// this direction (`request`): requests to a local server they front, responses
    /// from one. Those that no rule acts on pass as they come.
    pub(crate) fn splitter_acts_on(&self, info: &SessionInfo, request: bool) -> bool {
        if request {
            self.core().splitter.is_server(info.dst)
        } else {
            self.response_parties(info).is_some()
        }
    }

    /// Where a decoded message from a session's DEALER goes: a local server's
    /// response may be merged, a request to a local server split.
    /// `defer`: the session is a sliced tunnel, whose peer proxy merges parts.
    pub(crate) async fn split_route(
        &self,
        info: &SessionInfo,
        ps: &PsMessage,
        defer: bool,
        since: Instant,
    ) -> Result<Outgoing, Failure> {
        if matches!(ps.kind(), MessageKind::Data { request: false, .. }) {
            return self.split_response(info, ps, defer);
        }
        if !self.splitter_acts_on(info, true) {
            return Ok(Outgoing::Pass);
        }
        let data = Unit::data_of(ps);
        let unit = Unit {
            meta: &ps.meta,
            meta_frame: &ps.meta_frame.body,
            data: &data,
        };
        self.split_request(info, Some(unit), since).await
    }

    /// A split server holds keys a bypass would corrupt.
    pub(crate) fn pinned(&self, addr: SocketAddr) -> bool {
        self.core().splitter.pinned(addr)
    }
}

/// A message the splitter may hold for order ([`Outgoing::Behind`]): armed before
/// each ask, so an answer in between is not missed; counts the request once, by the
/// reason it first waited for, and warns if it waits long.
pub(crate) struct OrderWait<'a> {
    shared: &'a Shared,
    /// When the message was first asked about.
    pub(crate) since: Instant,
    held: bool,
    warned: bool,
}

/// A request held this long is logged as a warning (a server that does not answer).
const HELD_WARN: Duration = Duration::from_secs(5);

impl Drop for OrderWait<'_> {
    fn drop(&mut self) {
        if self.held {
            self.shared
                .held_now
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl<'a> OrderWait<'a> {
    pub(crate) fn new(shared: &'a Shared) -> OrderWait<'a> {
        OrderWait {
            shared,
            since: Instant::now(),
            held: false,
            warned: false,
        }
    }

    /// The wake-up to arm (`enable`) before asking the splitter.
    pub(crate) fn armed(&self) -> Notified<'a> {
        self.shared.order_released.notified()
    }

    /// After [`Outgoing::Behind`] (and writing out what went before): waits for
    /// what it is held for, or a short while.
    pub(crate) async fn wait(
        &mut self,
        info: &SessionInfo,
        reason: HoldReason,
        ask_by: Option<Instant>,
        released: Pin<&mut Notified<'a>>,
    ) {
        if !self.held {
            self.held = true;
            self.shared
                .held_now
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::count_by(metrics::REQUESTS_HELD_FOR_ORDER, reason.label(), 1);
            tracing::debug!(dst = %info.dst, reason = reason.label(), "request held until {}", reason.describe());
        }
        if !self.warned && self.since.elapsed() >= HELD_WARN {
            self.warned = true;
            tracing::warn!(dst = %info.dst, reason = reason.label(), waited_s = self.since.elapsed().as_secs(),
                "a request still waits for {}", reason.describe());
        }
        // Woken by what the splitter says changed; besides that, only at the warning
        // and by the time the core gave (a key never initialized: it goes anyway then).
        let warn_at = (!self.warned).then(|| self.since + HELD_WARN);
        match warn_at.into_iter().chain(ask_by).min() {
            Some(at) => {
                let _ = tokio::time::timeout_at(at.into(), released).await;
            }
            None => released.await,
        }
    }
}

/// While a session lives, the splitter knows its worker reaches a local server (or
/// that a local server's responses reach a worker); when it ends, its requests in
/// flight are forgotten.
pub(crate) struct SplitLink {
    shared: Arc<Shared>,
    link: Link,
}

enum Link {
    Requests { server: SocketAddr, worker: i32 },
    Responses { server: i32, worker: i32 },
}

impl SplitLink {
    /// The link a session from `info.identity` to `info.dst` makes, if any.
    pub(crate) fn new(shared: &Arc<Shared>, info: &SessionInfo) -> Option<SplitLink> {
        let id = node_id_from_identity(&info.identity)?;
        let dst_node = shared.node_at(info.dst);
        let link = {
            let mut core = shared.core();
            let sp = &mut core.splitter;
            if sp.is_server(info.dst) {
                sp.worker_connected(info.dst, id);
                // Rank 0's first init may wait for this worker.
                shared.wake_held(sp);
                Link::Requests {
                    server: info.dst,
                    worker: id,
                }
            } else if sp.server_addr(id).is_some() {
                let worker = dst_node?;
                sp.responses_opened(id, worker);
                Link::Responses { server: id, worker }
            } else {
                return None;
            }
        };
        Some(SplitLink {
            shared: shared.clone(),
            link,
        })
    }
}

impl Drop for SplitLink {
    fn drop(&mut self) {
        let mut core = self.shared.core();
        let sp = &mut core.splitter;
        match self.link {
            Link::Requests { server, worker } => sp.worker_disconnected(server, worker),
            Link::Responses { server, worker } => sp.responses_closed(server, worker),
        }
        self.shared.wake_held(sp);
    }
}
