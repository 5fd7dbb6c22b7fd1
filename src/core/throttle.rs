//! The re-encryption worker's rate limit: at most `rate` rows a second,
//! in batches of at most a quarter second of work, with no saved-up burst
//! after idle time. Pure: the caller passes the settings and the clock.

use std::time::{Duration, Instant};

pub struct Throttle {
    rate: i32,
    window_start: Instant,
    /// Rows done (picked) since `window_start`.
    pub rows: u64,
}

impl Throttle {
    /// `rate`: rows a second, 0 or less for no limit.
    pub fn new(rate: i32, now: Instant) -> Throttle {
        Throttle {
            rate,
            window_start: now,
            rows: 0,
        }
    }

    /// Restarts the window when the rate setting changed, and when the
    /// worker fell behind its schedule (idle time is not saved up as a
    /// burst: at most a quarter second of rows may be caught up).
    pub fn refresh(&mut self, rate: i32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        let behind = rate > 0 && elapsed.as_secs_f64() > self.rows as f64 / rate as f64 + 0.25;
        if rate != self.rate || behind || elapsed > Duration::from_secs(600) {
            *self = Throttle::new(rate, now);
        }
    }

    /// How long to wait before the next row may be done.
    pub fn delay(&self, now: Instant) -> Option<Duration> {
        if self.rate <= 0 {
            return None;
        }
        let due = Duration::from_secs_f64(self.rows as f64 / self.rate as f64);
        due.checked_sub(now.saturating_duration_since(self.window_start))
            .filter(|d| !d.is_zero())
    }

    /// Rows in the next batch, given the configured batch size.
    pub fn batch_size(&self, configured: i32) -> i64 {
        let b = configured.max(1) as i64;
        if self.rate > 0 {
            // Keep batches at most ~1/4 s of work so the rate stays smooth.
            b.min((self.rate as i64 / 4).max(1))
        } else {
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_rows_and_forgets_idle_time() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, t0);
        assert_eq!(t.batch_size(1000), 250);
        assert_eq!(t.batch_size(100), 100);
        t.rows += 500;
        // 500 rows at 1000/s are due at 0.5 s.
        assert_eq!(t.delay(t0), Some(Duration::from_millis(500)));
        assert_eq!(t.delay(t0 + Duration::from_millis(600)), None);
        // Idle for a minute: the window restarts, no burst is owed.
        t.refresh(1000, t0 + Duration::from_secs(60));
        assert_eq!(t.rows, 0);
        // A new rate restarts it too; no limit means no delay.
        t.rows = 10;
        t.refresh(0, t0 + Duration::from_secs(60));
        assert_eq!(t.rows, 0);
        t.rows = 1_000_000;
        assert_eq!(t.delay(t0), None);
        assert_eq!(t.batch_size(7), 7);
    }
}
