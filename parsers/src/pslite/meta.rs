//! `ps.PBMeta`, `ps.PBControl` and `ps.PBNode` (meta.proto at ps-lite 34fd45c).
//!
//! Every field is kept as present or absent, so that encoding a decoded meta
//! reproduces ps-lite's bytes exactly: `Van::PackMeta` writes fields in number
//! order, and so does [`Meta::encode`]. Unknown fields are kept (zero-copy) and
//! written after the known ones.

use bytes::Bytes;

use super::protobuf::{
    for_each_field, put_bool, put_bytes, put_int32, put_key, put_varint, Field, Value,
};
use super::protobuf::{parse_varint, WT_VARINT};
use super::MetaError;

/// ps-lite's "unset" sentinel (`Meta::kEmpty`, INT32_MAX).
pub const K_EMPTY: i32 = i32::MAX;
/// Most nodes accepted in one control message (ADD_NODE of a huge cluster).
pub const MAX_NODES: usize = 1 << 16;
/// Most unknown fields kept per message.
pub const MAX_UNKNOWN_FIELDS: usize = 64;
/// Most `data_type` entries: ps-lite sends keys, vals and lens.
pub(crate) const MAX_DATA_TYPES: usize = super::MAX_DATA_FRAMES;

/// Role of a node (`PBNode.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Parameter server.
    Server,
    /// Worker.
    Worker,
    /// Scheduler.
    Scheduler,
    /// A value ps-lite does not define.
    Other(i32),
}

impl From<i32> for Role {
    fn from(v: i32) -> Role {
        match v {
            0 => Role::Server,
            1 => Role::Worker,
            2 => Role::Scheduler,
            v => Role::Other(v),
        }
    }
}

/// Control command (`PBControl.cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlCommand {
    /// 0: not a control message.
    Empty,
    /// 1: a node stops its own van.
    Terminate,
    /// 2: registration (to the scheduler) and the node table broadcast (from it).
    AddNode,
    /// 3: barrier request and release.
    Barrier,
    /// 4: acknowledgement under `PS_RESEND`.
    Ack,
    /// 5: heartbeat.
    Heartbeat,
    /// A value ps-lite does not define.
    Other(i32),
}

impl From<i32> for ControlCommand {
    fn from(v: i32) -> ControlCommand {
        match v {
            0 => ControlCommand::Empty,
            1 => ControlCommand::Terminate,
            2 => ControlCommand::AddNode,
            3 => ControlCommand::Barrier,
            4 => ControlCommand::Ack,
            5 => ControlCommand::Heartbeat,
            v => ControlCommand::Other(v),
        }
    }
}

/// ps-lite data types (`PBMeta.data_type` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// 3: i32 (the lens frame).
    Int32,
    /// 8: u64 (the keys frame).
    Uint64,
    /// 11: opaque bytes (the vals frame; MXNet uses `char` values).
    Other,
    /// Any other code (0 CHAR ... 10 DOUBLE, or unknown).
    Code(i32),
}

impl DataType {
    /// Element size where a frame of this type must hold whole elements.
    pub fn elem_size(&self) -> Option<usize> {
        match self {
            DataType::Int32 => Some(4),
            DataType::Uint64 => Some(8),
            DataType::Code(2 | 6) => Some(2),
            DataType::Code(3 | 7 | 9) => Some(4),
            DataType::Code(4 | 10) => Some(8),
            _ => None,
        }
    }
}

impl From<i32> for DataType {
    fn from(v: i32) -> DataType {
        match v {
            3 => DataType::Int32,
            8 => DataType::Uint64,
            11 => DataType::Other,
            v => DataType::Code(v),
        }
    }
}

/// `ps.PBNode`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// 1: role (see [`Role`]).
    pub role: Option<i32>,
    /// 2: node id; INT32_MAX before the scheduler assigns one.
    pub id: Option<i32>,
    /// 3: host the node's ROUTER listens on (nodes find themselves by exact match).
    pub hostname: Option<Bytes>,
    /// 4: port the node's ROUTER listens on.
    pub port: Option<i32>,
    /// 5: the node rejoins after a failure.
    pub is_recovery: Option<bool>,
    /// 10: customer id (garbage for the scheduler's own entry).
    pub customer_id: Option<i32>,
    /// Fields meta.proto does not define, as they were on the wire.
    pub unknown: Vec<Bytes>,
}

