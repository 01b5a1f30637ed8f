//! Slice responses merged back into the one response the server would have sent
//! for the whole key: here in front of the server ([`Merge`]), or on the worker's
//! proxy from the parts a peer streamed ([`Merger`]).

use std::collections::HashMap;

use bytes::Bytes;
use p3proxy_parsers::pslite::Meta;

use super::super::order::Awaited;
use super::super::slice::Part;
use super::{encode_message, Layout, Pieces, MAX_TRACKED};

/// The slice responses of one request, merged into the response the server would
/// have sent for the whole key.
#[derive(Debug)]
pub(super) struct Merge {
    pub(super) layout: Layout,
    pub(super) pull: bool,
    /// What later requests wait for until it is merged.
    pub(super) awaited: Option<Awaited>,
    pub(super) got: u32,
    pub(super) seen: Vec<bool>,
    pub(super) meta_frame: Option<Bytes>,
    pub(super) vals: Vec<Vec<Bytes>>,
}

impl Merge {
    pub(super) fn new(layout: Layout, pull: bool) -> Merge {
        Merge {
            layout,
            pull,
            awaited: None,
            got: 0,
            seen: vec![false; layout.count as usize],
            meta_frame: None,
            vals: vec![Vec::new(); if pull { layout.count as usize } else { 0 }],
        }
    }

    /// Takes the response to slice `index`; once every slice is in, the merged
    /// response (`keep`: built from the values kept; else empty: the peer merges).
    pub(super) fn absorb(
        &mut self,
        index: u32,
        meta_frame: &Bytes,
        data: &[Pieces],
        keep: bool,
    ) -> Result<Option<Vec<Bytes>>, String> {
        let layout = self.layout;
        if self.meta_frame.as_ref().is_some_and(|m| m != meta_frame) {
            return Err("slice responses of one request differ in their meta".into());
        }
        if index >= layout.count || self.seen[index as usize] {
            return Err(format!(
                "slice {index} of {} answered twice or out of range",
                layout.count
            ));
        }
        if self.pull {
            let (_, len) = layout.range(index);
            let lens = data.get(2).map(Pieces::to_vec).unwrap_or_default();
            if data.len() != 3 || data[1].len != len || lens != (len as i32).to_le_bytes() {
                let got = data.get(1).map_or(0, |v| v.len);
                return Err(format!(
                    "slice {index} answered with {got} bytes, lens {lens:?}; expected {len}"
                ));
            }
            if keep {
                self.vals[index as usize] = data[1].parts.clone();
            }
        } else if !data.is_empty() {
            return Err("a push ack with data".into());
        }
        self.seen[index as usize] = true;
        self.got += 1;
        self.meta_frame = Some(meta_frame.clone());
        if self.got < layout.count {
            return Ok(None);
        }
        if !keep {
            return Ok(Some(Vec::new()));
        }
        let meta = Pieces::one(meta_frame.clone());
        if !self.pull {
            return Ok(Some(encode_message(&[meta])));
        }
        let keys = Pieces::one(Bytes::copy_from_slice(&layout.key.to_le_bytes()));
        let vals = Pieces {
            parts: std::mem::take(&mut self.vals)
                .into_iter()
                .flatten()
                .collect(),
            len: layout.total,
        };
        let lens = Pieces::one(Bytes::copy_from_slice(&(layout.total as i32).to_le_bytes()));
        Ok(Some(encode_message(&[meta, keys, vals, lens])))
    }
}

/// The receiving side of deferred merges: a peer proxy's parts of split keys'
/// responses, merged into the one response the worker expects (per tunnel session,
/// which is one server's responses to one worker).
#[derive(Debug, Default)]
pub struct Merger {
    merges: HashMap<(i32, i32), Merge>,
}

impl Merger {
    /// Takes one part (a slice-key response and what the peer said it is); the merged
    /// response once every part is in.
    pub fn on_part(
        &mut self,
        meta: &Meta,
        meta_frame: &Bytes,
        data: &[Pieces],
        part: Part,
    ) -> Result<Option<Vec<Bytes>>, String> {
        let sane = part.slice > 0
            && part.total <= i32::MAX as u64
            && part.count > 0
            && u64::from(part.count) == part.total.div_ceil(part.slice);
        if !sane || meta.is_request() {
            return Err(format!("a part that describes no layout: {part:?}"));
        }
        let corr = (meta.customer_id(), meta.timestamp());
        if !self.merges.contains_key(&corr) && self.merges.len() >= MAX_TRACKED {
            return Err(format!("more than {MAX_TRACKED} merges in flight"));
        }
        let layout = Layout {
            key: part.key,
            head: meta.head(),
            total: part.total,
            slice: part.slice,
            first: 0,
            count: part.count,
        };
        let m = self
            .merges
            .entry(corr)
            .or_insert_with(|| Merge::new(layout, meta.is_pull()));
        if m.layout != layout || m.pull != meta.is_pull() {
            return Err(format!("part {part:?} does not match the parts before it"));
        }
        let merged = m.absorb(part.index, meta_frame, data, true);
        if !matches!(merged, Ok(None)) {
            self.merges.remove(&corr);
        }
        merged
    }

    /// Merges waiting for parts.
    pub fn waiting(&self) -> usize {
        self.merges.len()
    }
}
