//! How a split key is stored on its server (a [`Layout`] of slice keys), message
//! bodies as zero-copy [`Pieces`], and the wire encoding of one slice request.

use bytes::Bytes;
use p3proxy_parsers::zmtp::FrameHeader;

/// How one big key is stored on its server: `count` slice keys from `first`, each
/// `slice` bytes but the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// The original ps-lite key.
    pub key: u64,
    /// The `head` of its init push (dtype; dense).
    pub head: i32,
    /// Bytes of the whole value.
    pub total: u64,
    /// Bytes per slice (a multiple of the element size).
    pub slice: u64,
    /// ps-lite key of the first slice.
    pub first: u64,
    /// Number of slices.
    pub count: u32,
}

impl Layout {
    /// Byte range of slice `i` in the whole value.
    pub fn range(&self, i: u32) -> (u64, u64) {
        let off = u64::from(i) * self.slice;
        (off, self.slice.min(self.total - off))
    }

    /// Index of a slice key.
    pub fn index_of(&self, ps_key: u64) -> Option<u32> {
        let i = ps_key.checked_sub(self.first)?;
        (i < u64::from(self.count)).then_some(i as u32)
    }
}

/// A message body as zero-copy pieces (a frame's bytes may span several).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pieces {
    /// The pieces, in order.
    pub parts: Vec<Bytes>,
    /// Their total length.
    pub len: u64,
}

impl Pieces {
    /// One piece.
    pub fn one(b: Bytes) -> Pieces {
        Pieces {
            len: b.len() as u64,
            parts: vec![b],
        }
    }

    /// Bytes `off..off + n`, zero-copy.
    pub fn range(&self, off: u64, n: u64) -> Vec<Bytes> {
        byte_range(&self.parts, off, n)
    }

    /// The bytes as little-endian words of `N` bytes (keys: u64, lens: i32), if they
    /// divide evenly.
    pub fn le_words<const N: usize, T>(&self, word: fn([u8; N]) -> T) -> Option<Vec<T>> {
        let bytes = self.to_vec();
        (bytes.len() % N == 0).then(|| {
            bytes
                .chunks_exact(N)
                .map(|c| word(c.try_into().expect("N bytes")))
                .collect()
        })
    }

    /// The bytes, copied (small frames: keys, lens).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.iter().flat_map(|p| p.iter().copied()).collect()
    }
}

/// Bytes `off..off + n` of the message held as `parts`, zero-copy.
pub fn byte_range(parts: &[Bytes], mut off: u64, n: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut left = n;
    for p in parts {
        if left == 0 {
            break;
        }
        let len = p.len() as u64;
        if off >= len {
            off -= len;
            continue;
        }
        let take = left.min(len - off);
        out.push(p.slice(off as usize..(off + take) as usize));
        left -= take;
        off = 0;
    }
    out
}

/// The wire encoding of a message whose frames are given as pieces: libzmq's header
/// forms (long above 255 bytes), MORE on all but the last.
pub fn encode_message(frames: &[Pieces]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(frames.len() * 2);
    for (i, f) in frames.iter().enumerate() {
        let mut header = Vec::with_capacity(9);
        FrameHeader::canonical(f.len, i + 1 < frames.len(), false).encode_into(&mut header);
        out.push(Bytes::from(header));
        out.extend(f.parts.iter().filter(|p| !p.is_empty()).cloned());
    }
    out
}

/// The wire pieces of the request for slice `i` of `layout`: the request's meta frame
/// unchanged, the slice key, and for a push the slice's bytes and their length (a
/// pull sends an empty vals frame, as ZPull does).
pub fn slice_request(meta: &Pieces, layout: &Layout, i: u32, vals: Option<Pieces>) -> Vec<Bytes> {
    let key = layout.first + u64::from(i);
    let keys = Pieces::one(Bytes::copy_from_slice(&key.to_le_bytes()));
    match vals {
        Some(vals) => {
            let lens = Pieces::one(Bytes::copy_from_slice(&(vals.len as i32).to_le_bytes()));
            encode_message(&[meta.clone(), keys, vals, lens])
        }
        None => encode_message(&[meta.clone(), keys, Pieces::default()]),
    }
}