impl Node {
    /// The role, ps-lite's default (SERVER) if absent.
    pub fn role(&self) -> Role {
        Role::from(self.role.unwrap_or(0))
    }

    /// The hostname as text (lossy for non-UTF-8 bytes).
    pub fn hostname_str(&self) -> String {
        self.hostname
            .as_deref()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .unwrap_or_default()
    }
}

/// `ps.PBControl`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Control {
    /// 1: command (see [`ControlCommand`]).
    pub cmd: Option<i32>,
    /// 2: nodes (ADD_NODE, HEARTBEAT).
    pub node: Vec<Node>,
    /// 3: barrier group (uninitialised garbage in releases: never rely on it).
    pub barrier_group: Option<i32>,
    /// 4: signature of the message an ACK acknowledges.
    pub msg_sig: Option<u64>,
    /// Fields meta.proto does not define, as they were on the wire.
    pub unknown: Vec<Bytes>,
}

impl Control {
    /// The command, EMPTY if absent.
    pub fn command(&self) -> ControlCommand {
        ControlCommand::from(self.cmd.unwrap_or(0))
    }
}

/// `ps.PBMeta`: the first frame of every ps-lite message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// 1: application head; MXNet's command or data-handle type. INT32_MAX on control messages.
    pub head: Option<i32>,
    /// 2: body; MXNet's SimpleApp command payload (e.g. the pickled optimizer).
    pub body: Option<Bytes>,
    /// 3: control part; present only on control messages.
    pub control: Option<Control>,
    /// 4: request (true) or response (false).
    pub request: Option<bool>,
    /// 5: the request carries values to push.
    pub push: Option<bool>,
    /// 6: a SimpleApp command rather than key-value data.
    pub simple_app: Option<bool>,
    /// 7: application id; absent means INT32_MAX.
    pub app_id: Option<i32>,
    /// 8: per-customer request counter (control messages: per-van counter).
    pub timestamp: Option<i32>,
    /// 9: type of each data frame (packed).
    pub data_type: Vec<i32>,
    /// 10: customer id; INT32_MAX on most control messages.
    pub customer_id: Option<i32>,
    /// 11: data size; never sent by the ZMQ van.
    pub data_size: Option<i32>,
    /// 12: the request wants values back.
    pub pull: Option<bool>,
    /// 13: priority; always 0 from MXNet 1.9.1.
    pub priority: Option<i32>,
    /// Fields meta.proto does not define, as they were on the wire.
    pub unknown: Vec<Bytes>,
}

impl Meta {
    /// The control part, if this is a control message as ps-lite defines it
    /// (control present with a command other than EMPTY).
    pub fn control_message(&self) -> Option<&Control> {
        self.control
            .as_ref()
            .filter(|c| c.command() != ControlCommand::Empty)
    }

