//! One request for a split key rewritten as its slice requests: checked against the
//! layout (anything it cannot serve stops the server's traffic), tracked for the
//! merge, cut zero-copy; and pushes streamed to the server slice by slice as their
//! bytes arrive.

use std::net::SocketAddr;

use p3proxy_parsers::mxnet::DataHandleType;
use p3proxy_parsers::pslite::Meta;

use super::{
    slice_request, Correlation, DataRequest, Failure, HeadPlan, KeyState, Layout, Merge, Pieces,
    RequestPlan, Splitter, MAX_TRACKED,
};

impl Splitter {
    /// The slice requests that replace a whole request for split `key` (`init`: its
    /// init push, whose answer later requests for the key wait for).
    pub(super) fn split_request(
        &mut self,
        server: SocketAddr,
        corr: Option<Correlation>,
        key: u64,
        layout: Layout,
        req: &DataRequest<'_>,
        init: bool,
    ) -> RequestPlan {
        let stop = |this: &mut Self, reason: &'static str, detail: String| {
            RequestPlan::Stop(this.fail(server, Some(key), reason, detail))
        };
        if req.meta.head() != layout.head {
            let shape = |head: i32| match DataHandleType::from_head(head) {
                Some(h) => format!("{:?} {:?}", h.request_type, h.dtype),
                None => format!("head {head}"),
            };
            return stop(
                self,
                "layout_mismatch",
                format!(
                    "a {} request; the split layout holds {}",
                    shape(req.meta.head()),
                    shape(layout.head)
                ),
            );
        }
        if req.keys.len() != 1 {
            return stop(
                self,
                "layout_mismatch",
                format!(
                    "a request for {} keys includes split key {key}",
                    req.keys.len()
                ),
            );
        }
        let push = req.meta.is_push();
        if push {
            if req.vals.len != layout.total || req.lens != Some(&[layout.total as i32][..]) {
                return stop(
                    self,
                    "layout_mismatch",
                    format!(
                        "{} bytes pushed, lens {:?}; the split layout holds {} bytes",
                        req.vals.len, req.lens, layout.total
                    ),
                );
            }
        } else if req.vals.len != 0 || req.lens.is_some_and(|l| !l.is_empty()) {
            return stop(
                self,
                "layout_mismatch",
                format!("a pull carrying {} bytes", req.vals.len),
            );
        }
        let Some(corr) = corr else {
            return stop(self, "no_node_table", "the server's id is unknown".into());
        };
        if self.pending.contains_key(&corr) || self.outstanding.contains_key(&corr) {
            return stop(
                self,
                "duplicate_request",
                format!(
                    "timestamp {} of customer {} from worker {} is already in flight",
                    corr.3, corr.2, corr.1
                ),
            );
        }
        if self.tracked() >= MAX_TRACKED {
            return stop(
                self,
                "too_many_requests",
                format!("more than {MAX_TRACKED} requests in flight"),
            );
        }
        let mut merge = Merge::new(layout, req.meta.is_pull());
        let init_keys = if init { &[key][..] } else { &[] };
        merge.awaited = self.awaited(server, corr, req.meta, &[key], init_keys);
        self.pending.insert(corr, merge);
        let meta = Pieces::one(req.meta_frame.clone());
        let messages = (0..layout.count)
            .map(|i| {
                let vals = push.then(|| {
                    let (off, len) = layout.range(i);
                    Pieces {
                        parts: req.vals.range(off, len),
                        len,
                    }
                });
                slice_request(&meta, &layout, i, vals)
            })
            .collect();
        RequestPlan::Split(messages)
    }

    /// The head of a data request to local server `server` whose bytes still arrive
    /// (its meta, keys, and the length of its vals frame): a push of a split key may
    /// go to the server slice by slice as its bytes come in. Anything unusual waits
    /// for the whole message, where every check runs.
    pub fn on_request_head(
        &mut self,
        server: SocketAddr,
        sender: i32,
        meta: &Meta,
        keys: &[u64],
        vals_len: u64,
    ) -> HeadPlan {
        if let Some(f) = self.failed(server) {
            return HeadPlan::Stop(f);
        }
        let Some(state) = self.servers.get(&server) else {
            return HeadPlan::Whole;
        };
        let (Some(id), [key]) = (state.id, keys) else {
            return HeadPlan::Whole;
        };
        let Some(KeyState::Split(layout)) = state.keys.get(key).copied() else {
            return HeadPlan::Whole;
        };
        let corr = (id, sender, meta.customer_id(), meta.timestamp());
        let fits = meta.is_request()
            && meta.is_push()
            && !meta.is_simple_app()
            && meta.head() == layout.head
            && vals_len == layout.total;
        let tracked = self.pending.contains_key(&corr) || self.outstanding.contains_key(&corr);
        let held = self.waits_for_answers(server)
            && self.order.hold_reason(id, sender, &[*key], false).is_some();
        if !fits || tracked || self.tracked() >= MAX_TRACKED || held {
            return HeadPlan::Whole;
        }
        // A push: nothing waits for it.
        self.pending
            .insert(corr, Merge::new(layout, meta.is_pull()));
        HeadPlan::Stream(layout)
    }

    /// A streamed request is complete: its lens frame must be the layout's.
    pub fn finish_streamed(
        &mut self,
        server: SocketAddr,
        layout: &Layout,
        lens: Option<&[i32]>,
    ) -> Option<Failure> {
        if lens == Some(&[layout.total as i32][..]) {
            return None;
        }
        Some(self.fail(
            server,
            Some(layout.key),
            "layout_mismatch",
            format!(
                "lens {lens:?} after {} bytes streamed as slices",
                layout.total
            ),
        ))
    }
}
