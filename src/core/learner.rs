//! Learning each key's true layer priority from the traffic (DESIGN.md §5, the
//! `learned` source), sans-IO: time is passed in.
//!
//! Backward produces the last layer's gradient first, so the order in which keys'
//! pushpulls first appear in a round is reverse layer order: the last key to appear is
//! the first weight the next forward pass needs. Keys that arrive in one burst (gaps
//! under `burst_gap`) are ties. The order is trusted only once `stable_rounds`
//! consecutive rounds agreed (no two keys in opposite orders; jitter may make a tie in
//! one round and two groups in the next), and only if it says more than "everything
//! at once" or "in key order": a CPU job sends every pushpull after backward, in key
//! order, in one burst, and that teaches nothing. A round that contradicts the trusted
//! order starts the count again (the model changed: relearn).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Defaults: a gap this small is a tie (one burst from one engine loop).
pub const DEFAULT_BURST_GAP: Duration = Duration::from_millis(2);
/// Defaults: rounds that must agree before the order is trusted.
pub const DEFAULT_STABLE_ROUNDS: usize = 3;
/// Default share of the bytes the learned order defers (see [`Learner::set_defer`]).
pub const DEFAULT_DEFER: f64 = 0.2;

/// Keys grouped into ties, in order of arrival within a round.
type Grouping = Vec<Vec<u64>>;

/// What a finished round did to the learner's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundOutcome {
    /// Not enough agreeing rounds yet.
    Learning {
        /// Consecutive agreeing rounds so far.
        agreeing: usize,
    },
    /// The order became trusted with this round.
    Trusted,
    /// The trusted order still holds.
    Unchanged,
    /// The round teaches nothing beyond the app's loop order (one burst).
    Uninformative,
    /// A trusted order stopped holding: none until relearned (the job's order, if this
    /// proxy's is the job's, goes back to key order: `crate::core::job_order`).
    Distrusted,
}

/// The learner of one proxy (one job).
#[derive(Debug)]
pub struct Learner {
    burst_gap: Duration,
    stable_rounds: usize,
    /// Arrivals of the round in progress.
    current: Vec<(Instant, u64)>,
    seen: HashSet<u64>,
    /// The grouping the last rounds agreed on, and how many did.
    candidate: Option<(Grouping, usize)>,
    /// Each key's arrival after its round's first, summed over the agreeing rounds (ms).
    offsets: HashMap<u64, f64>,
    /// Priority by key once trusted (1 = most urgent).
    trusted: Option<HashMap<u64, u32>>,
    /// The grouping the trusted priorities came from.
    trusted_groups: Grouping,
    /// Mean arrival offset per key over the rounds that made the order trusted (ms).
    trusted_offsets: HashMap<u64, f64>,
    /// Bytes per key, from its last push.
    bytes: HashMap<u64, u64>,
    /// Share of the bytes deferred (0: strict layer order).
    defer: f64,
}

impl Default for Learner {
    fn default() -> Self {
        Learner::new(DEFAULT_BURST_GAP, DEFAULT_STABLE_ROUNDS)
    }
}

impl Learner {
    /// A learner treating gaps under `burst_gap` as ties, trusting after `stable_rounds`.
    pub fn new(burst_gap: Duration, stable_rounds: usize) -> Learner {
        Learner {
            burst_gap,
            stable_rounds: stable_rounds.max(1),
            current: Vec::new(),
            seen: HashSet::new(),
            candidate: None,
            offsets: HashMap::new(),
            trusted: None,
            trusted_groups: Vec::new(),
            trusted_offsets: HashMap::new(),
            bytes: HashMap::new(),
            defer: DEFAULT_DEFER,
        }
    }

    /// The order the trusted grouping becomes: 0 is strict layer order (the first
    /// layer first). Above 0, production order (the order backward hands the keys
    /// out, so every worker's proxy sends the same sequence and the server pairs the
    /// workers' pushes early), except the first-produced layers holding `share` of the
    /// bytes - the last layers, which the next forward needs last - which go after
    /// everything else, in forward order, while the next forward runs the first
    /// layers. The cut lands after a pause in backward that every worker's proxy sees
    /// (see `deferred_groups`), so the share is a lower bound: one big layer can take it
    /// far past (VGG-19: 20% asked, about 98% deferred). Measured on the testbed
    /// (README, "The deferred tail").
    pub fn set_defer(&mut self, share: f64) {
        self.defer = share.clamp(0.0, 1.0);
        if self.trusted.is_some() {
            self.trusted = Some(self.ranks(&self.trusted_groups));
        }
    }

