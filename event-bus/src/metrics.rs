//! What the bus counts: [`EventBus::metrics`](crate::EventBus::metrics)
//! snapshots and, with the `metrics` feature, the same numbers through the
//! [`metrics`](https://docs.rs/metrics) crate facade.
//!
//! # Exported metrics (feature `metrics`)
//!
//! | name | type | labels |
//! |---|---|---|
//! | `event_bus_emitted_total` | counter | `event` |
//! | `event_bus_rejected_total` | counter | |
//! | `event_bus_dropped_total` | counter | `queue` |
//! | `event_bus_overflowed_total` | counter | `queue` |
//! | `event_bus_queue_depth` | gauge | `queue` |
//! | `event_bus_handled_total` | counter | `listener` |
//! | `event_bus_failed_total` | counter | `listener` |
//! | `event_bus_retried_total` | counter | `listener` |
//! | `event_bus_dead_lettered_total` | counter | `listener` |
//! | `event_bus_panicked_total` | counter | `listener` |
//! | `event_bus_handle_seconds` | histogram | `listener` |
//!
//! A listener's queue is labelled with the listener's name; every
//! subscription's with `subscription`, so the number of series stays bounded
//! however many subscriptions come and go. Queues that share a label add up:
//! the depth gauge of two listeners of one name is the sum of their depths.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::event::Priority;

/// A point-in-time view of a bus's counters.
///
/// Counters only grow; take two snapshots and subtract for rates.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BusMetrics {
    /// Events accepted by `emit` and `emit_wait`, of every kind.
    pub emitted: u64,
    /// Accepted events per kind, in kind index order.
    pub emitted_by_kind: Vec<KindCount>,
    /// Events emitted after shutdown began, which reached nobody.
    pub rejected: u64,
    /// Events left undelivered by listeners aborted while the bus was open,
    /// which have left [`listeners`](Self::listeners).
    pub abandoned: u64,
    /// Dead letters evicted from the bus's bounded dead-letter store to make
    /// room for newer ones (each was also handed to dead-letter subscribers).
    pub dead_letters_evicted: u64,
    /// The bus's listeners, in spawn order: those running, those that
    /// [crashed](crate::ListenerStatus::Crashed), and those that ended once
    /// the bus closed. A listener aborted while the bus is open leaves the
    /// list (its [`ListenerHandle`](crate::ListenerHandle) keeps its final
    /// metrics), so spawning and aborting in a loop cannot grow it.
    pub listeners: Vec<ListenerMetrics>,
}

impl BusMetrics {
    /// The metrics of the listener named `name`, if one was spawned.
    pub fn listener(&self, name: &str) -> Option<&ListenerMetrics> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Accepted events of the kind named `name`.
    pub fn emitted_of(&self, name: &str) -> u64 {
        self.emitted_by_kind
            .iter()
            .find(|k| k.event == name)
            .map_or(0, |k| k.emitted)
    }
}

/// Events emitted of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct KindCount {
    /// The kind's event name.
    pub event: &'static str,
    /// Events of this kind accepted by the bus.
    pub emitted: u64,
}

