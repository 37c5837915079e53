//! A scripted source for the runner's tests: every delivery it yields and
//! every way it is finished (or dropped unfinished) is logged with the time
//! on tokio's clock, so that a test can check "finished exactly once", the
//! attempts, and how often a held delivery was kept alive.
#![allow(dead_code, unreachable_pub)]

pub mod matrix;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use event_bus::runner::{DeadLetterSink, Delivery, Retry, Source, Undecodable, UndecodableLetter};
use event_bus::{DeadLetter, DomainEvent, Envelope};
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

/// The (event id, attempt) pairs one handler call saw.
pub type Attempts = Vec<(u64, u32)>;

/// What happened to a delivery, at what time.
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    Yielded {
        id: u64,
        attempt: u32,
    },
    Acked {
        id: u64,
        attempt: u32,
    },
    /// Retried, kept in place.
    RetriedInPlace {
        id: u64,
        attempt: u32,
    },
    /// Retried, taken back.
    Redelivered {
        id: u64,
        attempt: u32,
    },
    Terminated {
        id: u64,
        attempt: u32,
        reason: String,
    },
    Released {
        id: u64,
        attempt: u32,
    },
    InProgress {
        id: u64,
        attempt: u32,
    },
    /// Dropped without being finished.
    DroppedUnfinished {
        id: u64,
        attempt: u32,
    },
    /// The source answered `Ready(None)`.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    InPlace,
    Redelivered,
}

#[derive(Default)]
pub struct State {
    queue: VecDeque<(u64, u32)>,
    closed: bool,
    waker: Option<Waker>,
    pub log: Vec<(Instant, What)>,
}

/// A source over a queue of job ids; it ends once closed and empty.
#[derive(Clone)]
pub struct Script {
    pub state: Arc<Mutex<State>>,
    pub mode: Mode,
    pub interval: Option<Duration>,
}

impl Script {
    pub fn new(mode: Mode, interval: Option<Duration>) -> Self {
        Self {
            state: Arc::default(),
            mode,
            interval,
        }
    }

    /// A closed script holding `ids`: it ends once they are all finished.
    pub fn of(ids: impl IntoIterator<Item = u64>, mode: Mode, interval: Option<Duration>) -> Self {
        let script = Self::new(mode, interval);
        for id in ids {
            script.push(id);
        }
        script.close();
        script
    }

    pub fn push(&self, id: u64) {
        self.push_at(id, 1);
    }