    /// The deferred share in use.
    pub fn defer(&self) -> f64 {
        self.defer
    }

    /// Whether the learned order is trusted (this proxy's; the job uses the lowest
    /// worker's, `crate::core::job_order`).
    pub fn is_trusted(&self) -> bool {
        self.trusted.is_some()
    }

    /// The learned priority of `key` (1 = most urgent), if trusted and known.
    pub fn priority(&self, key: u64) -> Option<u32> {
        self.trusted.as_ref()?.get(&key).copied()
    }

    /// The trusted order: (learning key, priority), most urgent first.
    pub fn order(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = self
            .trusted
            .iter()
            .flatten()
            .map(|(k, p)| (*k, *p))
            .collect();
        v.sort_by_key(|&(k, p)| (p, k));
        v
    }

    /// When `key`'s push appeared after its round's first, mean over the rounds that
    /// made the order trusted (ms): the production timing the order came from.
    pub fn offset_ms(&self, key: u64) -> Option<f64> {
        self.trusted.as_ref()?;
        self.trusted_offsets.get(&key).copied()
    }

    /// A key's pushpull (after init) appeared at `now`. A key seen again closes the
    /// round in progress; the outcome of that round is returned.
    #[must_use]
    pub fn observe(&mut self, key: u64, bytes: u64, now: Instant) -> Option<RoundOutcome> {
        self.bytes.insert(key, bytes);
        let outcome = if self.seen.contains(&key) {
            Some(self.finish_round())
        } else {
            None
        };
        self.seen.insert(key);
        self.current.push((now, key));
        outcome
    }

    fn finish_round(&mut self) -> RoundOutcome {
        let mut arrivals = std::mem::take(&mut self.current);
        self.seen.clear();
        arrivals.sort();
        let first = arrivals.first().map(|&(t, _)| t);
        let round_offsets: HashMap<u64, f64> = arrivals
            .iter()
            .map(|&(t, k)| {
                let since = first.map_or(Duration::ZERO, |f| t.saturating_duration_since(f));
                (k, since.as_secs_f64() * 1e3)
            })
            .collect();
        let mut groups: Grouping = Vec::new();
        let mut last: Option<Instant> = None;
        for (t, k) in arrivals {
            match last {
                Some(prev) if t.saturating_duration_since(prev) < self.burst_gap => {
                    groups.last_mut().expect("a group is open").push(k)
                }
                _ => groups.push(vec![k]),
            }
            last = Some(t);
        }
        for g in &mut groups {
            g.sort_unstable();
        }
        let flat: Vec<u64> = groups.iter().flatten().copied().collect();
        if groups.len() < 2 || flat.windows(2).all(|w| w[0] < w[1]) {
            // One burst, or ascending key order: the app's loop order (Trainer's loop
            // over its keys), nothing about layers.
            self.candidate = None;
            return if self.trusted.take().is_some() {
                RoundOutcome::Distrusted
            } else {
                RoundOutcome::Uninformative
            };
        }
        let agreeing = match &mut self.candidate {
            Some((g, n)) if agree(g, &groups) => {
                *n += 1;
                *g = groups.clone();
                for (k, ms) in &round_offsets {
                    *self.offsets.entry(*k).or_default() += ms;
                }
                *n
            }
            _ => {
                self.candidate = Some((groups.clone(), 1));
                self.offsets = round_offsets;
                1
            }
        };
        if self.trusted.is_some() {
            if agree(&self.trusted_groups, &groups) {
                return RoundOutcome::Unchanged;
            }
            self.trusted = None;
            return RoundOutcome::Distrusted;
        }
        if agreeing >= self.stable_rounds {
            self.trusted_offsets = self
                .offsets
                .iter()
                .map(|(&k, &sum)| (k, sum / agreeing as f64))
                .collect();
            self.trusted = Some(self.ranks(&groups));
            self.trusted_groups = groups;
            return RoundOutcome::Trusted;
        }
        RoundOutcome::Learning { agreeing }
    }

