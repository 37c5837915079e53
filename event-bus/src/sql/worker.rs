//! One durable listener's link to the database: a worker task that claims
//! deliveries (leases them to this process), hands them to the runner
//! through a [`LogSource`], writes how each was finished, and renews the
//! leases of what this process holds while it lives.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use sqlx::Pool;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::backend::{Backend, ClaimArgs, Claimed, Finish, Finished, RangeLeft, Step};
use crate::codec::JsonCodec;
use crate::envelope::Envelope;
use crate::event::Event;
use crate::runner::{Delivery, Retry, Source, Undecodable};

/// How many finishes one transaction writes at most.
const FINISHES_PER_WRITE: usize = 1024;

/// How many finishes are written at once without waiting for more.
const FLUSH_AT: usize = 128;

/// How long a finish waits for others to be written with.
const LINGER: Duration = Duration::from_millis(2);

/// How long the worker waits after a failed statement before it tries
/// again.
const BACKOFF: Duration = Duration::from_millis(200);

/// Milliseconds since the Unix epoch, as the tables keep time.
pub(crate) fn millis(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

fn now() -> i64 {
    millis(SystemTime::now())
}

fn millis_of(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What the worker hands the source: a delivery or an event that did not
/// decode. Dropped without being yielded (the run ended first), a delivery
/// is given back, its attempt uncounted.
pub(crate) struct Unyielded<E>(Option<Result<LogDelivery<E>, Undecodable>>);

impl<E> Drop for Unyielded<E> {
    fn drop(&mut self) {
        if let Some(Ok(mut delivery)) = self.0.take() {
            delivery.finisher.release();
        }
    }
}

/// How one delivery of one event is finished: once, through the worker.
/// Dropped unfinished, the event is given back with its attempt counted.
struct Finisher {
    position: i64,
    attempt: u32,
    /// The lease the claim took: what its finish must match.
    lease: Arc<str>,
    /// The last position of the claim that covers it; `None` when a
    /// delivery row does.
    range: Option<i64>,
    finishes: Option<mpsc::UnboundedSender<Finished>>,
}

impl Finisher {
    /// Hands `finish` to the worker; the delivery is finished after.
    fn send(&mut self, finish: Finish) {
        if let Some(finishes) = self.finishes.take() {
            // The worker outlives every delivery's sender: it ends only
            // once they are all gone.
            let _ = finishes.send(Finished {
                lease: self.lease.clone(),
                range: self.range,
                finish,
            });
        }
    }

    fn dead(&mut self, error: String) {
        self.send(Finish::Dead {
            position: self.position,
            attempts: i64::from(self.attempt),
            error,
            at: now(),
        });
    }

    /// Gives the delivery back unattempted.
    fn release(&mut self) {
        self.send(Finish::Release {
            position: self.position,
            attempts: i64::from(self.attempt) - 1,
        });
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.send(Finish::Abandon {
            position: self.position,
            attempts: i64::from(self.attempt),
        });
    }
}

/// One event of the log delivered to one durable listener, for one attempt.
///
/// Finished by the runner; its finish is written in the worker's next batch
/// of finishes (so an `ack` costs no round trip of its own). Dropped
/// unfinished (the listener was stopped mid-handler), the event is given
/// back with its attempt counted.
pub struct LogDelivery<E> {
    envelope: Arc<Envelope<E>>,
    finisher: Finisher,
}

impl<E> std::fmt::Debug for LogDelivery<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogDelivery")
            .field("position", &self.finisher.position)
            .field("attempt", &self.finisher.attempt)
            .finish_non_exhaustive()
    }
}

impl<E> LogDelivery<E> {
    /// The event's position in the log.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.finisher.position.unsigned_abs()
    }
}