    /// `head`, 0 if absent.
    pub fn head(&self) -> i32 {
        self.head.unwrap_or(0)
    }
    /// `request`, false if absent.
    pub fn is_request(&self) -> bool {
        self.request.unwrap_or(false)
    }
    /// `push`, false if absent.
    pub fn is_push(&self) -> bool {
        self.push.unwrap_or(false)
    }
    /// `pull`, false if absent.
    pub fn is_pull(&self) -> bool {
        self.pull.unwrap_or(false)
    }
    /// `simple_app`, false if absent.
    pub fn is_simple_app(&self) -> bool {
        self.simple_app.unwrap_or(false)
    }
    /// `timestamp` as ps-lite reads it: INT32_MAX if absent.
    pub fn timestamp(&self) -> i32 {
        self.timestamp.unwrap_or(K_EMPTY)
    }
    /// `app_id` as ps-lite reads it: INT32_MAX if absent.
    pub fn app_id(&self) -> i32 {
        self.app_id.unwrap_or(K_EMPTY)
    }
    /// `customer_id`, 0 if absent.
    pub fn customer_id(&self) -> i32 {
        self.customer_id.unwrap_or(0)
    }
    /// `priority`, 0 if absent.
    pub fn priority(&self) -> i32 {
        self.priority.unwrap_or(0)
    }
    /// The data types, typed.
    pub fn data_types(&self) -> impl Iterator<Item = DataType> + '_ {
        self.data_type.iter().map(|&t| DataType::from(t))
    }

    /// Encodes in field-number order, as `Van::PackMeta` does.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        if let Some(v) = self.head {
            put_int32(out, 1, v);
        }
        if let Some(v) = &self.body {
            put_bytes(out, 2, v);
        }
        if let Some(c) = &self.control {
            put_bytes(out, 3, &c.encode());
        }
        put_opt_bool(out, 4, self.request);
        put_opt_bool(out, 5, self.push);
        put_opt_bool(out, 6, self.simple_app);
        put_opt_int32(out, 7, self.app_id);
        put_opt_int32(out, 8, self.timestamp);
        if !self.data_type.is_empty() {
            let mut packed = Vec::with_capacity(self.data_type.len());
            for &t in &self.data_type {
                put_varint(&mut packed, i64::from(t) as u64);
            }
            put_bytes(out, 9, &packed);
        }
        put_opt_int32(out, 10, self.customer_id);
        put_opt_int32(out, 11, self.data_size);
        put_opt_bool(out, 12, self.pull);
        put_opt_int32(out, 13, self.priority);
        for u in &self.unknown {
            out.extend_from_slice(u);
        }
    }
}

impl Control {
    /// Encodes in field-number order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_opt_int32(&mut out, 1, self.cmd);
        for n in &self.node {
            put_bytes(&mut out, 2, &n.encode());
        }
        put_opt_int32(&mut out, 3, self.barrier_group);
        if let Some(sig) = self.msg_sig {
            put_key(&mut out, 4, WT_VARINT);
            put_varint(&mut out, sig);
        }
        for u in &self.unknown {
            out.extend_from_slice(u);
        }
        out
    }
}

impl Node {
    /// Encodes in field-number order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_opt_int32(&mut out, 1, self.role);
        put_opt_int32(&mut out, 2, self.id);
        if let Some(h) = &self.hostname {
            put_bytes(&mut out, 3, h);
        }
        put_opt_int32(&mut out, 4, self.port);
        put_opt_bool(&mut out, 5, self.is_recovery);
        put_opt_int32(&mut out, 10, self.customer_id);
        for u in &self.unknown {
            out.extend_from_slice(u);
        }
        out
    }
}

fn put_opt_int32(out: &mut Vec<u8>, number: u32, v: Option<i32>) {
    if let Some(v) = v {
        put_int32(out, number, v);
    }
}

fn put_opt_bool(out: &mut Vec<u8>, number: u32, v: Option<bool>) {
    if let Some(v) = v {
        put_bool(out, number, v);
    }
}

/// Sets a non-repeated field once; a second occurrence is an error.
fn set_once<T>(
    slot: &mut Option<T>,
    v: T,
    message: &'static str,
    field: u32,
) -> Result<(), MetaError> {
    if slot.is_some() {
        return Err(MetaError::DuplicateField { message, field });
    }
    *slot = Some(v);
    Ok(())
}

fn want_varint(f: &Field<'_>, message: &'static str) -> Result<u64, MetaError> {
    match f.value {
        Value::Varint(v) => Ok(v),
        other => Err(MetaError::WireType {
            message,
            field: f.number,
            wire_type: other.wire_type(),
        }),
    }
}

fn want_len<'a>(f: &Field<'a>, message: &'static str) -> Result<&'a [u8], MetaError> {
    match f.value {
        Value::Len(v) => Ok(v),
        other => Err(MetaError::WireType {
            message,
            field: f.number,
            wire_type: other.wire_type(),
        }),
    }
}

fn keep_unknown(unknown: &mut Vec<Bytes>, src: &Bytes, f: &Field<'_>) -> Result<(), MetaError> {
    if unknown.len() == MAX_UNKNOWN_FIELDS {
        return Err(MetaError::TooMany {
            what: "unknown fields",
            max: MAX_UNKNOWN_FIELDS,
        });
    }
    unknown.push(src.slice_ref(f.raw));
    Ok(())
}

