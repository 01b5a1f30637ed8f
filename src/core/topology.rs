//! What the proxy learns from the traffic it relays: the node table (from the
//! scheduler's ADD_NODE broadcast), local nodes' registrations, the scheduler's
//! port, and the requests in flight (so that a dead upstream's losses are counted).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use p3proxy_parsers::pslite::{ControlCommand, MessageKind, PsMessage, Role, K_EMPTY};

/// One node of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// ps-lite node id (1 scheduler, 8+2r servers, 9+2r workers).
    pub id: i32,
    /// Role.
    pub role: Role,
    /// Address its ROUTER listens on.
    pub addr: Option<SocketAddr>,
}

/// The node id in a DEALER identity (`ps9` -> 9), as ps-lite's `GetNodeID` reads it.
pub fn node_id_from_identity(identity: &[u8]) -> Option<i32> {
    let digits = identity.strip_prefix(b"ps")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a message was seen.
#[derive(Debug, Clone, Copy)]
pub struct MessageContext<'a> {
    /// Identity of the DEALER that sent it.
    pub sender_identity: &'a [u8],
    /// Address of the ROUTER it goes to.
    pub dst: SocketAddr,
    /// It is the first message of its connection.
    pub first_on_connection: bool,
}

/// What a message taught; the IO shell acts on it (checks, logs, policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// A node asked the scheduler to register this ROUTER address.
    Registration {
        /// Its role.
        role: Role,
        /// The advertised address.
        addr: SocketAddr,
    },
    /// The scheduler's broadcast replaced the node table.
    NodeTable,
    /// A node stopped (TERMINATE to itself): forget its address.
    NodeExit(SocketAddr),
}

/// The job as this proxy sees it.
#[derive(Debug, Default)]
pub struct Topology {
    nodes: Vec<NodeInfo>,
    /// Requests relayed and not yet answered: (requester, responder, customer, timestamp).
    in_flight: HashMap<(i32, i32, i32, i32), u32>,
}

fn node_addr(host: &str, port: Option<i32>) -> Option<SocketAddr> {
    let ip: IpAddr = host.parse().ok()?;
    let port = u16::try_from(port?).ok()?;
    Some(SocketAddr::new(ip, port))
}

impl Topology {
    /// The node table (empty until the broadcast was seen).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Node id listening at `addr`.
    pub fn id_at(&self, addr: SocketAddr) -> Option<i32> {
        self.nodes
            .iter()
            .find(|n| n.addr == Some(addr))
            .map(|n| n.id)
    }

    /// Sets the node table (from the journal of a previous run).
    pub fn set_nodes(&mut self, nodes: Vec<NodeInfo>) {
        self.nodes = nodes;
    }

    /// Number of servers in the node table.
    pub fn num_servers(&self) -> usize {
        self.nodes.iter().filter(|n| n.role == Role::Server).count()
    }

    /// Looks at one relayed message.
    pub fn observe(&mut self, ctx: &MessageContext<'_>, msg: &PsMessage) -> Option<Learned> {
        match msg.kind() {
            MessageKind::Control(ControlCommand::AddNode) => {
                let control = msg.meta.control_message()?;
                let unassigned =
                    control.node.len() == 1 && control.node[0].id.unwrap_or(K_EMPTY) == K_EMPTY;
                if unassigned {
                    // A registration is the first message of a new, anonymous connection.
                    if !ctx.first_on_connection || !ctx.sender_identity.is_empty() {
                        return None;
                    }
                    let n = &control.node[0];
                    let addr = node_addr(&n.hostname_str(), n.port)?;
                    return Some(Learned::Registration {
                        role: n.role(),
                        addr,
                    });
                }
                if node_id_from_identity(ctx.sender_identity) != Some(1) {
                    return None;
                }
                self.nodes = control
                    .node
                    .iter()
                    .filter_map(|n| {
                        Some(NodeInfo {
                            id: n.id?,
                            role: n.role(),
                            addr: node_addr(&n.hostname_str(), n.port),
                        })
                    })
                    .collect();
                Some(Learned::NodeTable)
            }
            MessageKind::Control(ControlCommand::Terminate) => {
                // A node stops its van by sending TERMINATE to itself.
                let me = node_id_from_identity(ctx.sender_identity)?;
                (self.id_at(ctx.dst) == Some(me)).then_some(Learned::NodeExit(ctx.dst))
            }
            MessageKind::Data { request, .. } | MessageKind::Command { request, .. } => {
                let sender = node_id_from_identity(ctx.sender_identity)?;
                let receiver = self.id_at(ctx.dst)?;
                let (customer, ts) = (msg.meta.customer_id(), msg.meta.timestamp());
                if request {
                    *self
                        .in_flight
                        .entry((sender, receiver, customer, ts))
                        .or_insert(0) += 1;
                } else if let Some(n) = self.in_flight.get_mut(&(receiver, sender, customer, ts)) {
                    *n -= 1;
                    if *n == 0 {
                        self.in_flight.remove(&(receiver, sender, customer, ts));
                    }
                }
                None
            }
            MessageKind::Control(_) => None,
        }
    }

