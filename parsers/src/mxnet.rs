//! What MXNet 1.9.1's kvstore means by ps-lite fields (PROTOCOL.md §5-6):
//! SimpleApp command types, the data-handle type in `head`, and the key ranges
//! that map a ps-lite key to its server.

/// SimpleApp command types (`CommandType` in kvstore_dist_server.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandType {
    /// 0: set the server-side optimizer (body: protocol-0 pickle).
    Controller,
    /// 1: keep fp32 master copies of fp16 weights.
    SetMultiPrecision,
    /// 2: stop the server.
    StopServer,
    /// 3: synchronous mode (`dist_sync`).
    SyncMode,
    /// 4: gradient compression (body: `type,threshold`).
    SetGradientCompression,
    /// 5: profiler parameters.
    SetProfilerParams,
    /// Anything else: unknown to MXNet 1.9.1.
    Other(i32),
}

impl From<i32> for CommandType {
    fn from(head: i32) -> CommandType {
        match head {
            0 => CommandType::Controller,
            1 => CommandType::SetMultiPrecision,
            2 => CommandType::StopServer,
            3 => CommandType::SyncMode,
            4 => CommandType::SetGradientCompression,
            5 => CommandType::SetProfilerParams,
            v => CommandType::Other(v),
        }
    }
}

/// Request type, the first half of a data message's `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// 0: dense push/pull/pushpull.
    Default,
    /// 1: row-sparse push/pull.
    RowSparse,
    /// 2: compressed (2-bit) push.
    Compressed,
    /// Anything else.
    Other(u64),
}

/// mshadow element type, the second half of a data message's `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 0
    Float32,
    /// 1
    Float64,
    /// 2
    Float16,
    /// 3
    Uint8,
    /// 4
    Int32,
    /// 5
    Int8,
    /// 6
    Int64,
    /// 7
    Bool,
    /// 8
    Int16,
    /// 9
    Uint16,
    /// 10
    Uint32,
    /// 11
    Uint64,
    /// 12
    Bfloat16,
    /// Anything else.
    Other(u64),
}

impl Dtype {
    /// Bytes per element, where known.
    pub fn size(&self) -> Option<usize> {
        Some(match self {
            Dtype::Float64 | Dtype::Int64 | Dtype::Uint64 => 8,
            Dtype::Float32 | Dtype::Int32 | Dtype::Uint32 => 4,
            Dtype::Float16 | Dtype::Int16 | Dtype::Uint16 | Dtype::Bfloat16 => 2,
            Dtype::Uint8 | Dtype::Int8 | Dtype::Bool => 1,
            Dtype::Other(_) => return None,
        })
    }

    fn from_code(code: u64) -> Dtype {
        match code {
            0 => Dtype::Float32,
            1 => Dtype::Float64,
            2 => Dtype::Float16,
            3 => Dtype::Uint8,
            4 => Dtype::Int32,
            5 => Dtype::Int8,
            6 => Dtype::Int64,
            7 => Dtype::Bool,
            8 => Dtype::Int16,
            9 => Dtype::Uint16,
            10 => Dtype::Uint32,
            11 => Dtype::Uint64,
            12 => Dtype::Bfloat16,
            c => Dtype::Other(c),
        }
    }

    fn code(&self) -> u64 {
        match self {
            Dtype::Float32 => 0,
            Dtype::Float64 => 1,
            Dtype::Float16 => 2,
            Dtype::Uint8 => 3,
            Dtype::Int32 => 4,
            Dtype::Int8 => 5,
            Dtype::Int64 => 6,
            Dtype::Bool => 7,
            Dtype::Int16 => 8,
            Dtype::Uint16 => 9,
            Dtype::Uint32 => 10,
            Dtype::Uint64 => 11,
            Dtype::Bfloat16 => 12,
            Dtype::Other(c) => *c,
        }
    }
}

/// The `head` of a data message: request type and dtype, Cantor-paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataHandleType {
    /// How the values are laid out.
    pub request_type: RequestType,
    /// Element type.
    pub dtype: Dtype,
}

impl DataHandleType {
    /// Inverts MXNet's pairing `(m+d)(m+d+1)/2 + d`; `None` for a negative head.
    pub fn from_head(head: i32) -> Option<DataHandleType> {
        let z = u64::try_from(head).ok()?;
        // w = floor((sqrt(8z+1)-1)/2), computed exactly in integers.
        let mut w = ((((8 * z + 1) as f64).sqrt() - 1.0) / 2.0) as u64;
        while w * (w + 1) / 2 > z {
            w -= 1;
        }
        while (w + 1) * (w + 2) / 2 <= z {
            w += 1;
        }
        let d = z - w * (w + 1) / 2;
        let m = w - d;
        let request_type = match m {
            0 => RequestType::Default,
            1 => RequestType::RowSparse,
            2 => RequestType::Compressed,
            m => RequestType::Other(m),
        };
        Some(DataHandleType {
            request_type,
            dtype: Dtype::from_code(d),
        })
    }

