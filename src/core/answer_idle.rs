//! How long a server's answers idle on the link while requests wait (issue 27), sans-IO.
//!
//! Under a priority order a key is aggregated only once every worker's copy reached
//! its server: when the workers' byte sequences drift apart, the server holds requests
//! it cannot answer yet and the link back to the workers carries nothing, then the
//! answers pile up at the end. This measures that at the server's proxy: while
//! requests it relayed wait for their answers, the time its egress sends no answer.
//! Bytes handed to the link at `t` hold it from `t` (or from when the bytes before
//! them have left) for their length at the link rate, the ideal bound's accounting;
//! the egress hands bytes out only as its sockets take them, so this follows the wire.

use std::time::{Duration, Instant};

/// Waiting time a reported window holds at least.
pub const ANSWER_WINDOW: Duration = Duration::from_secs(1);

/// Time with requests waiting, and the part of it with no answer on the link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AnswerTotals {
    /// Requests were waiting for answers.
    pub waiting: Duration,
    /// Of that, no answer was on the link.
    pub idle: Duration,
}

impl AnswerTotals {
    /// The idle share of the waiting time (0 without waiting).
    pub fn idle_share(&self) -> f64 {
        if self.waiting.is_zero() {
            0.0
        } else {
            self.idle.as_secs_f64() / self.waiting.as_secs_f64()
        }
    }
}

/// The answer direction of one proxy's link.
#[derive(Debug)]
pub struct AnswerIdle {
    rate_bps: f64,
    /// Requests wait for answers (since `last`).
    waiting: bool,
    /// The last time accounted for.
    last: Option<Instant>,
    /// The answers handed out so far have left the link by then.
    busy_until: Option<Instant>,
    total: AnswerTotals,
    window: AnswerTotals,
}

impl AnswerIdle {
    /// A link of `rate_bps` bits per second (positive).
    pub fn new(rate_bps: f64) -> AnswerIdle {
        AnswerIdle {
            rate_bps,
            waiting: false,
            last: None,
            busy_until: None,
            total: AnswerTotals::default(),
            window: AnswerTotals::default(),
        }
    }

    /// From `now` on, requests wait for answers or not.
    pub fn set_waiting(&mut self, now: Instant, waiting: bool) {
        self.advance(now);
        self.waiting = waiting;
    }

    /// Answer bytes went to the link at `now`.
    pub fn sent(&mut self, now: Instant, bytes: u64) {
        self.advance(now);
        let start = self.busy_until.map_or(now, |b| b.max(now));
        self.busy_until = Some(start + Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps));
    }

    /// Everything so far (up to the last event).
    pub fn totals(&self) -> AnswerTotals {
        self.total
    }

    /// The window since the last one taken, once it holds [`ANSWER_WINDOW`] of waiting.
    pub fn take_window(&mut self) -> Option<AnswerTotals> {
        (self.window.waiting >= ANSWER_WINDOW).then(|| std::mem::take(&mut self.window))
    }

    /// Accounts for the time from the last event to `now` in the state since then.
    fn advance(&mut self, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        if now <= last {
            return;
        }
        self.last = Some(now);
        if !self.waiting {
            return;
        }
        let idle_from = self.busy_until.map_or(last, |b| b.max(last));
        let idle = now.saturating_duration_since(idle_from);
        for t in [&mut self.total, &mut self.window] {
            t.waiting += now - last;
            t.idle += idle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// 8 Mbit/s: 1000 bytes hold the link for 1 ms.
    const RATE: f64 = 8e6;

    #[test]
    fn answers_back_to_back_leave_no_idle_time() {
        let t0 = Instant::now();
        let mut a = AnswerIdle::new(RATE);
        a.set_waiting(t0, true);
        for i in 0..10 {
            a.sent(t0 + ms(i), 1000);
        }
        a.set_waiting(t0 + ms(10), false);
        let t = a.totals();
        assert_eq!(t.waiting, ms(10));
        assert_eq!(t.idle, ms(0));
    }

    #[test]
    fn a_gap_between_answers_while_requests_wait_is_idle() {
        let t0 = Instant::now();
        let mut a = AnswerIdle::new(RATE);
        // Requests from t0; 2 ms of answers at 5 ms; 1 ms at 20 ms; done at 21 ms.
        a.set_waiting(t0, true);
        a.sent(t0 + ms(5), 2000);
        a.sent(t0 + ms(20), 1000);
        a.set_waiting(t0 + ms(21), false);
        let t = a.totals();
        assert_eq!(t.waiting, ms(21));
        // 0-5 and 7-20 idle.
        assert_eq!(t.idle, ms(18));
        assert!((t.idle_share() - 18.0 / 21.0).abs() < 1e-9);
    }

    #[test]
    fn time_without_waiting_requests_is_not_counted() {
        let t0 = Instant::now();
        let mut a = AnswerIdle::new(RATE);
        a.set_waiting(t0, false);
        a.sent(t0 + ms(50), 1000); // an answer with nothing waiting: not counted
        a.set_waiting(t0 + ms(100), true); // forward pass over: requests
        a.set_waiting(t0 + ms(110), false);
        a.set_waiting(t0 + ms(500), false);
        assert_eq!(a.totals().waiting, ms(10));
        assert_eq!(a.totals().idle, ms(10));
    }

    #[test]
    fn answers_queue_behind_each_other_on_the_link() {
        let t0 = Instant::now();
        let mut a = AnswerIdle::new(RATE);
        a.set_waiting(t0, true);
        // Three answers at once hold the link 3 ms; the requests wait 5 ms.
        for _ in 0..3 {
            a.sent(t0, 1000);
        }
        a.set_waiting(t0 + ms(5), false);
        assert_eq!(a.totals().idle, ms(2));
    }

    #[test]
    fn a_window_is_reported_once_it_holds_a_second_of_waiting() {
        let t0 = Instant::now();
        let mut a = AnswerIdle::new(RATE);
        a.set_waiting(t0, true);
        a.set_waiting(t0 + ms(600), true);
        assert_eq!(a.take_window(), None);
        a.set_waiting(t0 + ms(1200), false);
        let w = a.take_window().expect("1.2 s waited");
        assert_eq!(w.waiting, ms(1200));
        assert_eq!(w.idle, ms(1200));
        assert_eq!(a.take_window(), None);
        assert_eq!(a.totals().waiting, ms(1200));
    }
}