impl<E: Event> Delivery<E> for LogDelivery<E> {
    fn envelope(&self) -> &Arc<Envelope<E>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.finisher.attempt
    }

    async fn ack(mut self) {
        let position = self.finisher.position;
        self.finisher.send(Finish::Ack(position));
    }

    async fn retry(mut self, delay: Duration, error: &str) -> Retry<Self> {
        let finisher = &mut self.finisher;
        let again = Finisher {
            position: finisher.position,
            attempt: finisher.attempt.saturating_add(1),
            lease: finisher.lease.clone(),
            // From now on the delivery has a row of its own.
            range: None,
            finishes: finisher.finishes.clone(),
        };
        finisher.send(Finish::Retry {
            position: finisher.position,
            attempts: i64::from(finisher.attempt),
            next_try_at: now().saturating_add(millis_of(delay)),
            error: error.to_owned(),
        });
        // The lease stays this process's: the runner waits out the delay
        // and attempts it again, in order. Should the process die meanwhile,
        // the retry is taken from its row once the lease has expired and
        // the delay has passed, as the attempt after the one that failed.
        Retry::InPlace(Self {
            envelope: self.envelope.clone(),
            finisher: again,
        })
    }

    async fn terminate(mut self, reason: &str) {
        self.finisher.dead(reason.to_owned());
    }

    async fn release(mut self) {
        self.finisher.release();
    }
}

/// A durable listener's [`Source`]: what its worker claimed, in log order.
pub(crate) struct LogSource<E> {
    claimed: mpsc::Receiver<Unyielded<E>>,
    /// Deliveries yielded, for the listener's handle.
    delivered: Arc<AtomicU64>,
    closing: watch::Receiver<bool>,
    /// Keeps the worker running while the source lives.
    _finishes: mpsc::UnboundedSender<Finished>,
}