    fn push_at(&self, id: u64, attempt: u32) {
        let waker = {
            let mut state = self.state.lock().unwrap();
            state.queue.push_back((id, attempt));
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

    /// Every yielded event ends acked or terminated exactly once, and no
    /// delivery was dropped unfinished; returns (acked ids, terminated ids).
    pub fn check_exactly_once(&self, ids: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let log = self.log();
        let mut acked = Vec::new();
        let mut terminated = Vec::new();
        for (_, what) in &log {
            match what {
                What::Acked { id, .. } => acked.push(*id),
                What::Terminated { id, .. } => terminated.push(*id),
                What::DroppedUnfinished { id, attempt } => {
                    panic!("delivery {id} (attempt {attempt}) dropped unfinished: {log:#?}")
                }
                _ => {}
            }
        }
        for id in ids {
            let ends = acked.iter().chain(&terminated).filter(|x| *x == id).count();
            assert_eq!(ends, 1, "event {id} finished {ends} times: {log:#?}");
        }
        (acked, terminated)
    }

    /// The longest time a delivery of `id` was held by the runner without
    /// being told it is in progress: from its yield (or its last keep-alive)
    /// to its next keep-alive or the end of its hold.
    pub fn longest_silence(&self, id: u64) -> Duration {
        let mut longest = Duration::ZERO;
        let mut since: Option<Instant> = None;
        for (at, what) in self.log() {
            match what {
                What::Yielded { id: i, .. } if i == id => since = Some(at),
                What::InProgress { id: i, .. } if i == id => {
                    if let Some(s) = since {
                        longest = longest.max(at - s);
                    }
                    since = Some(at);
                }
                What::Acked { id: i, .. }
                | What::Terminated { id: i, .. }
                | What::Redelivered { id: i, .. }
                | What::Released { id: i, .. }
                | What::DroppedUnfinished { id: i, .. }
                    if i == id =>
                {
                    if let Some(s) = since.take() {
                        longest = longest.max(at - s);
                    }
                }
                _ => {}
            }
        }
        longest
    }
}

pub struct Job {
    envelope: Arc<Envelope<Ev>>,
    id: u64,
    attempt: u32,
    script: Script,
    finished: bool,
}

impl Job {
    fn done(mut self, what: What) -> (Script, u64, u32, Arc<Envelope<Ev>>) {
        self.finished = true;
        self.script.record(what);
        (
            self.script.clone(),
            self.id,
            self.attempt,
            self.envelope.clone(),
        )
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.finished {
            self.script.record(What::DroppedUnfinished {
                id: self.id,
                attempt: self.attempt,
            });
        }
    }
}

impl Delivery<Ev> for Job {
    fn envelope(&self) -> &Arc<Envelope<Ev>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(self) {
        let (id, attempt) = (self.id, self.attempt);
        self.done(What::Acked { id, attempt });
    }

    async fn retry(self, _delay: Duration, _error: &str) -> Retry<Self> {
        let (id, attempt) = (self.id, self.attempt);
        match self.script.mode {
            Mode::InPlace => {
                let (script, id, attempt, envelope) =
                    self.done(What::RetriedInPlace { id, attempt });
                Retry::InPlace(Job {
                    envelope,
                    id,
                    attempt: attempt + 1,
                    script,
                    finished: false,
                })
            }
            Mode::Redelivered => {
                let (script, id, attempt, _) = self.done(What::Redelivered { id, attempt });
                script.push_at(id, attempt + 1);
                Retry::Redelivered
            }
        }
    }

    async fn terminate(self, reason: &str) {
        let (id, attempt) = (self.id, self.attempt);
        self.done(What::Terminated {
            id,
            attempt,
            reason: reason.to_owned(),
        });
    }

    async fn release(self) {
        let (id, attempt) = (self.id, self.attempt);
        let (script, id, attempt, _) = self.done(What::Released { id, attempt });
        script.push_at(id, attempt);
    }

    fn in_progress(&self) {
        self.script.record(What::InProgress {
            id: self.id,
            attempt: self.attempt,
        });
    }

    fn progress_interval(&self) -> Option<Duration> {
        self.script.interval
    }
}

impl Source<Ev> for Script {
    type Delivery = Job;

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Job, Undecodable>>> {
        let mut state = self.state.lock().unwrap();
        if let Some((id, attempt)) = state.queue.pop_front() {
            state
                .log
                .push((Instant::now(), What::Yielded { id, attempt }));
            drop(state);
            return Poll::Ready(Some(Ok(Job {
                envelope: Arc::new(Envelope::new(Ev::Job(id))),
                id,
                attempt,
                script: self.clone(),
                finished: false,
            })));
        }
        if state.closed {
            state.log.push((Instant::now(), What::Ended));
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A dead-letter sink that keeps (id, error, attempts), optionally slow.
#[derive(Default)]
pub struct Letters {
    pub letters: Mutex<Vec<(u64, String, u32)>>,
    pub slow: Option<Duration>,
}

impl DeadLetterSink<Ev> for Letters {
    async fn record(&self, letter: DeadLetter<Ev>) {
        if let Some(slow) = self.slow {
            tokio::time::sleep(slow).await;
        }
        let entry = (id_of(&letter.envelope), letter.error, letter.attempts);
        self.letters.lock().unwrap().push(entry);
    }

    async fn record_undecodable(&self, letter: UndecodableLetter) {
        self.letters
            .lock()
            .unwrap()
            .push((u64::MAX, letter.error, letter.attempts));
    }
}

/// A listener that works `work` on the clock per attempt and fails (or
/// panics) every attempt up to `fail_while`.
#[derive(Clone, Default)]
pub struct Worker {
    pub work: Duration,
    pub fail_while: u32,
    pub panic: bool,
    pub seen: Arc<Mutex<Vec<(u64, u32)>>>,
}

impl event_bus::Listener<Ev> for Worker {
    fn name(&self) -> &str {
        "worker"
    }

    async fn handle(
        &self,
        event: Arc<Envelope<Ev>>,
        meta: event_bus::Meta,
    ) -> Result<(), event_bus::HandlerError> {
        let id = id_of(&event);
        self.seen.lock().unwrap().push((id, meta.attempt()));
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        if meta.attempt() <= self.fail_while {
            if self.panic {
                panic!("worker panicked on {id}");
            }
            return Err("worker failed".into());
        }
        Ok(())
    }
}

/// A batch listener that works `work` per call, fails whole batches while
/// their attempt is up to `fail_while`, and closes `closes` when called.
#[derive(Clone, Default)]
pub struct BatchWorker {
    pub work: Duration,
    pub fail_while: u32,
    pub closes: Option<Script>,
    pub seen: Arc<Mutex<Vec<Attempts>>>,
}

impl event_bus::BatchListener<Ev> for BatchWorker {
    fn name(&self) -> &str {
        "batch-worker"
    }

    async fn handle_batch(
        &self,
        batch: &event_bus::Batch<Ev>,
    ) -> Result<(), event_bus::BatchError> {
        let seen: Vec<(u64, u32)> = batch
            .iter()
            .zip(batch.attempts())
            .map(|(e, a)| (id_of(e), *a))
            .collect();
        self.seen.lock().unwrap().push(seen);
        if let Some(script) = &self.closes {
            script.close();
        }
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        if batch.attempt() <= self.fail_while {
            return Err(event_bus::BatchError::all("batch failed"));
        }
        Ok(())
    }
}

/// What a scripted handler does on an attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Ok,
    Fail,
    /// Panics in poll.
    Panic,
    /// Panics while making the future (before it is polled).
    PanicOnMake,
    /// Returns `Ok` from poll, then panics in the future's drop.
    PanicOnDrop,
    /// Panics in poll, then again in the future's drop.
    PanicOnPollAndDrop,
    /// Waits on the clock this long, then Ok.
    Sleep(Duration),
}

/// A handler future that does `act` and counts its drops.
pub struct ActFuture {
    act: Act,
    drops: Arc<std::sync::atomic::AtomicUsize>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl std::future::Future for ActFuture {
    type Output = Result<(), event_bus::HandlerError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.act {
            Act::Ok | Act::PanicOnDrop => Poll::Ready(Ok(())),
            Act::Fail => Poll::Ready(Err("scripted failure".into())),
            Act::Panic | Act::PanicOnPollAndDrop => panic!("scripted panic in poll"),
            Act::PanicOnMake => unreachable!(),
            Act::Sleep(d) => {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                std::task::ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl Drop for ActFuture {
    fn drop(&mut self) {
        let n = self.drops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if matches!(self.act, Act::PanicOnDrop | Act::PanicOnPollAndDrop) && n < 1_000_000 {
            if std::thread::panicking() {
                return;
            }
            panic!("scripted panic in drop");
        }
    }
}

/// A listener whose every attempt does what `script(id, attempt)` says.
#[derive(Clone)]
pub struct Scripted {
    pub script: fn(u64, u32) -> Act,
    pub seen: Arc<Mutex<Vec<(u64, u32)>>>,
    pub drops: Arc<std::sync::atomic::AtomicUsize>,
    pub made: Arc<std::sync::atomic::AtomicUsize>,
    /// The span current in each call.
    pub spans: Arc<Mutex<Vec<Option<&'static str>>>>,
}

impl Scripted {
    pub fn new(script: fn(u64, u32) -> Act) -> Self {
        Self {
            script,
            seen: Arc::default(),
            drops: Arc::default(),
            made: Arc::default(),
            spans: Arc::default(),
        }
    }

    pub fn seen(&self) -> Vec<(u64, u32)> {
        self.seen.lock().unwrap().clone()
    }
}

impl event_bus::Listener<Ev> for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn handle(
        &self,
        event: Arc<Envelope<Ev>>,
        meta: event_bus::Meta,
    ) -> impl std::future::Future<Output = Result<(), event_bus::HandlerError>> + Send {
        let id = id_of(&event);
        assert_eq!(meta.id(), event.id());
        self.seen.lock().unwrap().push((id, meta.attempt()));
        let span = current_span_name();
        self.spans.lock().unwrap().push(span);
        let act = (self.script)(id, meta.attempt());
        if act == Act::PanicOnMake {
            panic!("scripted panic in make");
        }
        self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ActFuture {
            act,
            drops: self.drops.clone(),
            sleep: None,
        }
    }
}

thread_local! {
    /// The names of the spans entered on this thread, innermost last: kept
    /// by a test's subscriber.
    pub static ENTERED: std::cell::RefCell<Vec<(u64, &'static str)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The innermost span entered on this thread, as a test's subscriber saw.
pub fn current_span_name() -> Option<&'static str> {
    ENTERED.with(|e| e.borrow().last().map(|(_, name)| *name))
}
