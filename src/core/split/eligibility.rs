//! Whether a server's keys may be split, and the init decision (DESIGN.md §7): the
//! refusals, the conditions that block splitting before a split and stop the
//! server's traffic after one, and the layout of a key decided at its init push.

use std::net::SocketAddr;

use p3proxy_parsers::mxnet::{CommandType, DataHandleType, RequestType, ServerRanges};
use p3proxy_parsers::pslite::ControlCommand;

use super::super::optimizer::optimizer_verdict_in;
use super::{
    Correlation, DataRequest, Failure, KeyState, Layout, RequestPlan, SplitEvent, Splitter,
    MAX_SLICE_KEYS, SLICE_KEY_BASE,
};

/// Why splitting is refused for a server's keys (metric label via [`Refusal::label`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A worker of the node table does not reach the server through this proxy.
    WorkerNotProxied,
    /// This proxy did not see the server register.
    HistoryIncomplete,
    /// No node table (the scheduler's host runs no proxy).
    NoNodeTable,
    /// The first init came before `kSyncMode`.
    NotSyncMode,
    /// Gradient compression is on.
    Compression,
    /// ps-lite ACKs (`PS_RESEND`): duplicate detection keys on timestamps.
    Resend,
    /// A command MXNet 1.9.1 does not send.
    UnknownCommand,
    /// A message that is not ps-lite went to the server.
    NotPslite,
    /// The optimizer is not allowlisted (label from [`OptimizerRefusal`]).
    ///
    /// [`OptimizerRefusal`]: super::optimizer::OptimizerRefusal
    Optimizer(&'static str),
    /// The init push is not one dense key with one length (row-sparse, compressed,
    /// several keys, an unknown dtype).
    NotDense,
    /// This proxy restarted: it continues the journaled layouts and splits nothing new.
    Restarted,
    /// The server's budget of slice requests per iteration is spent.
    Budget,
}

impl Refusal {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::WorkerNotProxied => "worker_not_proxied",
            Refusal::HistoryIncomplete => "history_incomplete",
            Refusal::NoNodeTable => "no_node_table",
            Refusal::NotSyncMode => "not_sync_mode",
            Refusal::Compression => "compression",
            Refusal::Resend => "resend",
            Refusal::UnknownCommand => "unknown_command",
            Refusal::NotPslite => "not_pslite",
            Refusal::Optimizer(label) => label,
            Refusal::NotDense => "not_dense",
            Refusal::Restarted => "restarted",
            Refusal::Budget => "budget",
        }
    }
}

impl Splitter {
    pub(super) fn fail(
        &mut self,
        server: SocketAddr,
        key: Option<u64>,
        reason: &'static str,
        detail: String,
    ) -> Failure {
        let failure = Failure {
            server,
            key,
            reason,
            detail,
        };
        if let Some(s) = self.servers.get_mut(&server) {
            if s.failed.is_none() {
                s.failed = Some(failure.clone());
                self.events.push_back(SplitEvent::Failed(failure.clone()));
            }
            return s.failed.clone().expect("set");
        }
        failure
    }

    /// A condition that forbids splitting appeared: before any split it only stops
    /// new splits; after one it stops the server's traffic.
    pub(super) fn block(
        &mut self,
        server: SocketAddr,
        refusal: Refusal,
        detail: String,
    ) -> Option<Failure> {
        let s = self.servers.get_mut(&server)?;
        if s.split > 0 {
            let label = refusal.label();
            return Some(self.fail(
                server,
                None,
                label,
                format!("after keys were split: {detail}"),
            ));
        }
        if !s.blockers.contains(&refusal) {
            s.blockers.push(refusal);
        }
        None
    }

    /// A failed server stops everything.
    pub(super) fn failed(&self, server: SocketAddr) -> Option<Failure> {
        self.servers.get(&server).and_then(|s| s.failed.clone())
    }