impl<E: Event> Source<E> for LogSource<E> {
    type Delivery = LogDelivery<E>;

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<LogDelivery<E>, Undecodable>>> {
        loop {
            // tokio's channel takes part in the cooperative budget.
            return match self.claimed.poll_recv(cx) {
                Poll::Ready(Some(mut unyielded)) => match unyielded.0.take() {
                    Some(next) => {
                        if next.is_ok() {
                            self.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Poll::Ready(Some(next))
                    }
                    None => continue,
                },
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_draining(&self) -> bool {
        *self.closing.borrow()
    }

    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.clone();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

/// The store's writers' turn on a database that takes one writer at a
/// time: see `Sealed::one_writer`.
#[derive(Clone, Default)]
pub(crate) struct Gate(Arc<tokio::sync::Mutex<()>>);

impl Gate {
    /// Waits for the turn to write, on a database that needs one.
    pub(crate) async fn turn<DB: Backend>(
        &self,
        pool: &Pool<DB>,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if DB::one_writer(pool) {
            Some(self.0.clone().lock_owned().await)
        } else {
            None
        }
    }
}

/// How a worker runs.
pub(crate) struct WorkerConfig {
    pub(crate) listener: Arc<str>,
    pub(crate) names: Option<Vec<&'static str>>,
    pub(crate) prefetch: usize,
    pub(crate) lease: Duration,
    pub(crate) poll: Duration,
}

/// The worker of one durable listener in this process.
pub(crate) struct Worker<E, DB: Backend> {
    pool: Pool<DB>,
    gate: Gate,
    config: WorkerConfig,
    /// This worker's id; each claim's lease is `<id>:<claim>`.
    id: String,
    /// `<id>:%`: every lease of this worker.
    leases: String,
    claims: u64,
    claimed: Option<mpsc::Sender<Unyielded<E>>>,
    finishes: mpsc::UnboundedReceiver<Finished>,
    finishes_tx: mpsc::WeakUnboundedSender<Finished>,
    wake: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    /// The log's last position as the last claim saw it.
    last_position: i64,
    /// The events of this worker's claims not yet finished, by claim
    /// (its lease and last position).
    held: HashMap<(Arc<str>, i64), BTreeSet<i64>>,
    /// The claims with events finished since the last step.
    touched: BTreeSet<(Arc<str>, i64)>,
    /// When the next claim looks for deliveries due again and expired
    /// claims: every poll interval (at most a lease), and at once after it
    /// found some or this worker gave one back.
    reclaim_due: Instant,
    #[cfg(feature = "metrics")]
    lag: metrics::Gauge,
}

/// Makes a listener's worker and the source it feeds. The source holds the
/// only strong sender of finishes besides the deliveries: once it and every
/// delivery are gone, the worker writes what is left and ends.
pub(crate) fn worker<E: Event, DB: Backend>(
    pool: Pool<DB>,
    gate: Gate,
    config: WorkerConfig,
    wake: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    delivered: Arc<AtomicU64>,
) -> (Worker<E, DB>, LogSource<E>) {
    let (claimed_tx, claimed) = mpsc::channel(config.prefetch.max(1));
    let (finishes_tx, finishes) = mpsc::unbounded_channel();
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    #[cfg(feature = "metrics")]
    let lag = metrics::gauge!("event_bus_log_lag", "listener" => config.listener.to_string());
    let worker = Worker {
        pool,
        gate,
        config,
        leases: format!("{id}:%"),
        id,
        claims: 0,
        claimed: Some(claimed_tx),
        finishes,
        finishes_tx: finishes_tx.downgrade(),
        wake,
        closing: closing.clone(),
        last_position: 0,
        held: HashMap::new(),
        touched: BTreeSet::new(),
        reclaim_due: Instant::now(),
        #[cfg(feature = "metrics")]
        lag,
    };
    let source = LogSource {
        claimed,
        delivered,
        closing,
        _finishes: finishes_tx,
    };
    (worker, source)
}

impl<E, DB> Worker<E, DB>
where
    E: Event + DeserializeOwned,
    DB: Backend,
{
    /// Runs until the listener's run has ended and every finish is written.
    pub(crate) async fn run(mut self) {
        let mut heartbeat_due = Instant::now() + self.config.lease / 3;
        let mut poll = tokio::time::interval(self.config.poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending: Vec<Finished> = Vec::new();
        // Written on failure at the end, before the worker gives up.
        let mut last_tries = 5_u32;
        // Whether there may be more to claim than the last claim took.
        let mut more = true;
        // After a failed statement, nothing is tried again before this.
        let mut calm_until: Option<Instant> = None;
        let mut ended = false;
        let mut draining = false;
        // When the oldest unwritten finish came.
        let mut first_pending: Option<Instant> = None;
        while !ended || !pending.is_empty() {
            while pending.len() < FINISHES_PER_WRITE {
                match self.finishes.try_recv() {
                    Ok(finish) => {
                        first_pending.get_or_insert_with(Instant::now);
                        pending.push(finish);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        ended = true;
                        break;
                    }
                }
            }
            if heartbeat_due <= Instant::now() {
                // Before anything else can keep the worker busy: a lease
                // must not lapse while the process lives.
                self.renew().await;
                heartbeat_due = Instant::now() + self.config.lease / 3;
                continue;
            }
            let calm = calm_until.is_some_and(|until| Instant::now() < until);
            if !ended && self.closing_now() && !draining {
                // A drain: claim up to the log's end, then end the source.
                draining = true;
                more = true;
            }
            if draining && !more {
                // The source ends once it has yielded what is claimed.
                self.claimed = None;
            }
            let room = self.claimed.as_ref().map_or(0, mpsc::Sender::capacity);
            // A claim is a transaction: it waits until it can take half a
            // prefetch (or is draining, or ran dry last time), not one event.
            let worth = (self.config.prefetch / 2).max(1);
            let claim = !ended && more && room >= worth;
            // Finishes wait a moment for company: one transaction writes
            // many, and nothing is promised of when an ack is written. A
            // claim takes them along.
            let due = ended
                || draining
                || pending.len() >= FLUSH_AT
                || first_pending.is_some_and(|first| first.elapsed() >= LINGER);
            if !calm && (claim || (due && !pending.is_empty())) {
                let limit = claim.then(|| room.min(self.config.prefetch));
                match self.step(&pending, limit).await {
                    Ok(full) => {
                        pending.clear();
                        first_pending = None;
                        if claim {
                            more = full;
                        }
                    }
                    Err(error) if ended && last_tries == 0 => {
                        // Nothing is lost: the leases expire and the
                        // events are delivered again.
                        tracing::warn!(
                            listener = %self.config.listener,
                            error = %error,
                            unwritten = pending.len(),
                            "could not record how deliveries finished; they will be delivered again",
                        );
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(
                            listener = %self.config.listener,
                            error = %error,
                            unwritten = pending.len(),
                            "could not claim deliveries or record how they finished; trying again",
                        );
                        last_tries = last_tries.saturating_sub(u32::from(ended));
                        calm_until = Some(Instant::now() + BACKOFF);
                    }
                }
                continue;
            }
            if ended {
                if calm {
                    tokio::time::sleep_until(calm_until.unwrap_or_else(Instant::now)).await;
                    calm_until = None;
                }
                continue;
            }
            let claiming = self.claimed.is_some();
            let full = claiming && room < worth && more;
            let claimed = self.claimed.clone();
            tokio::select! {
                biased;
                finish = self.finishes.recv() => match finish {
                    Some(finish) => {
                        first_pending.get_or_insert_with(Instant::now);
                        pending.push(finish);
                    }
                    None => ended = true,
                },
                () = tokio::time::sleep_until(
                    first_pending.map_or_else(Instant::now, |first| first + LINGER)
                ), if first_pending.is_some() && !calm => {}
                _ = self.closing.changed(), if claiming => {}
                _ = tokio::time::sleep_until(calm_until.unwrap_or_else(Instant::now)), if calm => {
                    calm_until = None;
                }
                changed = self.wake.changed(), if claiming && !full => {
                    if changed.is_ok() {
                        more = true;
                    }
                }
                _ = poll.tick(), if claiming && !full => more = true,
                permit = async { claimed.as_ref()?.reserve_many(worth).await.ok() }, if full => {
                    drop(permit);
                }
                () = tokio::time::sleep_until(heartbeat_due) => {}
            }
        }
    }

    fn closing_now(&self) -> bool {
        self.claimed.is_some() && *self.closing.borrow()
    }

    /// One transaction: writes the `finished` and, given a limit, claims up
    /// to it and hands what it claimed to the source; whether there may be
    /// more to claim at once.
    async fn step(&mut self, finished: &[Finished], limit: Option<usize>) -> sqlx::Result<bool> {
        for finished in finished {
            if matches!(
                finished.finish,
                Finish::Abandon { .. } | Finish::Release { .. }
            ) {
                self.reclaim_due = Instant::now();
            }
            if let Some(up_to) = finished.range {
                let claim = (finished.lease.clone(), up_to);
                if let Some(events) = self.held.get_mut(&claim) {
                    events.remove(&finished.finish.position());
                    self.touched.insert(claim);
                }
            }
        }
        let ranges: Vec<RangeLeft<'_>> = self
            .touched
            .iter()
            .map(|claim| RangeLeft {
                owner: &claim.0,
                up_to: claim.1,
                left: self.held.get(claim).and_then(|events| {
                    Some((
                        events.first()? - 1,
                        i64::try_from(events.len()).unwrap_or(i64::MAX),
                    ))
                }),
            })
            .collect();
        // Nothing is claimed for a run that has ended.
        let finishes = limit.and_then(|_| self.finishes_tx.upgrade());
        let lease: Option<Arc<str>> = finishes.as_ref().map(|_| {
            self.wake.borrow_and_update();
            format!("{}:{}", self.id, self.claims + 1).into()
        });
        let claim = limit.zip(lease.as_deref()).map(|(limit, owner)| ClaimArgs {
            owner,
            worker: &self.leases,
            names: self.config.names.as_deref(),
            limit,
            lease: millis_of(self.config.lease),
            reclaim: Instant::now() >= self.reclaim_due,
        });
        let reclaiming = claim.as_ref().is_some_and(|claim| claim.reclaim);
        let stepped = {
            let _turn = self.gate.turn(&self.pool).await;
            DB::step(
                &self.pool,
                Step {
                    listener: &self.config.listener,
                    finishes: finished,
                    ranges: &ranges,
                    claim,
                },
            )
            .await?
        };
        drop(ranges);
        for claim in std::mem::take(&mut self.touched) {
            if self.held.get(&claim).is_some_and(BTreeSet::is_empty) {
                self.held.remove(&claim);
            }
        }
        let last_position = stepped.claim.as_ref().map(|claim| claim.last_position);
        self.checkpointed(last_position, stepped.checkpoint);
        let (Some(claim), Some(finishes), Some(lease)) = (stepped.claim, finishes, lease) else {
            if limit.is_some() {
                self.claimed = None;
            }
            return Ok(false);
        };
        self.claims += 1;
        if claim.reclaimed {
            // There may be more due.
        } else if reclaiming {
            let every = self.config.poll.min(self.config.lease);
            self.reclaim_due = Instant::now() + every;
        }
        for claimed in claim.claimed {
            if let Some(up_to) = claimed.range {
                self.held
                    .entry((lease.clone(), up_to))
                    .or_default()
                    .insert(claimed.position);
            }
            let unyielded = Unyielded(Some(decode::<E>(claimed, &lease, &finishes)));
            if let Some(sender) = &self.claimed {
                // The claim took no more than the channel has room for,
                // and only this task sends.
                if let Err(error) = sender.try_send(unyielded) {
                    drop(error);
                }
            }
        }
        Ok(claim.full)
    }

    /// Renews the leases of everything this process holds for the listener.
    async fn renew(&self) {
        let renewed = {
            let _turn = self.gate.turn(&self.pool).await;
            let until = now().saturating_add(millis_of(self.config.lease));
            DB::renew(&self.pool, &self.config.listener, &self.leases, until).await
        };
        if let Err(error) = renewed {
            tracing::warn!(
                listener = %self.config.listener,
                error = %error,
                "could not renew the leases of deliveries in progress; another process may take them when they expire",
            );
        }
    }

    /// Records the listener's lag (the log's last position minus its
    /// checkpoint) in the `event_bus_log_lag` gauge.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn checkpointed(&mut self, last_position: Option<i64>, checkpoint: i64) {
        if let Some(last) = last_position {
            self.last_position = self.last_position.max(last);
        }
        #[cfg(feature = "metrics")]
        {
            #[allow(clippy::cast_precision_loss)]
            self.lag
                .set((self.last_position - checkpoint).max(0) as f64);
        }
    }
}

/// The delivery of what was claimed, or why its payload does not decode.
fn decode<E: Event + DeserializeOwned>(
    claimed: Claimed,
    lease: &Arc<str>,
    finishes: &mpsc::UnboundedSender<Finished>,
) -> Result<LogDelivery<E>, Undecodable> {
    let Claimed {
        position,
        attempts,
        payload,
        range,
    } = claimed;
    let attempt = u32::try_from(attempts.max(1)).unwrap_or(u32::MAX);
    let mut finisher = Finisher {
        position,
        attempt,
        lease: lease.clone(),
        range,
        finishes: Some(finishes.clone()),
    };
    match JsonCodec.decode::<E>(&payload) {
        Ok(envelope) => {
            let (event, metadata) = envelope.into_parts();
            let metadata = metadata.with_sequence(position.unsigned_abs());
            Ok(LogDelivery {
                envelope: Arc::new(Envelope::from_parts(event, metadata)),
                finisher,
            })
        }
        Err(error) => {
            // Terminated, it is dead; dropped unterminated (the run was
            // aborted), abandoned.
            let mut undecodable = Undecodable::new(&error, payload, move |reason| {
                finisher.dead(reason);
                std::future::ready(())
            })
            .with_attempt(attempt);
            if let Some(name) = error.name() {
                undecodable = undecodable.with_name(name);
            }
            if let Some(id) = error.id() {
                undecodable = undecodable.with_id(id);
            }
            Err(undecodable)
        }
    }
}