    /// Ranks of the keys: strict layer order (the last group to arrive = rank 1, a group's
    /// keys sharing it), or production order (a rank per group) with the first-produced
    /// groups holding `defer` of the bytes last, key by key in forward order.
    #[allow(clippy::cast_possible_truncation)]
    fn ranks(&self, groups: &Grouping) -> HashMap<u64, u32> {
        let n = groups.len();
        let size = |g: &Vec<u64>| {
            g.iter()
                .map(|k| self.bytes.get(k).copied().unwrap_or(0))
                .sum::<u64>()
        };
        let total: u64 = groups.iter().map(size).sum();
        let mut out = HashMap::new();
        // Without sizes (empty pushes) nothing says what to defer: strict layer order.
        if total == 0 || self.defer.is_nan() || self.defer <= 0.0 {
            for (i, g) in groups.iter().enumerate() {
                for &k in g {
                    out.insert(k, (n - i) as u32);
                }
            }
            return out;
        }
        let deferred = self.deferred_groups(groups, self.defer, &size, total);
        // Production order: a group's keys share a rank and go as backward hands them out.
        for (i, g) in groups.iter().enumerate().skip(deferred) {
            for &k in g {
                out.insert(k, (i - deferred + 1) as u32);
            }
        }
        let after = n - deferred;
        for (j, k) in self
            .forward_order(groups[..deferred].iter().flatten().copied())
            .into_iter()
            .enumerate()
        {
            out.insert(k, (after + j + 1) as u32);
        }
        out
    }

    /// `keys` in forward order: the last produced first, by mean offset over the agreeing
    /// rounds. Not a rank per group: a group's keys would go in production order, and the
    /// burst backward hands out right after a big layer (VGG-19's conv layers after fc6)
    /// would wait behind it although the next forward needs it first. Not bursts (offsets
    /// chained under `burst_gap`) sorted by key either, tried: where a burst ends differs
    /// per worker like a group's, and the two workers' proxies sent different orders more
    /// often than by the offsets alone (README, "The deferred tail").
    fn forward_order(&self, keys: impl Iterator<Item = u64>) -> Vec<u64> {
        let offset = |k: &u64| self.trusted_offsets.get(k).copied().unwrap_or(0.0);
        let mut latest_first: Vec<u64> = keys.collect();
        latest_first.sort_by(|a, b| offset(b).total_cmp(&offset(a)).then(a.cmp(b)));
        latest_first
    }
}

impl Learner {
    /// How many of the first-produced groups are deferred. Every worker's proxy learns
    /// on its own, from its own timing: a cut that lands between two groups one host
    /// saw apart and another saw as one burst defers a key on one worker and not on the
    /// other, and that key waits at the server for the rest of the iteration (measured:
    /// two workers' proxies deferring different keys). So the cut is not simply where
    /// `defer` of the bytes is reached but at the longest pause in backward (mean over
    /// the agreeing rounds) between deferring that share and twice it, or, where one
    /// group jumps past twice the share, within one more share's bytes after it.
    fn deferred_groups(
        &self,
        groups: &Grouping,
        defer: f64,
        size: &dyn Fn(&Vec<u64>) -> u64,
        total: u64,
    ) -> usize {
        let n = groups.len();
        // Deferring everything would be strict layer order again.
        let last = n.saturating_sub(1);
        let target = defer * total as f64;
        // (boundary, bytes deferred by cutting there), boundary d after the first d groups.
        let mut shares = Vec::with_capacity(last);
        let mut acc = 0u64;
        for d in 1..=last {
            acc += size(&groups[d - 1]);
            shares.push((d, acc as f64));
        }
        // The plain cut: where the share is reached.
        let target_cut = shares
            .iter()
            .find(|&&(_, share)| share >= target)
            .map_or(last, |&(d, _)| d);
        let offset = |k: &u64| self.trusted_offsets.get(k).copied().unwrap_or(0.0);
        let pause_before = |d: usize| -> f64 {
            let end = groups[d - 1].iter().map(offset).fold(f64::MIN, f64::max);
            let start = groups[d].iter().map(offset).fold(f64::MAX, f64::min);
            // Means of a tie split in one round can overlap: no pause.
            (start - end).max(0.0)
        };
        // Past the share, the longest pause up to twice it stands out on every worker's
        // proxy (pauses within a quarter of it count as equal): the cut is at the first
        // of those, with the same keys before it everywhere.
        let first_longest = |window: &dyn Fn(f64) -> bool| {
            let ahead: Vec<usize> = shares
                .iter()
                .filter(|&&(_, share)| window(share))
                .map(|&(d, _)| d)
                .collect();
            let longest = ahead
                .iter()
                .map(|&d| pause_before(d))
                .fold(f64::MIN, f64::max);
            ahead
                .into_iter()
                .find(|&d| pause_before(d) >= 0.75 * longest)
        };
        if let Some(d) = first_longest(&|share| (target..=2.0 * target).contains(&share)) {
            return d;
        }
        // No boundary there: one group jumps past twice the share (VGG-19's fc6, with the
        // burst of small layers backward hands out right after it). Where that group ends
        // is no pause every proxy sees (measured: the burst's members and the next layer
        // fell on either side of the cut on the two workers), so the cut moves on to the
        // longest pause within one more share's bytes.
        let reached = target_cut
            .checked_sub(1)
            .and_then(|i| shares.get(i))
            .map_or(0.0, |&(_, share)| share);
        first_longest(&|share| (reached..=reached + target).contains(&share)).unwrap_or(target_cut)
    }
}

