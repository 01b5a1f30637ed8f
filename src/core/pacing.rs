//! Pacing toward a peer host (issue 27), sans-IO: a virtual-time pacer.
//!
//! Every worker's proxy sends to a server's host over the same bottleneck, the server
//! host's link. TCP shares it unevenly for a while (and a worker with more class
//! connections open gets more of it), one worker's pushes run ahead, and a key is
//! aggregated only when the last copy is in. Pacing each peer host's traffic at its
//! fair share (link rate / workers) keeps the workers' byte streams in step.

use std::time::{Duration, Instant};

/// Bytes handed out hold the pacer for their length at its rate; a lane may hand out
/// more while the pacer is at most `burst` ahead of now.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_bps: f64,
    burst: Duration,
    /// When the bytes handed out so far have left at the rate.
    free_at: Option<Instant>,
}

impl Pacer {
    /// A pacer of `rate_bps` (positive) allowing `burst_bytes` ahead.
    pub fn new(rate_bps: f64, burst_bytes: u64) -> Pacer {
        Pacer {
            rate_bps,
            burst: Self::duration(rate_bps, burst_bytes),
            free_at: None,
        }
    }

    fn duration(rate_bps: f64, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / rate_bps)
    }

    /// `None` when bytes may go now, else when they may.
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        let free_at = self.free_at?;
        let ready = free_at.checked_sub(self.burst).unwrap_or(now);
        (ready > now).then_some(ready)
    }

    /// `bytes` were handed out at `now`.
    pub fn sent(&mut self, now: Instant, bytes: u64) {
        let start = self.free_at.map_or(now, |f| f.max(now));
        self.free_at = Some(start + Self::duration(self.rate_bps, bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bytes_go_at_once_within_the_burst_then_at_the_rate() {
        let t0 = Instant::now();
        // 8 Mbit/s: 1000 bytes a millisecond; a burst of 3000 bytes.
        let mut p = Pacer::new(8e6, 3000);
        assert_eq!(p.wait_until(t0), None);
        for _ in 0..3 {
            assert_eq!(p.wait_until(t0), None);
            p.sent(t0, 1000);
        }
        // 3 ms of bytes ahead, within the burst: one more may go, then it waits.
        assert_eq!(p.wait_until(t0), None);
        p.sent(t0, 1000);
        assert_eq!(p.wait_until(t0), Some(t0 + ms(1)));
        assert_eq!(p.wait_until(t0 + ms(1)), None);
    }

    #[test]
    fn a_pacer_idle_for_a_while_does_not_save_up_credit() {
        let t0 = Instant::now();
        let mut p = Pacer::new(8e6, 1000);
        p.sent(t0, 1000);
        // 100 ms later: the same burst as at the start, no more.
        let later = t0 + ms(100);
        assert_eq!(p.wait_until(later), None);
        p.sent(later, 1000);
        p.sent(later, 1000);
        assert_eq!(p.wait_until(later), Some(later + ms(1)));
    }

    #[test]
    fn over_a_long_run_the_pacer_holds_its_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(8e6, 2000);
        let mut now = t0;
        let mut sent = 0u64;
        // A lane that hands out 500 bytes whenever it may, for 1 s.
        while now < t0 + ms(1000) {
            match p.wait_until(now) {
                None => {
                    p.sent(now, 500);
                    sent += 500;
                }
                Some(at) => now = at,
            }
        }
        // 1 s at 1000 bytes/ms, plus the burst.
        assert!((1_000_000..=1_002_500).contains(&sent), "{sent}");
    }
}