/// Decodes a `PBMeta` frame, zero-copy for `body`, hostnames and unknown fields.
pub fn parse_meta(frame: &Bytes) -> Result<Meta, MetaError> {
    const M: &str = "PBMeta";
    let mut meta = Meta::default();
    let mut seen_data_type = false;
    for_each_field(frame, |f| {
        match f.number {
            1 => set_once(&mut meta.head, want_varint(&f, M)? as i32, M, 1),
            2 => set_once(&mut meta.body, frame.slice_ref(want_len(&f, M)?), M, 2),
            3 => set_once(
                &mut meta.control,
                parse_control(frame, want_len(&f, M)?)?,
                M,
                3,
            ),
            4 => set_once(&mut meta.request, want_varint(&f, M)? != 0, M, 4),
            5 => set_once(&mut meta.push, want_varint(&f, M)? != 0, M, 5),
            6 => set_once(&mut meta.simple_app, want_varint(&f, M)? != 0, M, 6),
            7 => set_once(&mut meta.app_id, want_varint(&f, M)? as i32, M, 7),
            8 => set_once(&mut meta.timestamp, want_varint(&f, M)? as i32, M, 8),
            9 => {
                if seen_data_type {
                    return Err(MetaError::DuplicateField {
                        message: M,
                        field: 9,
                    });
                }
                seen_data_type = true;
                meta.data_type = match f.value {
                    // An unpacked entry (legal protobuf, never sent by ps-lite).
                    Value::Varint(v) => vec![v as i32],
                    Value::Len(packed) => parse_packed_int32(packed)?,
                    other => {
                        return Err(MetaError::WireType {
                            message: M,
                            field: 9,
                            wire_type: other.wire_type(),
                        })
                    }
                };
                Ok(())
            }
            10 => set_once(&mut meta.customer_id, want_varint(&f, M)? as i32, M, 10),
            11 => set_once(&mut meta.data_size, want_varint(&f, M)? as i32, M, 11),
            12 => set_once(&mut meta.pull, want_varint(&f, M)? != 0, M, 12),
            13 => set_once(&mut meta.priority, want_varint(&f, M)? as i32, M, 13),
            _ => keep_unknown(&mut meta.unknown, frame, &f),
        }
    })?;
    Ok(meta)
}

fn parse_packed_int32(mut packed: &[u8]) -> Result<Vec<i32>, MetaError> {
    let mut out = Vec::new();
    while !packed.is_empty() {
        if out.len() == MAX_DATA_TYPES {
            return Err(MetaError::TooMany {
                what: "data types",
                max: MAX_DATA_TYPES,
            });
        }
        let (rest, v) = parse_varint(packed).map_err(|e| match e {
            nom::Err::Error(e) | nom::Err::Failure(e) => e,
            nom::Err::Incomplete(_) => MetaError::TruncatedVarint,
        })?;
        out.push(v as i32);
        packed = rest;
    }
    Ok(out)
}

fn parse_control(src: &Bytes, input: &[u8]) -> Result<Control, MetaError> {
    const M: &str = "PBControl";
    let mut control = Control::default();
    for_each_field(input, |f| match f.number {
        1 => set_once(&mut control.cmd, want_varint(&f, M)? as i32, M, 1),
        2 => {
            if control.node.len() == MAX_NODES {
                return Err(MetaError::TooMany {
                    what: "nodes",
                    max: MAX_NODES,
                });
            }
            control.node.push(parse_node(src, want_len(&f, M)?)?);
            Ok(())
        }
        3 => set_once(&mut control.barrier_group, want_varint(&f, M)? as i32, M, 3),
        4 => set_once(&mut control.msg_sig, want_varint(&f, M)?, M, 4),
        _ => keep_unknown(&mut control.unknown, src, &f),
    })?;
    Ok(control)
}