/// Counters of one listener.
///
/// Every event that reached the listener's queue is accounted for:
/// `delivered + dropped + queue_depth` is the number of events of interest
/// the bus queued for it, and each delivered event ends as exactly one of
/// `handled` or `dead_lettered` (or is still `in_flight`:
/// `delivered == handled + dead_lettered + in_flight`). Every failed
/// attempt was either `retried` or ended in a dead letter:
/// `failed == retried + dead_lettered`, and `panicked <= failed`.
///
/// These identities hold in every snapshot, even one taken while events
/// flow: the counters are read in an order that keeps them true, and
/// `queue_depth`, `in_flight` and `failed` are derived from the others.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ListenerMetrics {
    /// The listener's name.
    pub name: String,
    /// Events taken from the queue by the listener.
    pub delivered: u64,
    /// Events whose handler eventually succeeded.
    pub handled: u64,
    /// Handler attempts that returned an error or panicked.
    pub failed: u64,
    /// Attempts run again after a failure.
    pub retried: u64,
    /// Events given up after the last attempt and recorded as dead letters.
    pub dead_lettered: u64,
    /// Handler attempts that panicked (also counted in `failed`).
    pub panicked: u64,
    /// Events dropped from a full queue under [`LagPolicy::DropOldest`](crate::LagPolicy).
    pub dropped: u64,
    /// Events queued past capacity by `emit` under [`LagPolicy::Backpressure`](crate::LagPolicy).
    pub overflowed: u64,
    /// Events waiting in the queue.
    pub queue_depth: usize,
    /// Events taken but not yet finished (at most the listener's
    /// concurrency, times its batch size for a batch listener).
    pub in_flight: usize,
    /// The queue's counters per priority lane, highest first (as
    /// [`Priority::ALL`]); `delivered`, `dropped`, `overflowed` and
    /// `queue_depth` above are their sums.
    pub lanes: Vec<LaneMetrics>,
    /// Time from emit to the start of the event's first handler attempt.
    pub queue_latency: LatencySummary,
    /// Duration of handler attempts.
    pub handle_latency: LatencySummary,
    /// Whether the listener's task has ended (`status` is not
    /// [`Running`](crate::ListenerStatus::Running)).
    pub finished: bool,
    /// Where the listener's task stands: running, or how it ended.
    pub status: ListenerStatus,
}

impl ListenerMetrics {
    /// The counters of the `priority` lane of the listener's queue.
    pub fn lane(&self, priority: Priority) -> &LaneMetrics {
        &self.lanes[priority.lane()]
    }
}

/// Counters of one priority lane of a subscription's or listener's queue.
///
/// Each lane is accounted for on its own: `delivered + dropped + queue_depth`
/// is the number of events of that priority queued for the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LaneMetrics {
    /// The lane's priority.
    pub priority: Priority,
    /// Events of this priority handed to the consumer.
    pub delivered: u64,
    /// Events dropped from the full lane under
    /// [`LagPolicy::DropOldest`](crate::LagPolicy).
    pub dropped: u64,
    /// Events queued past the lane's capacity by `emit` under
    /// [`LagPolicy::Backpressure`](crate::LagPolicy).
    pub overflowed: u64,
    /// Events waiting in the lane.
    pub queue_depth: usize,
}

/// Summary of a latency distribution.
///
/// Quantiles come from a log-linear histogram and are accurate to within
/// 12.5% of the true value; `max` and `mean` are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean sample.
    #[cfg_attr(feature = "serde", serde(serialize_with = "as_secs"))]
    pub mean: Duration,
    /// Median.
    #[cfg_attr(feature = "serde", serde(serialize_with = "as_secs"))]
    pub p50: Duration,
    /// 90th percentile.
    #[cfg_attr(feature = "serde", serde(serialize_with = "as_secs"))]
    pub p90: Duration,
    /// 99th percentile.
    #[cfg_attr(feature = "serde", serde(serialize_with = "as_secs"))]
    pub p99: Duration,
    /// Largest sample.
    #[cfg_attr(feature = "serde", serde(serialize_with = "as_secs"))]
    pub max: Duration,
}

#[cfg(feature = "serde")]
fn as_secs<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// Sub-buckets per power of two: 8, so a bucket is at most 12.5% wide.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Where a listener's task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ListenerStatus {
    /// Its task is running: handling events or waiting for them.
    Running,
    /// It ended after the bus closed and its queue was empty.
    Drained,
    /// It was stopped before its queue was empty: by
    /// [`ListenerHandle::abort`](crate::ListenerHandle::abort), by the deadline of
    /// [`EventBus::shutdown`](crate::EventBus::shutdown), or because the tokio
    /// runtime it ran on shut down.
    Aborted,
    /// The bus's own code panicked in its task (never the handler's panic,
    /// which is caught, counted and retried). The panic was logged at error
    /// level; what it had not handled is counted as undelivered.
    Crashed,
}