/// How big a split key's slices are and how many slice keys a server gets (the
/// init decision, DESIGN.md §7).
///
/// Cutting a key into `n` slices takes about `T / n` off its round trip (push,
/// update and pull of one slice overlap the next) but costs `n` slice requests of
/// server time `c` each, one Python update call per slice key and iteration on
/// MXNet's server. `T / n + n c` is least at `n = sqrt(T / c)`: slices of
/// `sqrt(total * cost_bytes)` bytes, where `cost_bytes = c * link rate` is what the
/// link carries while the server handles one slice request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Smallest slice in bytes (rounded down to whole elements).
    pub min_slice: u64,
    /// `cost_bytes` for a server no worker shares a host with (0: every slice
    /// `min_slice`, as P3 cuts them).
    pub cost_bytes: u64,
    /// `cost_bytes` for a server that shares its host with a worker: its updates take
    /// the cores the training needs.
    pub shared_cost_bytes: u64,
    /// Most slice requests per server and iteration: a slice key costs one request per
    /// worker and iteration (`u64::MAX`: no budget).
    pub max_requests: u64,
}

impl Sizing {
    /// Every slice `min_slice` bytes, no budget: the layout before sizing existed.
    pub const fn uniform(min_slice: u64) -> Sizing {
        Sizing {
            min_slice,
            cost_bytes: 0,
            shared_cost_bytes: 0,
            max_requests: u64::MAX,
        }
    }

    /// Slice keys a server with `workers` workers may hold.
    pub fn max_slices(&self, workers: usize) -> u64 {
        self.max_requests / (workers.max(1) as u64)
    }

    /// Bytes per slice and slice count for a key of `total` bytes of `elem`-byte
    /// elements, with at most `left` slice keys still in the server's budget. `None`:
    /// the key stays whole (fewer than two slices).
    pub fn slicing(&self, total: u64, elem: u64, shared: bool, left: u64) -> Option<(u64, u64)> {
        let elem = elem.max(1);
        let cost = if shared {
            self.shared_cost_bytes
        } else {
            self.cost_bytes
        };
        let ideal = (u128::from(total) * u128::from(cost)).isqrt() as u64;
        let mut slice = (self.min_slice.max(ideal) / elem).max(1) * elem;
        if total.div_ceil(slice) > left {
            // Coarser slices, as many as the budget has left.
            slice = total.div_ceil(left.max(1)).div_ceil(elem) * elem;
        }
        let count = total.div_ceil(slice);
        (count >= 2).then_some((slice, count))
    }
}

#[cfg(test)]
mod tests {
    use super::Sizing;

    #[test]
    fn slices_are_the_square_root_rule_in_whole_elements_within_the_budget() {
        let s = Sizing {
            min_slice: 160_000,
            cost_bytes: 0,
            shared_cost_bytes: 160_000,
            max_requests: u64::MAX,
        };
        // Uniform where no worker shares the host.
        assert_eq!(
            s.slicing(41_104_000, 4, false, u64::MAX),
            Some((160_000, 257))
        );
        // sqrt(41,104,000 * 160,000) = 2,564,496.05 -> 2,564,496 (whole f32).
        assert_eq!(
            s.slicing(41_104_000, 4, true, u64::MAX),
            Some((2_564_496, 17))
        );
        // sqrt(200,000 * 160,000) = 178,885.4 -> 178,884: two slices.
        assert_eq!(s.slicing(200_000, 4, true, u64::MAX), Some((178_884, 2)));
        // At most the cost: one slice, so whole.
        assert_eq!(s.slicing(160_000, 4, true, u64::MAX), None);
        assert_eq!(s.slicing(320_000, 4, false, u64::MAX), Some((160_000, 2)));
        // The budget coarsens the slices (rounded up to whole f64s), then refuses.
        assert_eq!(s.slicing(1_600_000, 8, false, 3), Some((533_336, 3)));
        assert_eq!(s.slicing(1_600_000, 8, false, 1), None);
        assert_eq!(s.slicing(1_600_000, 8, false, 0), None);
        // Odd element sizes stay whole elements.
        assert_eq!(s.slicing(1_000, 3, false, u64::MAX), None);
        let tiny = Sizing::uniform(401);
        assert_eq!(tiny.slicing(1_002, 2, false, u64::MAX), Some((400, 3)));
        assert_eq!(tiny.max_slices(2), u64::MAX / 2);
        assert_eq!(
            Sizing {
                max_requests: 24,
                ..tiny
            }
            .max_slices(0),
            24
        );
    }
}
