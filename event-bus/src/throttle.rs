//! [`Throttle`]: at most one warning per period for a recurring condition,
//! with the count of what it held back.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::sync::{AtomicU64, Ordering};

/// Admits one report per [`PERIOD`](Self::PERIOD) and sums up the rest, so
/// a recurring warning (a consumer that keeps lagging, a full dead-letter
/// store) cannot flood the log or slow the code that reports it.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// Milliseconds since [`epoch`] of the last admitted report, plus one (0:
    /// never).
    last: AtomicU64,
    /// Reports and their amounts held back since then.
    held_events: AtomicU64,
    held_total: AtomicU64,
}

/// What an admitted report stands for: itself and those held back before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    /// Reports, this one included.
    pub(crate) events: u64,
    /// Their amounts added up.
    pub(crate) total: u64,
}

impl Throttle {
    /// The least time between two admitted reports.
    pub(crate) const PERIOD: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            held_events: AtomicU64::new(0),
            held_total: AtomicU64::new(0),
        }
    }

    /// Reports a condition of size `amount`: `Some` to log it now (with
    /// what was held back), `None` when a report was admitted within the
    /// period.
    pub(crate) fn admit(&self, amount: u64) -> Option<Admitted> {
        self.admit_at(millis_since_epoch() + 1, amount)
    }

    /// As [`admit`](Self::admit), at `now` milliseconds (plus one) since the
    /// epoch.
    fn admit_at(&self, now: u64, amount: u64) -> Option<Admitted> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::PERIOD.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A report held back concurrently may land in the next
            // summary instead of this one; none is lost.
            return Some(Admitted {
                events: self.held_events.swap(0, Ordering::Relaxed) + 1,
                total: self.held_total.swap(0, Ordering::Relaxed) + amount,
            });
        }
        self.held_events.fetch_add(1, Ordering::Relaxed);
        self.held_total.fetch_add(amount, Ordering::Relaxed);
        None
    }
}

fn millis_since_epoch() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn admits_one_report_per_period_and_sums_up_the_ones_it_holds_back() {
        let throttle = Throttle::new();
        assert_eq!(
            throttle.admit_at(1, 3),
            Some(Admitted {
                events: 1,
                total: 3
            })
        );
        assert_eq!(throttle.admit_at(2, 4), None);
        assert_eq!(throttle.admit_at(1000, 5), None);
        assert_eq!(
            throttle.admit_at(1001, 1),
            Some(Admitted {
                events: 3,
                total: 10
            })
        );
        assert_eq!(throttle.admit_at(1002, 1), None);
    }

    #[test]
    fn admits_a_report_from_the_real_clock() {
        let throttle = Throttle::new();
        assert!(throttle.admit(1).is_some());
        assert!(throttle.admit(1).is_none());
    }
}