impl ListenerStatus {
    pub(crate) fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Running,
            1 => Self::Drained,
            2 => Self::Aborted,
            _ => Self::Crashed,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Self::Running => 0,
            Self::Drained => 1,
            Self::Aborted => 2,
            Self::Crashed => 3,
        }
    }
}

impl fmt::Display for ListenerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Drained => "drained",
            Self::Aborted => "aborted",
            Self::Crashed => "crashed",
        })
    }
}

/// A lock-free log-linear histogram of nanosecond samples.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Records a sample. One writer at a time (a listener's task records
    /// into its own histograms), so plain loads and stores do; readers may
    /// see a sample half recorded, which a summary tolerates.
    #[inline]
    pub(crate) fn record(&self, sample: Duration) {
        let nanos = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.buckets[bucket_of(nanos)], 1);
        bump(&self.count, 1);
        bump(&self.sum, nanos);
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.store(nanos, Ordering::Relaxed);
        }
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let max = self.max.load(Ordering::Relaxed);
        let quantile = |q: f64| {
            // The rank of the q-quantile sample, 1-based.
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (bucket, &n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Duration::from_nanos(upper_bound(bucket).min(max));
                }
            }
            Duration::from_nanos(max)
        };
        LatencySummary {
            count,
            mean: Duration::from_nanos(self.sum.load(Ordering::Relaxed) / count),
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            max: Duration::from_nanos(max),
        }
    }
}

/// Adds to a counter that only one thread writes: a load and a store,
/// without the cost of an atomic read-modify-write on the hot path.
#[inline]
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// Values below `SUB` get a bucket each; above, each power of two is split
/// into `SUB` equal buckets.
#[inline]
fn bucket_of(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let magnitude = 63 - value.leading_zeros();
    let sub = (value >> (magnitude - SUB_BITS)) as usize & (SUB - 1);
    (magnitude - SUB_BITS + 1) as usize * SUB + sub
}

/// The largest value that falls in `bucket`.
fn upper_bound(bucket: usize) -> u64 {
    if bucket < SUB {
        return bucket as u64;
    }
    let magnitude = (bucket / SUB) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUB) as u64;
    let width = 1u64 << (magnitude - SUB_BITS);
    ((SUB as u64 + sub) << (magnitude - SUB_BITS)).saturating_add(width - 1)
}

#[cfg(feature = "metrics")]
mod export {
    use metrics::{Counter, Gauge, Histogram};
    use std::time::Duration;

    pub(crate) struct QueueExport {
        dropped: Counter,
        overflowed: Counter,
        depth: Gauge,
    }

    impl QueueExport {
        pub(crate) fn new(queue: &str) -> Self {
            let label = [("queue", queue.to_owned())];
            Self {
                dropped: metrics::counter!("event_bus_dropped_total", &label),
                overflowed: metrics::counter!("event_bus_overflowed_total", &label),
                depth: metrics::gauge!("event_bus_queue_depth", &label),
            }
        }

        pub(crate) fn dropped(&self) {
            self.dropped.increment(1);
        }

        pub(crate) fn overflowed(&self) {
            self.overflowed.increment(1);
        }

        /// Moves the depth gauge by `delta`: queues that share a label (every
        /// subscription, listeners of one name) add up in it.
        pub(crate) fn depth(&self, delta: i64) {
            if delta >= 0 {
                self.depth.increment(delta as f64);
            } else {
                self.depth.decrement(-delta as f64);
            }
        }
    }

    pub(crate) struct ListenerExport {
        handled: Counter,
        failed: Counter,
        retried: Counter,
        dead_lettered: Counter,
        panicked: Counter,
        latency: Histogram,
    }