/// Whether two rounds agree: the same keys, and no two keys in opposite orders (a tie in
/// one round may be two groups in the other).
fn agree(a: &Grouping, b: &Grouping) -> bool {
    let rank = |g: &Grouping| -> HashMap<u64, usize> {
        g.iter()
            .enumerate()
            .flat_map(|(i, keys)| keys.iter().map(move |&k| (k, i)))
            .collect()
    };
    let (ra, rb) = (rank(a), rank(b));
    if ra.len() != rb.len() {
        return false;
    }
    let mut pairs = Vec::with_capacity(ra.len());
    for (k, &x) in &ra {
        let Some(&y) = rb.get(k) else { return false };
        pairs.push((x, y));
    }
    pairs.sort_unstable();
    // Every key of a later group of `a` must not come before any key of an earlier one in `b`.
    let mut earlier_max: Option<usize> = None;
    let mut i = 0;
    while i < pairs.len() {
        let group = pairs[i].0;
        let mut j = i;
        let mut group_max = pairs[i].1;
        while j < pairs.len() && pairs[j].0 == group {
            group_max = group_max.max(pairs[j].1);
            j += 1;
        }
        if earlier_max.is_some_and(|m| pairs[i].1 < m) {
            return false;
        }
        earlier_max = Some(earlier_max.map_or(group_max, |m| m.max(group_max)));
        i = j;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `rounds` rounds where key `k` arrives at `at(round, k)` milliseconds.
    fn feed(
        l: &mut Learner,
        t0: Instant,
        rounds: usize,
        keys: &[u64],
        at: impl Fn(usize, u64) -> f64,
    ) -> Vec<RoundOutcome> {
        let mut outcomes = Vec::new();
        for r in 0..rounds {
            let base = r as f64 * 1000.0;
            let mut arrivals: Vec<(f64, u64)> =
                keys.iter().map(|&k| (base + at(r, k), k)).collect();
            arrivals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            for (ms, k) in arrivals {
                let at = t0 + Duration::from_micros((ms * 1000.0) as u64);
                outcomes.extend(l.observe(k, 100, at));
            }
        }
        outcomes
    }

    #[test]
    fn reverse_layer_order_with_jitter_and_ties_is_learned() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.set_defer(0.0); // strict layer order
                          // Layers 0..6 (keys named out of layer order, as Gluon's name sort does); layer 6
                          // is produced first. Each layer 20 ms of backward, weight and bias of one layer
                          // tie (0.1 ms apart), jitter under a millisecond.
        let layer_of = |k: u64| [3u64, 3, 0, 0, 5, 5, 1, 1, 6, 6, 2, 2, 4, 4][k as usize];
        let keys: Vec<u64> = (0..14).collect();
        let jitter = |r: usize, k: u64| ((r as u64 * 7 + k * 13) % 9) as f64 / 10.0;
        let at = |r: usize, k: u64| {
            (6 - layer_of(k)) as f64 * 20.0 + (k % 2) as f64 * 0.1 + jitter(r, k)
        };
        let outcomes = feed(&mut l, t0, 5, &keys, at);
        assert_eq!(
            outcomes[..3],
            [
                RoundOutcome::Learning { agreeing: 1 },
                RoundOutcome::Learning { agreeing: 2 },
                RoundOutcome::Trusted
            ]
        );
        assert!(l.is_trusted());
        // Layer 0 (keys 2, 3) arrives last: the first weights needed.
        assert_eq!(l.priority(2), Some(1));
        assert_eq!(l.priority(3), Some(1));
        assert_eq!(l.priority(6), Some(2), "layer 1");
        assert_eq!(l.priority(8), Some(7), "layer 6, produced first");
    }

    #[test]
    fn ties_that_split_under_jitter_still_agree_but_swaps_do_not() {
        let a: Grouping = vec![vec![5], vec![3, 4], vec![1]];
        assert!(agree(&a, &vec![vec![5], vec![3], vec![4], vec![1]]));
        assert!(agree(&a, &vec![vec![3, 4, 5], vec![1]]));
        assert!(
            !agree(&a, &vec![vec![3], vec![5], vec![4], vec![1]]),
            "3 before 5"
        );
        assert!(!agree(&a, &vec![vec![5], vec![3, 4]]), "a key missing");
    }

    #[test]
    fn ascending_key_order_in_one_burst_is_not_learned() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        let keys: Vec<u64> = (0..40).collect();
        // A CPU job: every pushpull after backward, in key order, microseconds apart.
        let outcomes = feed(&mut l, t0, 6, &keys, |_, k| 300.0 + k as f64 * 0.02);
        assert!(
            outcomes.iter().all(|o| *o == RoundOutcome::Uninformative),
            "{outcomes:?}"
        );
        assert!(!l.is_trusted());
        assert_eq!(l.offset_ms(0), None, "no offsets until trusted");
        assert_eq!(l.priority(0), None, "key order stays in use");
    }

    #[test]
    fn ascending_key_order_with_gaps_is_not_learned_either() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        let keys: Vec<u64> = (0..10).collect();
        let outcomes = feed(&mut l, t0, 5, &keys, |_, k| 300.0 + k as f64 * 5.0);
        assert!(
            outcomes.iter().all(|o| *o == RoundOutcome::Uninformative),
            "{outcomes:?}"
        );
        assert!(!l.is_trusted());
    }

    #[test]
    fn a_changed_order_is_relearned() {
        let t0 = Instant::now();
        let mut l = Learner::new(DEFAULT_BURST_GAP, 2);
        l.set_defer(0.0);
        let keys: Vec<u64> = (0..4).collect();
        let outcomes = feed(&mut l, t0, 3, &keys, |_, k| (3 - k) as f64 * 10.0);
        assert!(outcomes.contains(&RoundOutcome::Trusted));
        assert_eq!(l.priority(0), Some(1));
        // The model changes: now the keys arrive 1, 3, 0, 2.
        let pos = |k: u64| [2.0, 0.0, 3.0, 1.0][k as usize] * 10.0;
        let outcomes = feed(&mut l, t0 + Duration::from_secs(10), 4, &keys, |_, k| {
            pos(k)
        });
        assert_eq!(
            outcomes[0],
            RoundOutcome::Unchanged,
            "the last round of the old order closes first"
        );
        assert_eq!(outcomes[1], RoundOutcome::Distrusted);
        assert!(
            outcomes[2..].contains(&RoundOutcome::Trusted),
            "{outcomes:?}"
        );
        assert_eq!(l.priority(2), Some(1));
        assert_eq!(l.priority(1), Some(4));
    }

    #[test]
    fn workers_that_group_a_burst_differently_still_defer_the_same_keys() {
        // Ten layers of 100 bytes (key k = layer k), produced 9, 8, ..., 0: a 10 ms pause
        // after layer 9, then layer 7 `gap` ms after layer 8, then 5 ms apart. A gap
        // right at the burst threshold is a tie on one worker and two groups on the
        // other; 20% of the bytes falls right there. Both must defer the same keys.
        let deferred_by = |gap: f64| {
            let t0 = Instant::now();
            let mut l = Learner::default();
            l.set_defer(0.2);
            let keys: Vec<u64> = (0..10).collect();
            let at = |_: usize, k: u64| match k {
                9 => 0.0,
                8 => 10.0,
                k => 10.0 + gap + (7 - k) as f64 * 5.0,
            };
            feed(&mut l, t0, 5, &keys, at);
            assert!(l.is_trusted());
            deferred_keys(&l, &keys)
        };
        let tie = deferred_by(1.9);
        let apart = deferred_by(2.1);
        assert_eq!(tie, apart);
        // The cut at the longest pause between deferring 20% and 40% of the bytes (5 ms
        // apart from the near-tie): the first, after 30%.
        assert_eq!(tie, vec![7, 8, 9]);
    }

    /// VGG-19's backward as two workers' proxies measured it (mean ms after the round's
    /// first push; MXNet keys, Gluon's name order): fc8, fc7, then fc6 (key 33, 72% of
    /// the bytes) with a burst of six small conv layers (keys 2-13) right after it, then
    /// conv layers about 10-20 ms apart.
    fn vgg_backward(burst_tail: f64, next_layer: f64) -> Vec<(u64, f64, u64)> {
        let mut v = vec![
            (37, 0.0, 1_638_400),
            (36, 0.2, 4_000),
            (35, 14.3, 6_710_888),
            (34, 14.4, 16_384),
            (33, 76.2, 41_104_180),
            (32, 76.4, 16_384),
        ];
        // The burst: conv15-conv11 (keys 13-4) 0.6 ms apart, its last layer conv10
        // (keys 2, 3) at `burst_tail`.
        for (i, k) in (4..14u64).rev().enumerate() {
            let w = if k % 2 == 1 { 943_720 } else { 1_024 };
            v.push((k, 77.0 + (i / 2) as f64 * 0.6, w));
        }
        v.push((3, burst_tail, 943_720));
        v.push((2, burst_tail + 0.1, 1_024));
        v.push((31, next_layer, 943_720));
        v.push((30, next_layer + 0.1, 1_024));
        // The rest as measured: (weight key, ms after the layer before).
        let rest = [
            (29, 8.6),
            (27, 21.0),
            (25, 21.0),
            (23, 20.0),
            (21, 10.0),
            (19, 20.0),
            (17, 10.0),
            (15, 20.0),
            (1, 1.5),
        ];
        let mut t = next_layer;
        for (w, after) in rest {
            t += after;
            v.push((w, t, if w >= 23 { 235_928 } else { 58_982 }));
            v.push((w - 1, t + 0.1, 512));
        }
        v
    }

    /// The keys `l` defers: less urgent than the first layer (keys 0, 1).
    fn deferred_keys(l: &Learner, keys: &[u64]) -> Vec<u64> {
        let first_layer = l.priority(0).unwrap();
        let mut deferred: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|&k| l.priority(k).unwrap() > first_layer)
            .collect();
        deferred.sort_unstable();
        deferred
    }

    #[test]
    fn vgg_workers_defer_the_same_keys_however_the_burst_after_fc6_falls() {
        // The deferred keys, in the order they go (most urgent first).
        let tail_of = |rounds: Vec<Vec<(u64, f64, u64)>>| {
            let t0 = Instant::now();
            let mut l = Learner::default();
            // A round closes when its first key comes again: one more round than fed.
            let mut fed = rounds.clone();
            fed.push(rounds[0].clone());
            for (r, round) in fed.iter().enumerate() {
                let mut round = round.clone();
                round.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
                for (k, ms, bytes) in round {
                    let at = t0 + Duration::from_micros(((r as f64 * 1000.0 + ms) * 1000.0) as u64);
                    let _ = l.observe(k, bytes, at);
                }
            }
            assert!(l.is_trusted());
            let keys: Vec<u64> = rounds[0].iter().map(|&(k, _, _)| k).collect();
            let mut tail = deferred_keys(&l, &keys);
            tail.sort_by_key(|&k| l.priority(k).unwrap());
            // A rank each: keys sharing one would go as they are produced (fc6 first).
            assert!(tail
                .windows(2)
                .all(|w| l.priority(w[0]).unwrap() < l.priority(w[1]).unwrap()));
            tail
        };
        // Three workers' proxies: conv10 (keys 2, 3) 0.4 ms after the rest of the burst
        // and conv9 (30, 31) 12.7 ms later; conv10 5.8 ms after the burst and conv9 9.3 ms
        // later; the same, but the last round that made the order trusted has conv9
        // inside the burst.
        let tied = tail_of(vec![vgg_backward(79.8, 92.5); 3]);
        let apart = tail_of(vec![vgg_backward(85.2, 94.5); 3]);
        let mut merged = vec![vgg_backward(85.2, 94.5); 2];
        merged.push(vgg_backward(85.2, 86.0));
        let merged = tail_of(merged);
        assert_eq!(tied, apart);
        assert_eq!(tied, merged);
        // fc8, fc7, fc6, the burst and the two layers before the first 20 ms pause, in
        // forward order (a bias produced 0.1 ms after its weight goes first): conv8,
        // conv9, then the burst from conv10 to conv15 before fc6, then fc7 and fc8.
        let mut want: Vec<u64> = vec![28, 29, 30, 31, 2, 3];
        want.extend(4..14);
        want.extend(32..38);
        assert_eq!(tied, want);
    }

    #[test]
    fn a_first_layer_past_the_share_is_deferred_alone() {
        // VGG's shape: the first-produced layer (4) holds 86% of the bytes: it alone
        // is deferred.
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.set_defer(0.25);
        let bytes = |k: u64| if k == 4 { 860 } else { 35 };
        for r in 0..4 {
            for k in (0..5u64).rev() {
                let at = t0 + Duration::from_millis(r * 1000 + (4 - k) * 20);
                let _ = l.observe(k, bytes(k), at);
            }
        }
        let ranks: Vec<u32> = (0..5).map(|k| l.priority(k).unwrap()).collect();
        assert_eq!(ranks, vec![4, 3, 2, 1, 5]);
    }

    #[test]
    fn the_deferred_order_is_production_order_with_the_last_layers_last_in_forward_order() {
        let t0 = Instant::now();
        let mut l = Learner::default();
        // Five layers produced 4, 3, 2, 1, 0 (key k = layer k), layer 4 holding 30% of
        // the bytes: with 20% deferred, layer 4 goes last; layers 3..0 in production order.
        let bytes = |k: u64| if k == 4 { 300 } else { 175 };
        for r in 0..4 {
            for k in (0..5u64).rev() {
                let at = t0 + Duration::from_millis(r * 1000 + (4 - k) * 20);
                let _ = l.observe(k, bytes(k), at);
            }
        }
        assert!(l.is_trusted());
        // Each key's production offset, mean over the rounds that agreed.
        assert_eq!(l.offset_ms(4), Some(0.0));
        assert_eq!(l.offset_ms(0), Some(80.0));
        let ranks: Vec<u32> = (0..5).map(|k| l.priority(k).unwrap()).collect();
        assert_eq!(ranks, vec![4, 3, 2, 1, 5]);
        // 40%: layers 4 and 3 deferred, in forward order (3 before 4).
        l.set_defer(0.4);
        let ranks: Vec<u32> = (0..5).map(|k| l.priority(k).unwrap()).collect();
        assert_eq!(ranks, vec![3, 2, 1, 4, 5]);
        // 0: strict layer order; 1: everything but the last-produced group deferred is
        // still a total order of the same keys.
        l.set_defer(0.0);
        let ranks: Vec<u32> = (0..5).map(|k| l.priority(k).unwrap()).collect();
        assert_eq!(ranks, vec![1, 2, 3, 4, 5]);
        l.set_defer(1.0);
        let ranks: Vec<u32> = (0..5).map(|k| l.priority(k).unwrap()).collect();
        assert_eq!(
            ranks,
            vec![1, 2, 3, 4, 5],
            "all but layer 0 deferred: forward order"
        );
    }
}