fn parse_node(src: &Bytes, input: &[u8]) -> Result<Node, MetaError> {
    const M: &str = "PBNode";
    let mut node = Node::default();
    for_each_field(input, |f| match f.number {
        1 => set_once(&mut node.role, want_varint(&f, M)? as i32, M, 1),
        2 => set_once(&mut node.id, want_varint(&f, M)? as i32, M, 2),
        3 => set_once(&mut node.hostname, src.slice_ref(want_len(&f, M)?), M, 3),
        4 => set_once(&mut node.port, want_varint(&f, M)? as i32, M, 4),
        5 => set_once(&mut node.is_recovery, want_varint(&f, M)? != 0, M, 5),
        10 => set_once(&mut node.customer_id, want_varint(&f, M)? as i32, M, 10),
        _ => keep_unknown(&mut node.unknown, src, &f),
    })?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        Bytes::from(
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn add_node_request_from_protocol_md() {
        let raw = hex(
            "08ffffffff07 1a1f 0802 121b 0800 10ffffffff07 1a09 3132372e302e302e31 2093c902 2800 5000
             2000 2800 3000 4000 50ffffffff07 6000 6800",
        );
        let meta = parse_meta(&raw).unwrap();
        assert_eq!(meta.head, Some(K_EMPTY));
        let control = meta.control_message().unwrap();
        assert_eq!(control.command(), ControlCommand::AddNode);
        let node = &control.node[0];
        assert_eq!(node.role(), Role::Server);
        assert_eq!(node.id, Some(K_EMPTY));
        assert_eq!(node.hostname_str(), "127.0.0.1");
        assert_eq!(node.port, Some(42131));
        assert_eq!(meta.customer_id, Some(K_EMPTY));
        assert_eq!(meta.encode(), raw);
    }

    #[test]
    fn push_request_from_the_walkthrough() {
        let raw = hex("0800 2001 2801 3000 3800 4003 4a03080b03 5000 6000 6800");
        let meta = parse_meta(&raw).unwrap();
        assert!(meta.is_request() && meta.is_push() && !meta.is_pull());
        assert_eq!(meta.timestamp(), 3);
        assert_eq!(
            meta.data_types().collect::<Vec<_>>(),
            [DataType::Uint64, DataType::Other, DataType::Int32]
        );
        assert_eq!(meta.encode(), raw);
    }

    #[test]
    fn negative_barrier_group_and_unknown_fields_round_trip() {
        let mut meta = Meta {
            head: Some(K_EMPTY),
            ..Meta::default()
        };
        meta.control = Some(Control {
            cmd: Some(3),
            barrier_group: Some(-2_088_777_088),
            ..Control::default()
        });
        let mut raw = meta.encode();
        raw.extend([0xa0, 0x06, 0x05]); // field 100, varint 5: unknown
        let raw = Bytes::from(raw);
        let decoded = parse_meta(&raw).unwrap();
        assert_eq!(
            decoded.control.as_ref().unwrap().barrier_group,
            Some(-2_088_777_088)
        );
        assert_eq!(
            decoded.unknown,
            vec![Bytes::from_static(&[0xa0, 0x06, 0x05])]
        );
        assert_eq!(decoded.encode(), raw);
    }

    #[test]
    fn hostile_metas_are_typed_errors() {
        assert_eq!(parse_meta(&hex("08ffff")), Err(MetaError::TruncatedVarint));
        assert_eq!(
            parse_meta(&hex("12ffffffff0f00")),
            Err(MetaError::Truncated { field: 2 })
        );
        assert_eq!(
            parse_meta(&hex("0800 0801")),
            Err(MetaError::DuplicateField {
                message: "PBMeta",
                field: 1
            })
        );
        assert_eq!(
            parse_meta(&hex("0a00")),
            Err(MetaError::WireType {
                message: "PBMeta",
                field: 1,
                wire_type: 2
            })
        );
        assert_eq!(parse_meta(&hex("0000")), Err(MetaError::BadKey(0)));
        let mut many = vec![0x4a, 0xd0, 0x0f];
        many.extend(std::iter::repeat_n(0x08, 2000));
        assert_eq!(
            parse_meta(&Bytes::from(many)),
            Err(MetaError::TooMany {
                what: "data types",
                max: 16
            })
        );
    }
}