    impl ListenerExport {
        pub(crate) fn new(listener: &str) -> Self {
            let label = [("listener", listener.to_owned())];
            Self {
                handled: metrics::counter!("event_bus_handled_total", &label),
                failed: metrics::counter!("event_bus_failed_total", &label),
                retried: metrics::counter!("event_bus_retried_total", &label),
                dead_lettered: metrics::counter!("event_bus_dead_lettered_total", &label),
                panicked: metrics::counter!("event_bus_panicked_total", &label),
                latency: metrics::histogram!("event_bus_handle_seconds", &label),
            }
        }

        pub(crate) fn handled(&self, events: u64) {
            self.handled.increment(events);
        }

        pub(crate) fn failed(&self, events: u64, panicked: u64) {
            self.failed.increment(events);
            if panicked > 0 {
                self.panicked.increment(panicked);
            }
        }

        pub(crate) fn retried(&self, events: u64) {
            self.retried.increment(events);
        }

        pub(crate) fn dead_lettered(&self, events: u64) {
            self.dead_lettered.increment(events);
        }

        pub(crate) fn latency(&self, sample: Duration) {
            self.latency.record(sample.as_secs_f64());
        }
    }

    pub(crate) struct BusExport {
        emitted: Vec<Counter>,
        rejected: Counter,
    }

    impl BusExport {
        pub(crate) fn new(kinds: &[&'static str]) -> Self {
            Self {
                emitted: kinds
                    .iter()
                    .map(|&event| metrics::counter!("event_bus_emitted_total", "event" => event))
                    .collect(),
                rejected: metrics::counter!("event_bus_rejected_total"),
            }
        }

        pub(crate) fn emitted(&self, kind: usize) {
            self.emitted[kind].increment(1);
        }

        pub(crate) fn rejected(&self) {
            self.rejected.increment(1);
        }
    }
}

/// Without the `metrics` feature, exporting compiles to nothing.
#[cfg(not(feature = "metrics"))]
mod export {
    use std::time::Duration;

    pub(crate) struct QueueExport;

    impl QueueExport {
        pub(crate) fn new(_queue: &str) -> Self {
            Self
        }
        pub(crate) fn dropped(&self) {}
        pub(crate) fn overflowed(&self) {}
        pub(crate) fn depth(&self, _delta: i64) {}
    }

    pub(crate) struct ListenerExport;

    impl ListenerExport {
        pub(crate) fn new(_listener: &str) -> Self {
            Self
        }
        #[inline]
        pub(crate) fn handled(&self, _events: u64) {}
        #[inline]
        pub(crate) fn failed(&self, _events: u64, _panicked: u64) {}
        #[inline]
        pub(crate) fn retried(&self, _events: u64) {}
        #[inline]
        pub(crate) fn dead_lettered(&self, _events: u64) {}
        #[inline]
        pub(crate) fn latency(&self, _sample: Duration) {}
    }

    pub(crate) struct BusExport;

    impl BusExport {
        pub(crate) fn new(_kinds: &[&'static str]) -> Self {
            Self
        }
        pub(crate) fn emitted(&self, _kind: usize) {}
        pub(crate) fn rejected(&self) {}
    }
}

pub(crate) use export::{BusExport, ListenerExport, QueueExport};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut previous = 0;
        for value in (0..10_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let bucket = bucket_of(value);
            assert!(bucket >= previous, "bucket of {value} went backwards");
            assert!(bucket < BUCKETS);
            assert!(upper_bound(bucket) >= value, "{value} above its bucket");
            previous = bucket;
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth_of_the_true_value() {
        let histogram = Histogram::new();
        for micros in 1..=1000 {
            histogram.record(Duration::from_micros(micros));
        }
        let summary = histogram.summary();
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.max, Duration::from_micros(1000));
        for (quantile, exact) in [(summary.p50, 500.0), (summary.p99, 990.0)] {
            let micros = quantile.as_secs_f64() * 1e6;
            assert!(
                (micros - exact).abs() / exact <= 0.125,
                "{micros} vs {exact}"
            );
        }
    }
}
