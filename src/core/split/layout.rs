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
