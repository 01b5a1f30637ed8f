//! Everything one proxy knows and decides, in one object (quinn-proto's `Connection`
//! is the model): the relay policy, the job's topology, the key priorities and the
//! splitter, what an observed message teaches them, and the side effects the shell
//! must carry out for them (journal records, inbound capture rules, waking held
//! requests), polled as [`Effect`]s so that the shell applies them after letting go
//! of the object's lock.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use p3proxy_parsers::mxnet::ServerRanges;
use p3proxy_parsers::pslite::{MessageKind, PsMessage, Role};

use super::job_order::OrderRecord;
use super::journal::Record;
use super::learner::DEFAULT_DEFER;
use super::live::{JobWatch, RequestSeen};
use super::pairing::PairLag;
use super::policy::{Policy, Refusal};
use super::priority::{PriorityEvent, PriorityTable, Urgency};
use super::split::Splitter;
use super::topology::{node_id_from_identity, MessageContext, NodeInfo, Topology};

/// What the shell does for the state, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append a record to the journal.
    Journal(Record),
    /// Send other hosts' connections to this local node through the inbound listener.
    CaptureInbound(SocketAddr),
    /// Stop doing so (the node exited).
    ReleaseInbound(SocketAddr),
}

/// A local node's registration, as [`ProxyState::register`] decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// New: tunnels to it are admitted from now on.
    New,
    /// Known already.
    Known,
    /// Refused (a privileged port, one of the proxy's own addresses...).
    Refused(Refusal),
}

/// The proxy's state; the shell keeps it behind one lock.
#[derive(Debug)]
pub struct ProxyState {
    /// What may be relayed where.
    pub policy: Policy,
    /// The job's nodes and the requests in flight between them.
    pub topology: Topology,
    /// Key priorities (key order, learned, or a map).
    pub priority: PriorityTable,
    /// Key splitting and request order in front of local servers.
    pub splitter: Splitter,
    /// How far apart the workers' pushes of a key reach local servers.
    pub pair_lag: PairLag,
    /// How the job is doing (iterations, waits, unanswered requests).
    pub job: JobWatch,
    /// The learned order's deferred share follows the topology (`learned_defer` unset):
    /// strict layer order where a worker shares a local server's host.
    pub auto_defer: bool,
    /// (id, address) of every node of the last node table: a different one is a new job.
    table_seen: Vec<(i32, Option<SocketAddr>)>,
    effects: VecDeque<Effect>,
}

impl ProxyState {
    /// A proxy that has seen nothing yet.
    pub fn new(policy: Policy, priority: PriorityTable, splitter: Splitter) -> ProxyState {
        ProxyState {
            policy,
            topology: Topology::default(),
            priority,
            splitter,
            pair_lag: PairLag::default(),
            job: JobWatch::default(),
            auto_defer: false,
            table_seen: Vec::new(),
            effects: VecDeque::new(),
        }
    }

    /// Shows the job watch a data message of `bytes` wire bytes a session's DEALER sent
    /// at `now` (a request, or a response going back to its requester); `is_local`:
    /// whether an address is this host's (the requester's iterations are followed only
    /// there). The size comes from the frames: ps-lite's ZMQ van never sends the meta's
    /// `data_size` (wire/PROTOCOL.md).
    pub fn watch(
        &mut self,
        ctx: &MessageContext<'_>,
        msg: &PsMessage,
        bytes: u64,
        now: Instant,
        is_local: impl Fn(IpAddr) -> bool,
    ) {
        let MessageKind::Data {
            request,
            push,
            pull,
        } = msg.kind()
        else {
            return;
        };
        let (Some(sender), Some(receiver)) = (
            node_id_from_identity(ctx.sender_identity),
            self.topology.id_at(ctx.dst),
        ) else {
            return;
        };
        let (customer, ts) = (msg.meta.customer_id(), msg.meta.timestamp());
        if request {
            let local = self
                .topology
                .nodes()
                .iter()
                .find(|n| n.id == sender)
                .and_then(|n| n.addr)
                .is_some_and(|a| is_local(a.ip()));
            let req = RequestSeen {
                corr: (sender, receiver, customer, ts),
                key: msg.keys().and_then(|mut k| k.next()),
                push,
                pull,
                local,
                bytes,
                answered_here: !local && is_local(ctx.dst.ip()),
            };
            self.job.request(req, now);
        } else {
            self.job
                .response((receiver, sender, customer, ts), bytes, now);
        }
    }

