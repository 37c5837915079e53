//! A source whose deliveries have per-(id, attempt)
//! progress intervals and slow finishing futures, logging every yield,
//! finish (its start and its end) and keep-alive on tokio's clock.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use event_bus::runner::{DeadLetterSink, Delivery, Retry, Source, Undecodable, UndecodableLetter};
use event_bus::{BatchError, DeadLetter, DomainEvent, Envelope, HandlerError};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
pub enum Ev {
    Job(u64),
}

pub fn id_of(envelope: &Envelope<Ev>) -> u64 {
    match **envelope {
        Ev::Job(id) => id,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Yielded(u64, u32),
    /// The runner started finishing (id, attempt) this way.
    Finishing(u64, u32, &'static str),
    /// ... and that finishing future completed.
    Finished(u64, u32, &'static str),
    InProgress(u64, u32),
    Dropped(u64, u32),
    UndecodableTerminated,
}

pub enum Item {
    Job(u64, u32),
    Undecodable,
}

pub struct Plan {
    pub interval: fn(u64, u32) -> Option<Duration>,
    pub ack: Duration,
    pub retry: Duration,
    pub terminate: Duration,
    pub release: Duration,
    pub redeliver: bool,
}

pub fn plan(interval: fn(u64, u32) -> Option<Duration>) -> Plan {
    Plan {
        interval,
        ack: Duration::ZERO,
        retry: Duration::ZERO,
        terminate: Duration::ZERO,
        release: Duration::ZERO,
        redeliver: false,
    }
}

#[derive(Default)]
pub struct State {
    queue: VecDeque<Item>,
    closed: bool,
    waker: Option<Waker>,
    pub log: Vec<(Instant, What)>,
}

#[derive(Clone)]
pub struct Src {
    pub state: Arc<Mutex<State>>,
    pub plan: Arc<Plan>,
}

impl Src {
    pub fn new(plan: Plan) -> Self {
        Self {
            state: Arc::default(),
            plan: Arc::new(plan),
        }
    }

    pub fn of(items: impl IntoIterator<Item = Item>, plan: Plan) -> Self {
        let src = Self::new(plan);
        for item in items {
            src.push(item);
        }
        src.close();
        src
    }

    pub fn push(&self, item: Item) {
        let waker = {
            let mut state = self.state.lock().unwrap();
            state.queue.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub fn close(&self) {
        let waker = {
            let mut state = self.state.lock().unwrap();
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub fn log(&self) -> Vec<(Instant, What)> {
        self.state.lock().unwrap().log.clone()
    }

    fn record(&self, what: What) {
        self.state.lock().unwrap().log.push((Instant::now(), what));
    }

    /// Every id ends acked or terminated once; nothing dropped; no
    /// in_progress on a delivery whose finishing has started.
    pub fn check(&self, ids: &[u64]) {
        let log = self.log();
        let mut ends = std::collections::HashMap::<u64, usize>::new();
        let mut finishing = std::collections::HashSet::<(u64, u32)>::new();
        for (_, what) in &log {
            match what {
                What::Finishing(id, attempt, kind) => {
                    if matches!(*kind, "ack" | "terminate") {
                        *ends.entry(*id).or_default() += 1;
                    }
                    finishing.insert((*id, *attempt));
                }
                What::Yielded(id, attempt) => {
                    finishing.remove(&(*id, *attempt));
                }
                What::InProgress(id, attempt) => assert!(
                    !finishing.contains(&(*id, *attempt)),
                    "in_progress on ({id}, {attempt}) after its finish began: {log:#?}"
                ),
                What::Dropped(id, attempt) => {
                    panic!("({id}, {attempt}) dropped unfinished: {log:#?}")
                }
                _ => {}
            }
        }
        for id in ids {
            assert_eq!(ends.get(id), Some(&1), "{id} finished not once: {log:#?}");
        }
    }

    /// The longest time `id` was held without an in_progress, from its yield
    /// (or last in_progress) to the next one or to the start of its final
    /// finish. The delivery's own `retry` call (it is consumed by it) is not
    /// counted unless `own_retry`: the delivery it returns in place is held
    /// from its return.
    pub fn longest_silence(&self, id: u64, own_retry: bool) -> Duration {
        let mut longest = Duration::ZERO;
        let mut since: Option<Instant> = None;
        let end = |since: &mut Option<Instant>, at: Instant, longest: &mut Duration| {
            if let Some(s) = since.take() {
                *longest = (*longest).max(at - s);
            }
        };
        for (at, what) in self.log() {
            match what {
                What::Yielded(i, _) if i == id => since = Some(at),
                What::InProgress(i, _) if i == id => {
                    end(&mut since, at, &mut longest);
                    since = Some(at);
                }
                // A source's own in-place retry call counts as held
                // only when `own_retry` says so.
                What::Finishing(i, _, "retry-in-place")
                | What::Finished(i, _, "retry-in-place")
                    if i == id && own_retry => {}
                What::Finishing(i, _, "retry-in-place") if i == id => {
                    end(&mut since, at, &mut longest);
                }
                What::Finished(i, _, "retry-in-place") if i == id => since = Some(at),
                What::Finishing(i, _, _) | What::Dropped(i, _) if i == id => {
                    end(&mut since, at, &mut longest);
                }
                _ => {}
            }
        }
        longest
    }

    pub fn assert_never_silent(&self, id: u64, interval: Duration, what: &str) {
        let silence = self.longest_silence(id, false);
        assert!(
            silence <= interval,
            "{what}: {id} held {silence:?} without in_progress (interval {interval:?}): {:#?}",
            self.log()
        );
    }
}

pub struct Job {
    envelope: Arc<Envelope<Ev>>,
    id: u64,
    attempt: u32,
    src: Src,
    finished: bool,
}

impl Job {
    fn start(&mut self, kind: &'static str) {
        self.finished = true;
        self.src
            .record(What::Finishing(self.id, self.attempt, kind));
    }

    fn end(&self, kind: &'static str) {
        self.src.record(What::Finished(self.id, self.attempt, kind));
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.finished {
            self.src.record(What::Dropped(self.id, self.attempt));
        }
    }
}

async fn wait(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl Delivery<Ev> for Job {
    fn envelope(&self) -> &Arc<Envelope<Ev>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(mut self) {
        self.start("ack");
        wait(self.src.plan.ack).await;
        self.end("ack");
    }

    async fn retry(mut self, _delay: Duration, _error: &str) -> Retry<Self> {
        if self.src.plan.redeliver {
            self.start("redelivered");
            wait(self.src.plan.retry).await;
            self.end("redelivered");
            self.src.push(Item::Job(self.id, self.attempt + 1));
            Retry::Redelivered
        } else {
            self.start("retry-in-place");
            wait(self.src.plan.retry).await;
            self.end("retry-in-place");
            Retry::InPlace(Job {
                envelope: self.envelope.clone(),
                id: self.id,
                attempt: self.attempt + 1,
                src: self.src.clone(),
                finished: false,
            })
        }
    }

    async fn terminate(mut self, _reason: &str) {
        self.start("terminate");
        wait(self.src.plan.terminate).await;
        self.end("terminate");
    }

    async fn release(mut self) {
        self.start("release");
        wait(self.src.plan.release).await;
        self.end("release");
        self.src.push(Item::Job(self.id, self.attempt));
    }

    fn in_progress(&self) {
        assert!(!self.finished);
        self.src.record(What::InProgress(self.id, self.attempt));
    }

    fn progress_interval(&self) -> Option<Duration> {
        (self.src.plan.interval)(self.id, self.attempt)
    }
}

impl Source<Ev> for Src {
    type Delivery = Job;

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Job, Undecodable>>> {
        let mut state = self.state.lock().unwrap();
        match state.queue.pop_front() {
            Some(Item::Job(id, attempt)) => {
                state.log.push((Instant::now(), What::Yielded(id, attempt)));
                drop(state);
                Poll::Ready(Some(Ok(Job {
                    envelope: Arc::new(Envelope::new(Ev::Job(id))),
                    id,
                    attempt,
                    src: self.clone(),
                    finished: false,
                })))
            }
            Some(Item::Undecodable) => {
                drop(state);
                let src = self.clone();
                Poll::Ready(Some(Err(Undecodable::new(
                    "bad",
                    vec![1],
                    move |_| async move {
                        src.record(What::UndecodableTerminated);
                    },
                ))))
            }
            None if state.closed => Poll::Ready(None),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A sink, optionally slow on either record.
#[derive(Default)]
pub struct Sink {
    pub record: Duration,
    pub undecodable: Duration,
    pub letters: Mutex<Vec<u64>>,
}

impl DeadLetterSink<Ev> for Sink {
    async fn record(&self, letter: DeadLetter<Ev>) {
        wait(self.record).await;
        self.letters.lock().unwrap().push(id_of(&letter.envelope));
    }

    async fn record_undecodable(&self, _letter: UndecodableLetter) {
        wait(self.undecodable).await;
        self.letters.lock().unwrap().push(u64::MAX);
    }
}

/// A listener: each attempt works `act(id, attempt).0`, then fails if `.1`.
#[derive(Clone)]
pub struct Worker(pub fn(u64, u32) -> (Duration, bool));

impl event_bus::Listener<Ev> for Worker {
    fn name(&self) -> &str {
        "worker"
    }

    async fn handle(
        &self,
        event: Arc<Envelope<Ev>>,
        meta: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let (work, fail) = (self.0)(id_of(&event), meta.attempt());
        wait(work).await;
        if fail {
            return Err("failed".into());
        }
        Ok(())
    }
}

/// What a [`Batcher`] call does given its (id, attempt) pairs: works the
/// duration, then fails the indices named (if any).
pub type BatchPlan = fn(&[(u64, u32)]) -> (Duration, Option<Vec<usize>>);

/// A batch listener that follows its plan.
#[derive(Clone)]
pub struct Batcher(pub BatchPlan);

impl event_bus::BatchListener<Ev> for Batcher {
    fn name(&self) -> &str {
        "batcher"
    }

    async fn handle_batch(&self, batch: &event_bus::Batch<Ev>) -> Result<(), BatchError> {
        let seen: Vec<(u64, u32)> = batch
            .iter()
            .zip(batch.attempts())
            .map(|(e, a)| (id_of(e), *a))
            .collect();
        let (work, failed) = (self.0)(&seen);
        wait(work).await;
        match failed {
            None => Ok(()),
            Some(indices) => Err(BatchError::events(indices, "failed")),
        }
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub async fn to_end<F: std::future::Future>(run: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), run)
        .await
        .expect("the run ends")
}