    /// The requests from `requester` to the node at `responder` that will never be
    /// answered because their connection died; they are forgotten.
    pub fn take_lost(&mut self, requester: &[u8], responder: SocketAddr) -> u64 {
        let (Some(from), Some(to)) = (node_id_from_identity(requester), self.id_at(responder))
        else {
            return 0;
        };
        let mut lost = 0u64;
        self.in_flight.retain(|&(r, s, _, _), n| {
            let hit = r == from && s == to;
            if hit {
                lost += u64::from(*n);
            }
            !hit
        });
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use p3proxy_parsers::pslite::{Control, Meta, Node};

    fn add_node(nodes: Vec<Node>) -> PsMessage {
        let meta = Meta {
            head: Some(K_EMPTY),
            control: Some(Control {
                cmd: Some(2),
                node: nodes,
                ..Control::default()
            }),
            ..Meta::default()
        };
        PsMessage::new(meta, vec![])
    }

    fn node(id: i32, role: i32, port: i32) -> Node {
        Node {
            id: Some(id),
            role: Some(role),
            hostname: Some(Bytes::from_static(b"10.0.0.1")),
            port: Some(port),
            ..Node::default()
        }
    }

    fn data(request: bool, ts: i32) -> PsMessage {
        let meta = Meta {
            head: Some(0),
            request: Some(request),
            push: Some(true),
            pull: Some(false),
            timestamp: Some(ts),
            customer_id: Some(0),
            ..Meta::default()
        };
        PsMessage::new(meta, vec![])
    }

    #[test]
    fn identities() {
        assert_eq!(node_id_from_identity(b"ps9"), Some(9));
        assert_eq!(node_id_from_identity(b"ps"), None);
        assert_eq!(node_id_from_identity(b"px9"), None);
        assert_eq!(node_id_from_identity(b""), None);
    }

    #[test]
    fn registration_only_from_the_first_anonymous_message() {
        let mut t = Topology::default();
        let reg = add_node(vec![node(K_EMPTY, 0, 40000)]);
        let dst: SocketAddr = "10.0.0.9:29091".parse().unwrap();
        let first = MessageContext {
            sender_identity: b"",
            dst,
            first_on_connection: true,
        };
        assert_eq!(
            t.observe(&first, &reg),
            Some(Learned::Registration {
                role: Role::Server,
                addr: "10.0.0.1:40000".parse().unwrap()
            })
        );
        let later = MessageContext {
            first_on_connection: false,
            ..first
        };
        assert_eq!(t.observe(&later, &reg), None);
        let named = MessageContext {
            sender_identity: b"ps9",
            ..first
        };
        assert_eq!(t.observe(&named, &reg), None);
    }

    #[test]
    fn node_table_and_lost_requests() {
        let mut t = Topology::default();
        let table = add_node(vec![
            node(8, 0, 40000),
            node(9, 1, 40001),
            node(1, 2, 29091),
        ]);
        let to_worker = MessageContext {
            sender_identity: b"ps1",
            dst: "10.0.0.1:40001".parse().unwrap(),
            first_on_connection: true,
        };
        assert_eq!(t.observe(&to_worker, &table), Some(Learned::NodeTable));
        assert_eq!(t.num_servers(), 1);
        let server: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let worker: SocketAddr = "10.0.0.1:40001".parse().unwrap();
        let req = MessageContext {
            sender_identity: b"ps9",
            dst: server,
            first_on_connection: false,
        };
        let resp = MessageContext {
            sender_identity: b"ps8",
            dst: worker,
            first_on_connection: false,
        };
        for ts in 1..=3 {
            t.observe(&req, &data(true, ts));
        }
        t.observe(&resp, &data(false, 2));
        assert_eq!(t.take_lost(b"ps9", server), 2);
        assert_eq!(t.take_lost(b"ps9", server), 0);
    }

    #[test]
    fn terminate_to_itself_is_an_exit() {
        let mut t = Topology::default();
        let table = add_node(vec![node(8, 0, 40000)]);
        let ctx = MessageContext {
            sender_identity: b"ps1",
            dst: "10.0.0.1:40000".parse().unwrap(),
            first_on_connection: true,
        };
        t.observe(&ctx, &table);
        let meta = Meta {
            control: Some(Control {
                cmd: Some(1),
                ..Control::default()
            }),
            ..Meta::default()
        };
        let term = PsMessage::new(meta, vec![]);
        let own = MessageContext {
            sender_identity: b"ps8",
            ..ctx
        };
        assert_eq!(
            t.observe(&own, &term),
            Some(Learned::NodeExit("10.0.0.1:40000".parse().unwrap()))
        );
    }
}