    /// The next side effect to carry out (call until `None` after each change, with
    /// the lock released).
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// A local node at `addr` asked the scheduler to register (the shell checked that
    /// the address is this host's and that something listens there).
    pub fn register(&mut self, addr: SocketAddr, role: Role) -> Registration {
        match self.policy.register(addr) {
            Ok(true) => {
                self.effects.push_back(Effect::Journal(Record::Registered {
                    addr,
                    server: role == Role::Server,
                }));
                self.effects.push_back(Effect::CaptureInbound(addr));
                if role == Role::Server {
                    // This proxy relays the server's traffic from its registration on:
                    // the history a split needs starts here.
                    self.splitter.server_registered(addr);
                    self.pair_lag.forget_server(addr);
                }
                Registration::New
            }
            Ok(false) => Registration::Known,
            Err(r) => Registration::Refused(r),
        }
    }

    /// The scheduler's node table was learned ([`Topology::observe`] said so).
    pub fn node_table_learned(&mut self) {
        self.splitter.node_table(self.topology.nodes());
        let table: Vec<(i32, Option<SocketAddr>)> = self
            .topology
            .nodes()
            .iter()
            .map(|n| (n.id, n.addr))
            .collect();
        if table != self.table_seen {
            // Node ids are handed out again: the job's order is learned and passed on anew.
            self.priority.new_job();
            self.table_seen = table;
        }
        let workers = self
            .topology
            .nodes()
            .iter()
            .filter(|n| n.role == Role::Worker)
            .count();
        self.pair_lag.set_workers(workers);
        if self.auto_defer {
            // Measured on the testbed: colocated, strict layer order is 8% faster on
            // ResNet-50 and level on VGG-19; on separate hosts the deferred order wins.
            let colocated = self.splitter.server_shares_a_worker_host();
            self.priority
                .set_defer(if colocated { 0.0 } else { DEFAULT_DEFER });
        }
        let nodes = self
            .topology
            .nodes()
            .iter()
            .map(|n| (n.id, role_code(n.role), n.addr))
            .collect();
        self.effects
            .push_back(Effect::Journal(Record::Nodes { nodes }));
    }

    /// A node at `addr` stopped: whether it was a registered local node.
    pub fn node_exited(&mut self, addr: SocketAddr) -> bool {
        if !self.policy.forget(addr) {
            return false;
        }
        self.splitter.server_exited(addr);
        self.pair_lag.forget_server(addr);
        self.effects
            .push_back(Effect::Journal(Record::Exited { addr }));
        self.effects.push_back(Effect::ReleaseInbound(addr));
        true
    }

    /// How urgent a message a local app sent `now` is (its keys' priority); a request
    /// also teaches the learned order and is checked against the map. The event, if
    /// the source in use changed (for the log and the metric).
    pub fn prioritize(
        &mut self,
        msg: &PsMessage,
        sender: Option<u32>,
        now: Instant,
    ) -> (Urgency, Option<PriorityEvent>) {
        let ranges = self.server_ranges();
        let event = self
            .priority
            .observe_request(msg, sender, ranges.as_ref(), now);
        (self.priority.urgency(msg, ranges.as_ref()), event)
    }

    /// A peer proxy passed on the job's order it uses: taken only from a worker of the
    /// node table, once there is one (not from a job before, nor a made-up origin).
    pub fn order_received(&mut self, record: OrderRecord) {
        let nodes = self.topology.nodes();
        let worker =
            |n: &NodeInfo| n.role == Role::Worker && i64::from(n.id) == i64::from(record.origin);
        if nodes.is_empty() || nodes.iter().any(worker) {
            self.priority.order_received(record);
        }
    }

    /// A peer proxy announced the priority it used for a message with these keys.
    pub fn priority_hint(&mut self, ps_keys: &[u64], priority: u32) {
        let ranges = self.server_ranges();
        self.priority.hint(ps_keys, ranges.as_ref(), priority);
    }

    /// The server ranges of the node table (ps-lite keys -> MXNet keys), if known.
    fn server_ranges(&self) -> Option<ServerRanges> {
        ServerRanges::new(self.topology.num_servers() as u64)
    }

    /// Rebuilds what a journal's records say (this proxy's previous run); the local
    /// nodes it registered are captured inbound again. Returns the layouts restored.
    pub fn replay(&mut self, records: &[Record]) -> usize {
        let mut layouts = 0;
        for r in records {
            match r {
                Record::Registered { addr, server } => {
                    let _ = self.policy.register(*addr);
                    if *server {
                        self.splitter.server_registered(*addr);
                    }
                }
                Record::Exited { addr } => {
                    self.policy.forget(*addr);
                    self.splitter.server_exited(*addr);
                }
                Record::Nodes { nodes } => {
                    let nodes: Vec<NodeInfo> = nodes
                        .iter()
                        .map(|&(id, role, addr)| NodeInfo {
                            id,
                            role: Role::from(role),
                            addr,
                        })
                        .collect();
                    self.splitter.node_table(&nodes);
                    self.topology.set_nodes(nodes);
                }
                Record::SchedulerPort { port } => {
                    self.policy.learn_scheduler(*port);
                }
                Record::Layout {
                    server,
                    layout,
                    next_slice,
                } => {
                    self.splitter.restore(*server, *layout, *next_slice);
                    layouts += 1;
                }
            }
        }
        let registered: Vec<SocketAddr> = self.policy.registered().collect();
        self.effects
            .extend(registered.into_iter().map(Effect::CaptureInbound));
        layouts
    }
}