    /// The `head` value MXNet would send.
    pub fn to_head(&self) -> i32 {
        let m = match self.request_type {
            RequestType::Default => 0,
            RequestType::RowSparse => 1,
            RequestType::Compressed => 2,
            RequestType::Other(m) => m,
        };
        let d = self.dtype.code();
        ((m + d) * (m + d + 1) / 2 + d) as i32
    }
}

/// MXNet's default bound above which an array is split across all servers
/// (`MXNET_KVSTORE_BIGARRAY_BOUND`).
pub const BIGARRAY_BOUND: u64 = 1_000_000;

/// Server key ranges for a job with `num_servers` servers: server `s` owns
/// `[begin(s), begin(s+1))` with `begin(s) = (2^64-1)/S * s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRanges {
    num_servers: u64,
}

/// A ps-lite key read back as MXNet's server reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedKey {
    /// Server rank owning the key.
    pub server: u64,
    /// Offset from the start of that server's range.
    pub offset: u64,
}

impl DecodedKey {
    /// The key as the server stores it: `int(ps_key - begin)`, so offsets of 2^31
    /// and above become negative (where split slice keys live).
    pub fn server_key(&self) -> i32 {
        self.offset as i32
    }
}

impl ServerRanges {
    /// Ranges for `num_servers` servers (at least one).
    pub fn new(num_servers: u64) -> Option<ServerRanges> {
        (num_servers > 0).then_some(ServerRanges { num_servers })
    }

    /// Number of servers.
    pub fn num_servers(&self) -> u64 {
        self.num_servers
    }

    /// First ps-lite key of server `s`.
    pub fn begin(&self, s: u64) -> u64 {
        u64::MAX / self.num_servers * s
    }

    /// Which server owns a ps-lite key, and the offset within its range. `None`
    /// for the few keys past the last range (the division rounds down).
    pub fn decode(&self, ps_key: u64) -> Option<DecodedKey> {
        let width = u64::MAX / self.num_servers;
        let server = ps_key / width;
        (server < self.num_servers).then(|| DecodedKey {
            server,
            offset: ps_key - server * width,
        })
    }

    /// The ps-lite keys and element counts MXNet's `EncodeDefaultKey` produces for
    /// a dense array of `n_elems` elements: one server below `bound`, else one
    /// part per server.
    pub fn encode_default_key(&self, key: u64, n_elems: u64, bound: u64) -> Vec<(u64, u64)> {
        let s = self.num_servers;
        if n_elems < bound {
            let server = key.wrapping_mul(9973) % s;
            return vec![(self.begin(server) + key, n_elems)];
        }
        let at = |i: u64| (n_elems as f64 / s as f64 * i as f64).round() as u64;
        (0..s)
            .map(|i| (self.begin(i) + key, at(i + 1) - at(i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_seen_in_the_captures() {
        let default_f32 = DataHandleType {
            request_type: RequestType::Default,
            dtype: Dtype::Float32,
        };
        assert_eq!(DataHandleType::from_head(0), Some(default_f32));
        let f16 = DataHandleType::from_head(5).unwrap();
        assert_eq!(
            f16,
            DataHandleType {
                request_type: RequestType::Default,
                dtype: Dtype::Float16
            }
        );
        let rsp = DataHandleType::from_head(1).unwrap();
        assert_eq!(rsp.request_type, RequestType::RowSparse);
        let comp = DataHandleType::from_head(3).unwrap();
        assert_eq!(
            comp,
            DataHandleType {
                request_type: RequestType::Compressed,
                dtype: Dtype::Float32
            }
        );
        for head in 0..10_000 {
            assert_eq!(DataHandleType::from_head(head).unwrap().to_head(), head);
        }
        assert_eq!(DataHandleType::from_head(-1), None);
    }

    #[test]
    fn two_server_ranges_match_runb() {
        let r = ServerRanges::new(2).unwrap();
        assert_eq!(r.begin(1), 0x7FFF_FFFF_FFFF_FFFF);
        assert_eq!(
            r.decode(0x8000_0000_0000_0000),
            Some(DecodedKey {
                server: 1,
                offset: 1
            })
        );
        assert_eq!(
            r.decode(1),
            Some(DecodedKey {
                server: 0,
                offset: 1
            })
        );
        assert_eq!(r.decode(u64::MAX), None);
        assert_eq!(r.decode(0x8000_0000_0000_0002).unwrap().offset, 3);
        // key 1 of 1.1 M floats: one 550,000-element part per server.
        assert_eq!(
            r.encode_default_key(1, 1_100_000, BIGARRAY_BOUND),
            vec![(1, 550_000), (0x8000_0000_0000_0000, 550_000)]
        );
        // key 3 of 1000 floats lands on server (3*9973)%2 = 1.
        assert_eq!(
            r.encode_default_key(3, 1000, BIGARRAY_BOUND),
            vec![(0x8000_0000_0000_0002, 1000)]
        );
        // Slice keys above 2^31 decode to negative server keys.
        let slice = r.decode(r.begin(1) + (1 << 31)).unwrap();
        assert_eq!(slice.server_key(), i32::MIN);
    }
}