    /// A message that is not ps-lite went to `server`.
    pub fn on_fence(&mut self, server: SocketAddr) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        self.block(
            server,
            Refusal::NotPslite,
            "a message that is not ps-lite".into(),
        )
    }

    /// A control message went to `server` (only ACK matters).
    pub fn on_control(&mut self, server: SocketAddr, cmd: ControlCommand) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        match cmd {
            ControlCommand::Ack => {
                self.stop_holding(server);
                self.block(server, Refusal::Resend, "a ps-lite ACK (PS_RESEND)".into())
            }
            _ => None,
        }
    }

    /// A SimpleApp command went to `server`.
    pub fn on_command(&mut self, server: SocketAddr, head: i32, body: &[u8]) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        let s = self.servers.get_mut(&server)?;
        let (refusal, detail) = match CommandType::from(head) {
            CommandType::SyncMode => {
                if !s.first_init {
                    s.sync_mode = true;
                }
                return None;
            }
            CommandType::Controller => match optimizer_verdict_in(body, self.config.optimizers) {
                Ok(class) => {
                    s.optimizer = Some(class);
                    return None;
                }
                Err(e) => (Refusal::Optimizer(e.label()), e.to_string()),
            },
            CommandType::SetGradientCompression => {
                (Refusal::Compression, "gradient compression".to_string())
            }
            CommandType::SetMultiPrecision
            | CommandType::StopServer
            | CommandType::SetProfilerParams => return None,
            CommandType::Other(h) => (Refusal::UnknownCommand, format!("unknown command {h}")),
        };
        self.block(server, refusal, detail)
    }

    /// Why this server's keys may not be split now, if anything forbids it
    /// (besides workers that have not connected yet).
    pub(super) fn history_refusal(&self, server: SocketAddr) -> Option<Refusal> {
        let s = self.servers.get(&server)?;
        if s.restored {
            return Some(Refusal::Restarted);
        }
        if let Some(r) = s.blockers.first() {
            return Some(r.clone());
        }
        if self.workers.is_none() || s.id.is_none() || self.num_servers == 0 {
            return Some(Refusal::NoNodeTable);
        }
        if !s.sync_mode {
            return Some(Refusal::NotSyncMode);
        }
        None
    }

    pub(super) fn all_workers_connected(&self, server: SocketAddr) -> bool {
        let (Some(s), Some(workers)) = (self.servers.get(&server), &self.workers) else {
            return false;
        };
        workers.iter().all(|w| s.workers.contains_key(w))
    }

    pub(super) fn refuse(&mut self, server: SocketAddr, key: u64, reason: Refusal) {
        if self.refused_logged.insert((server, key)) {
            self.events.push_back(SplitEvent::Refused {
                server,
                key,
                reason,
            });
        }
    }

    /// The byte length of an init push that may be split: one dense key above the
    /// threshold with one length equal to its vals.
    pub(super) fn candidate(&self, req: &DataRequest<'_>) -> Option<u64> {
        if !self.config.enabled || req.keys.len() != 1 || req.vals.len <= self.config.min_bytes {
            return None;
        }
        let handle = DataHandleType::from_head(req.meta.head())?;
        let elem = handle.dtype.size()? as u64;
        let dense = handle.request_type == RequestType::Default;
        let lens_ok =
            req.lens == Some(&[req.vals.len as i32][..]) && req.vals.len <= i32::MAX as u64;
        (dense && lens_ok && req.vals.len % elem == 0 && !req.meta.is_pull())
            .then_some(req.vals.len)
    }

    pub(super) fn decide_init(
        &mut self,
        server: SocketAddr,
        sender: i32,
        corr: Option<Correlation>,
        req: &DataRequest<'_>,
        total: u64,
        waited: bool,
    ) -> Option<RequestPlan> {
        let key = req.keys[0];
        if let Some(reason) = self.history_refusal(server) {
            self.refuse(server, key, reason);
            return None;
        }
        if !self.all_workers_connected(server) {
            let s = self.servers.get(&server).expect("checked");
            if !s.first_init && !waited {
                return Some(RequestPlan::Hold);
            }
            self.servers
                .get_mut(&server)
                .expect("checked")
                .blockers
                .push(Refusal::WorkerNotProxied);
            self.refuse(server, key, Refusal::WorkerNotProxied);
            return None;
        }
        let ranges = ServerRanges::new(self.num_servers)?;
        let Some(decoded) = ranges.decode(key) else {
            self.refuse(server, key, Refusal::NotDense);
            return None;
        };
        let elem = DataHandleType::from_head(req.meta.head())?.dtype.size()? as u64;
        let sizing = self.config.sizing;
        let workers = self.workers.as_ref().map_or(1, Vec::len);
        let shared = self.worker_hosts.contains(&server.ip());
        let s = self.servers.get(&server).expect("checked");
        let left = sizing
            .max_slices(workers)
            .saturating_sub(s.next_slice)
            .min(MAX_SLICE_KEYS.saturating_sub(s.next_slice));
        let Some((slice, count)) = sizing.slicing(total, elem, shared, left) else {
            if sizing.slicing(total, elem, shared, u64::MAX).is_some() {
                self.refuse(server, key, Refusal::Budget);
            }
            return None;
        };
        let s = self.servers.get_mut(&server).expect("checked");
        let layout = Layout {
            key,
            head: req.meta.head(),
            total,
            slice,
            first: ranges.begin(decoded.server) + SLICE_KEY_BASE + s.next_slice,
            count: count as u32,
        };
        s.next_slice += count;
        s.split += 1;
        s.first_init = true;
        s.keys.insert(key, KeyState::Split(layout));
        let _ = sender;
        let next_slice = s.next_slice;
        self.events.push_back(SplitEvent::Split {
            server,
            layout,
            next_slice,
        });
        Some(self.split_request(server, corr, key, layout, req, true))
    }
}