/// The role as the journal stores it.
fn role_code(role: Role) -> i32 {
    match role {
        Role::Server => 0,
        Role::Worker => 1,
        Role::Scheduler => 2,
        Role::Other(v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::priority::Source;
    use crate::core::split::SplitConfig;

    fn state() -> ProxyState {
        let policy = Policy::new(
            vec!["127.0.0.1:15301".parse().unwrap()],
            vec![crate::core::policy::Cidr::ANY_V4],
            None,
            std::time::Duration::from_secs(60),
        );
        let splitter = Splitter::new(SplitConfig {
            enabled: true,
            sizing: crate::core::split::Sizing::uniform(400),
            min_bytes: 400,
            optimizers: crate::core::optimizer::OptimizerSet::ALL,
            hold: std::time::Duration::from_secs(10),
        });
        ProxyState::new(policy, PriorityTable::new(Source::Key, None), splitter)
    }

    fn effects(s: &mut ProxyState) -> Vec<Effect> {
        std::iter::from_fn(|| s.poll_effect()).collect()
    }

    #[test]
    fn an_unset_learned_defer_is_strict_layer_order_only_where_a_worker_shares_the_servers_host() {
        let node = |id, role, addr: &str| NodeInfo {
            id,
            role,
            addr: Some(addr.parse().unwrap()),
        };
        for (worker_host, auto, want) in [
            ("10.0.0.2:9001", true, 0.0),
            ("10.0.0.3:9001", true, DEFAULT_DEFER),
            ("10.0.0.2:9001", false, DEFAULT_DEFER),
        ] {
            let mut s = state();
            s.auto_defer = auto;
            s.register("10.0.0.2:9000".parse().unwrap(), Role::Server);
            s.topology.set_nodes(vec![
                node(8, Role::Server, "10.0.0.2:9000"),
                node(9, Role::Worker, worker_host),
                node(11, Role::Worker, "10.0.0.4:9001"),
            ]);
            s.node_table_learned();
            assert_eq!(s.priority.defer(), want, "{worker_host} auto {auto}");
        }
    }

    #[test]
    fn a_new_local_server_is_journaled_captured_and_fronted_once() {
        let mut s = state();
        let addr: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        assert_eq!(s.register(addr, Role::Server), Registration::New);
        assert_eq!(
            effects(&mut s),
            [
                Effect::Journal(Record::Registered { addr, server: true }),
                Effect::CaptureInbound(addr)
            ]
        );
        assert!(s.splitter.is_server(addr));
        assert_eq!(s.register(addr, Role::Server), Registration::Known);
        assert_eq!(effects(&mut s), []);
        let low: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert!(matches!(
            s.register(low, Role::Worker),
            Registration::Refused(_)
        ));
        assert!(s.node_exited(addr));
        assert_eq!(
            effects(&mut s),
            [
                Effect::Journal(Record::Exited { addr }),
                Effect::ReleaseInbound(addr)
            ]
        );
        assert!(!s.splitter.is_server(addr));
        assert!(!s.node_exited(addr), "forgotten once");
    }

    #[test]
    fn a_replayed_journal_rebuilds_the_state_and_captures_its_nodes_again() {
        let mut s = state();
        let server: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        let worker: SocketAddr = "10.0.0.2:9001".parse().unwrap();
        let records = [
            Record::Registered {
                addr: server,
                server: true,
            },
            Record::Registered {
                addr: worker,
                server: false,
            },
            Record::Nodes {
                nodes: vec![(8, 0, Some(server)), (9, 1, Some(worker))],
            },
            Record::Exited { addr: worker },
        ];
        assert_eq!(s.replay(&records), 0);
        assert_eq!(effects(&mut s), [Effect::CaptureInbound(server)]);
        assert!(s.splitter.is_server(server));
        assert_eq!(s.topology.nodes().len(), 2);
        // The node table it learns next is journaled in the same form.
        s.node_table_learned();
        assert_eq!(
            effects(&mut s),
            [Effect::Journal(Record::Nodes {
                nodes: vec![(8, 0, Some(server)), (9, 1, Some(worker))]
            })]
        );
    }
}
