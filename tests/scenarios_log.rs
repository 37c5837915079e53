//! The scenario suite on a log tier: a small, in-process model of the
//! durable tier to come. Events are encoded with [`JsonCodec`] and appended
//! to a shared log; each listener reads the log from where it was spawned,
//! through a [`Source`] run by [`runner::run`], which decodes every entry,
//! takes retries back ([`Retry::Redelivered`]) and yields what does not
//! decode as [`Undecodable`]. Run it with `cargo test --test scenarios_log`.
//!
//! What the model keeps of a durable tier: a listener's position in the log,
//! its unfinished deliveries (handed out, or waiting to be redelivered, and
//! neither acked nor terminated), at most `concurrency` of them at once, and
//! the attempt count kept by the source. What it leaves out: persistence
//! across processes, leases, groups and replay.

mod scenarios;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use event_bus::codec::JsonCodec;
use event_bus::error::DecodeError;
use event_bus::runner::{
    self, DeadLetterSink, Delivery, Retry, RunReport, Source, Undecodable, UndecodableLetter,
};
use event_bus::{
    BatchListener, DeadLetter, Envelope, EventKind, InBatches, KindSet, Listener, ListenerOptions,
    OneByOne, Publish,
};
use futures::future::{BoxFuture, FutureExt, Shared, join_all};
use futures::stream::{self, BoxStream, StreamExt};
use scenarios::{
    Capabilities, Counts, Letter, Running, ScenarioEvent, ScenarioEventKind, Stopped, Tier,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, Sleep};

/// How many entries a source reads past (of kinds its listener is not
/// interested in) in one poll before it yields to other tasks.
const SKIPS_PER_POLL: usize = 64;

/// `mutex`'s guard; a panic while holding it does not hide what it guards.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// The log

/// Every accepted event's bytes in append order, shared by the publishers,
/// the listeners' sources and the taps.
struct Log {
    state: Mutex<LogState>,
    /// `true` once the shutdown began: what [`Source::draining`] waits on.
    closing: watch::Sender<bool>,
}

#[derive(Default)]
struct LogState {
    entries: Vec<Vec<u8>>,
    /// The log's length when the shutdown began: nothing is appended after.
    closed_at: Option<usize>,
    /// Appends refused because the shutdown had begun.
    refused: u64,
    /// Readers caught up with the log, woken when it grows or closes; one
    /// waker per reader id.
    waiting: HashMap<u64, Waker>,
    /// The last reader id given out.
    readers: u64,
}

/// What a reader finds at its position.
enum Read {
    /// The entry there.
    Entry(Vec<u8>),
    /// Nothing yet: the reader is woken when the log grows or closes.
    Wait,
    /// The log is closed and the reader is at its end.
    End,
}

impl Log {
    fn new() -> Self {
        Self {
            state: Mutex::new(LogState::default()),
            closing: watch::Sender::new(false),
        }
    }

    /// Appends the entry `entry` writes for its position (0 for the first);
    /// refused, and counted, once the shutdown began.
    fn append(&self, entry: impl FnOnce(usize) -> Vec<u8>) -> bool {
        let waiting: Vec<Waker> = {
            let mut state = lock(&self.state);
            if state.closed_at.is_some() {
                state.refused += 1;
                return false;
            }
            let position = state.entries.len();
            let bytes = entry(position);
            state.entries.push(bytes);
            state.waiting.drain().map(|(_, waker)| waker).collect()
        };
        waiting.into_iter().for_each(Waker::wake);
        true
    }

    /// Refuses appends from now on and wakes every reader; the log's length
    /// at that moment, the end every reader drains to.
    fn close(&self) -> usize {
        let (end, waiting) = {
            let mut state = lock(&self.state);
            let len = state.entries.len();
            let end = *state.closed_at.get_or_insert(len);
            let waiting: Vec<Waker> = state.waiting.drain().map(|(_, waker)| waker).collect();
            (end, waiting)
        };
        self.closing.send_replace(true);
        waiting.into_iter().for_each(Waker::wake);
        end
    }

    /// A new reader's id, and the log's end, where it starts.
    fn open_reader(&self) -> (u64, usize) {
        let mut state = lock(&self.state);
        state.readers += 1;
        (state.readers, state.entries.len())
    }

    /// The log's length, while it is open.
    fn open_len(&self) -> Option<usize> {
        let state = lock(&self.state);
        state.closed_at.is_none().then_some(state.entries.len())
    }

    /// What reader `reader` finds at `position`; when nothing yet, `waker`
    /// is woken once the log grows or closes.
    fn read(&self, reader: u64, position: usize, waker: &Waker) -> Read {
        let mut state = lock(&self.state);
        if let Some(bytes) = state.entries.get(position) {
            return Read::Entry(bytes.clone());
        }
        if state.closed_at.is_some() {
            return Read::End;
        }
        match state.waiting.get_mut(&reader) {
            Some(waiting) if waiting.will_wake(waker) => {}
            Some(waiting) => waiting.clone_from(waker),
            None => {
                state.waiting.insert(reader, waker.clone());
            }
        }
        Read::Wait
    }

    fn refused(&self) -> u64 {
        lock(&self.state).refused
    }
}

/// The bytes of `event` at log position `position`: its sequence is the
/// position, counted from 1.
fn encode(envelope: Envelope<ScenarioEvent>, position: usize) -> Vec<u8> {
    let (event, metadata) = envelope.into_parts();
    let envelope = Envelope::from_parts(event, metadata.with_sequence(position as u64 + 1));
    JsonCodec
        .encode(&envelope)
        .expect("a scenario event encodes")
}

/// Whether an entry that did not decode is for a listener interested in
/// `interests`: unless its name is that of a kind it is not interested in,
/// it may be, so it becomes a dead letter.
fn undecodable_is_for(error: &DecodeError, interests: &KindSet<ScenarioEventKind>) -> bool {
    error
        .name()
        .and_then(ScenarioEventKind::from_name)
        .is_none_or(|kind| interests.contains(kind))
}

/// Whether the entry `bytes` is delivered to a listener interested in
/// `interests`, as an event or as a dead letter.
fn is_for(bytes: &[u8], interests: &KindSet<ScenarioEventKind>) -> bool {
    match JsonCodec.decode::<ScenarioEvent>(bytes) {
        Ok(envelope) => interests.contains(envelope.kind()),
        Err(error) => undecodable_is_for(&error, interests),
    }
}

// ---------------------------------------------------------------------------
// A listener's reader: its position and unfinished deliveries

/// What a listener's source and its deliveries share with the tier.
struct Reader {
    name: String,
    interests: KindSet<ScenarioEventKind>,
    /// The most unfinished deliveries at once.
    limit: usize,
    state: Mutex<ReaderState>,
}

struct ReaderState {
    /// The next log position to read.
    next: usize,
    /// Deliveries handed out and not yet acked or terminated, those waiting
    /// in `retries` included: a retry taken back is still unfinished.
    unfinished: usize,
    /// Retries taken back, to be handed out again.
    retries: Vec<Retried>,
    /// The source's task, woken when a delivery finishes or comes back.
    waker: Option<Waker>,
    counts: Counts,
    /// Set by an abort: nothing is handed out or finished after it.
    stopped: bool,
    /// The log's length when the listener was stopped before the shutdown:
    /// what it leaves ends there.
    abandoned_at: Option<usize>,
}

/// A delivery taken back by [`Delivery::retry`].
struct Retried {
    envelope: Arc<Envelope<ScenarioEvent>>,
    /// The attempt it comes back as.
    attempt: u32,
    not_before: Instant,
}

impl Reader {
    /// Updates the state with `finish` unless the listener was stopped, and
    /// wakes its source.
    fn finish(&self, finish: impl FnOnce(&mut ReaderState)) {
        let waker = {
            let mut state = lock(&self.state);
            if state.stopped {
                // Its task is being aborted: the delivery stays unfinished.
                return;
            }
            finish(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Terminates one unfinished delivery as a dead letter.
    fn dead_lettered(&self) {
        self.finish(|state| {
            state.unfinished -= 1;
            state.counts.dead_lettered += 1;
            state.counts.failed += 1;
        });
    }

    /// What the listener leaves: its unfinished deliveries, and the entries
    /// for it between its position and `end` (or where it was abandoned);
    /// and whether it was abandoned before the shutdown.
    fn left(&self, log: &Log, end: usize) -> (u64, bool) {
        let state = lock(&self.state);
        let end = state.abandoned_at.unwrap_or(end);
        let entries = &lock(&log.state).entries;
        let unread = entries
            .get(state.next..end)
            .unwrap_or_default()
            .iter()
            .filter(|bytes| is_for(bytes, &self.interests))
            .count();
        (
            (unread + state.unfinished) as u64,
            state.abandoned_at.is_some(),
        )
    }

    /// Checks the source's accounting against the runner's, once its run
    /// ended by itself: the same counts, nothing left unfinished.
    fn check(&self, report: &RunReport) {
        let state = lock(&self.state);
        if state.stopped {
            return;
        }
        let counts = state.counts;
        assert_eq!(
            (report.handled, report.retried, report.dead_lettered),
            (counts.handled, counts.retried, counts.dead_lettered),
            "{}: the runner's report and the log's counts disagree",
            self.name
        );
        assert_eq!(
            (state.unfinished, state.retries.len()),
            (0, 0),
            "{}: the run ended with deliveries unfinished",
            self.name
        );
    }
}

/// One entry handed to one listener, for one attempt.
struct Entry {
    envelope: Arc<Envelope<ScenarioEvent>>,
    attempt: u32,
    reader: Arc<Reader>,
}

impl Delivery<ScenarioEvent> for Entry {
    fn envelope(&self) -> &Arc<Envelope<ScenarioEvent>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(self) {
        self.reader.finish(|state| {
            state.unfinished -= 1;
            state.counts.handled += 1;
        });
    }

    /// Taken back: it waits in the source's retry queue, still unfinished,
    /// and comes again no sooner than `delay`, one attempt later.
    async fn retry(self, delay: Duration, _error: &str) -> Retry<Self> {
        let now = Instant::now();
        let not_before = now
            .checked_add(delay)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        let Self {
            envelope,
            attempt,
            reader,
        } = self;
        reader.finish(|state| {
            state.counts.retried += 1;
            state.counts.failed += 1;
            state.retries.push(Retried {
                envelope,
                attempt: attempt + 1,
                not_before,
            });
        });
        Retry::Redelivered
    }

    async fn terminate(self, _reason: &str) {
        self.reader.dead_lettered();
    }

    /// Given back unattempted: queued behind the retries already waiting,
    /// at the same attempt, so it comes again after the event it followed.
    async fn release(self) {
        let Self {
            envelope,
            attempt,
            reader,
        } = self;
        reader.finish(|state| {
            let not_before = state
                .retries
                .iter()
                .map(|retried| retried.not_before)
                .max()
                .map_or_else(Instant::now, |last| last.max(Instant::now()));
            state.retries.push(Retried {
                envelope,
                attempt,
                not_before,
            });
        });
    }
}

// ---------------------------------------------------------------------------
// A listener's source

/// A listener's view of the log: from its position on, with its retries.
struct LogSource {
    log: Arc<Log>,
    reader: Arc<Reader>,
    /// Its id among the log's readers.
    id: u64,
    /// Wakes the source when its earliest retry is due.
    timer: Pin<Box<Sleep>>,
    ended: bool,
}

impl LogSource {
    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Entry, Undecodable>>> {
        for _ in 0..SKIPS_PER_POLL {
            // Under the reader's lock: a retry due, else room for a new
            // delivery. The waker is stored first, so that a delivery
            // finished after this look wakes the source.
            let (position, idle) = {
                let mut state = lock(&self.reader.state);
                if state.stopped {
                    // Its task is being aborted: it hands out nothing more.
                    return Poll::Pending;
                }
                match &mut state.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    Some(waker) => waker.clone_from(cx.waker()),
                    waker @ None => *waker = Some(cx.waker().clone()),
                }
                let earliest = state
                    .retries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, retried)| retried.not_before)
                    .map(|(index, retried)| (index, retried.not_before));
                if let Some((index, not_before)) = earliest {
                    let due = not_before <= Instant::now() || {
                        if self.timer.deadline() != not_before {
                            self.timer.as_mut().reset(not_before);
                        }
                        self.timer.as_mut().poll(cx).is_ready()
                    };
                    if due {
                        let Retried {
                            envelope, attempt, ..
                        } = state.retries.remove(index);
                        return Poll::Ready(Some(Ok(Entry {
                            envelope,
                            attempt,
                            reader: self.reader.clone(),
                        })));
                    }
                }
                let idle = state.unfinished == 0;
                let room = state.unfinished < self.reader.limit;
                (room.then_some(state.next), idle)
            };
            // No room: a finished delivery or a due retry wakes the source.
            let Some(position) = position else {
                return Poll::Pending;
            };
            let bytes = match self.log.read(self.id, position, cx.waker()) {
                Read::Entry(bytes) => bytes,
                Read::Wait => return Poll::Pending,
                // Closed and read to its end: the source ends once nothing
                // it handed out is unfinished, retries included. Until then
                // the last delivery to finish wakes it (its waker was stored
                // before `idle` was read).
                Read::End if idle => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Read::End => return Poll::Pending,
            };
            let next = match JsonCodec.decode::<ScenarioEvent>(&bytes) {
                Ok(envelope) if self.reader.interests.contains(envelope.kind()) => {
                    Some(Ok(Entry {
                        envelope: Arc::new(envelope),
                        attempt: 1,
                        reader: self.reader.clone(),
                    }))
                }
                Ok(_) => None,
                Err(error) if undecodable_is_for(&error, &self.reader.interests) => {
                    Some(Err(self.undecodable(&error, bytes)))
                }
                Err(_) => None,
            };
            let mut state = lock(&self.reader.state);
            if state.stopped {
                // Aborted while the entry was read: it stays unread.
                return Poll::Pending;
            }
            state.next = position + 1;
            if let Some(next) = next {
                state.unfinished += 1;
                state.counts.delivered += 1;
                return Poll::Ready(Some(next));
            }
        }
        // Read past many entries that were not for the listener: let other
        // tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The entry `bytes`, which did not decode with `error`, as the runner
    /// records it: terminating it finishes it as a dead letter.
    fn undecodable(&self, error: &DecodeError, bytes: Vec<u8>) -> Undecodable {
        let reader = self.reader.clone();
        let mut undecodable = Undecodable::new(error, bytes, move |_reason| async move {
            reader.dead_lettered();
        });
        if let Some(name) = error.name() {
            undecodable = undecodable.with_name(name);
        }
        if let Some(id) = error.id() {
            undecodable = undecodable.with_id(id);
        }
        undecodable
    }
}

impl Source<ScenarioEvent> for LogSource {
    type Delivery = Entry;

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Self::Delivery, Undecodable>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let next = self.next(cx);
        if next.is_ready() {
            coop.made_progress();
        }
        next
    }

    fn is_draining(&self) -> bool {
        *self.log.closing.borrow()
    }

    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.log.closing.subscribe();
        async move {
            // The sender lives as long as the log, which the source holds.
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Dead letters

/// The tier's dead letters, in the terms every tier has.
#[derive(Default)]
struct Letters(Mutex<Vec<Letter>>);

impl DeadLetterSink<ScenarioEvent> for Letters {
    async fn record(&self, letter: DeadLetter<ScenarioEvent>) {
        lock(&self.0).push(Letter {
            id: Some(letter.envelope.id()),
            listener: letter.listener.to_string(),
            error: letter.error,
            attempts: letter.attempts,
        });
    }

    async fn record_undecodable(&self, letter: UndecodableLetter) {
        lock(&self.0).push(Letter {
            id: letter.id,
            listener: letter.listener.to_string(),
            error: letter.error,
            attempts: letter.attempts,
        });
    }
}

// ---------------------------------------------------------------------------
// A running listener

/// A listener's task and what its source counts.
#[derive(Clone)]
struct LogHandle(Arc<HandleInner>);

struct HandleInner {
    reader: Arc<Reader>,
    log: Arc<Log>,
    task: AbortHandle,
    /// Completes once the task has ended (its future dropped), with the
    /// panic message if it panicked.
    ended: Shared<BoxFuture<'static, Option<Arc<str>>>>,
}

impl Running for LogHandle {
    fn counts(&self) -> Counts {
        lock(&self.0.reader.state).counts
    }

    /// Stops the source handing out deliveries and the deliveries being
    /// finished (one in the handler stays unfinished), then aborts the task.
    fn abort(&self) {
        let abandoned_at = self.0.log.open_len();
        {
            let mut state = lock(&self.0.reader.state);
            if !state.stopped {
                state.stopped = true;
                state.abandoned_at = abandoned_at;
            }
        }
        self.0.task.abort();
    }

    async fn finished(&self) {
        if let Some(panic) = self.0.ended.clone().await {
            panic!(
                "the task of listener {} panicked: {panic}",
                self.0.reader.name
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The tier

/// A log of its own per scenario, with its listeners and dead letters.
#[derive(Clone)]
struct LogTier(Arc<TierState>);

struct TierState {
    log: Arc<Log>,
    listeners: Mutex<Vec<LogHandle>>,
    letters: Arc<Letters>,
}

impl LogTier {
    /// Starts a listener named `name`, interested in `interests`, with at
    /// most `limit` unfinished deliveries, reading from the log's end:
    /// `run` runs it over its source.
    fn start<F>(
        &self,
        name: &str,
        interests: KindSet<ScenarioEventKind>,
        limit: usize,
        run: impl FnOnce(LogSource, Arc<Letters>) -> F,
    ) -> LogHandle
    where
        F: Future<Output = RunReport> + Send + 'static,
    {
        let log = self.0.log.clone();
        let (id, start) = log.open_reader();
        let reader = Arc::new(Reader {
            name: name.to_owned(),
            interests,
            limit: limit.max(1),
            state: Mutex::new(ReaderState {
                next: start,
                unfinished: 0,
                retries: Vec::new(),
                waker: None,
                counts: Counts::default(),
                stopped: false,
                abandoned_at: None,
            }),
        });
        let source = LogSource {
            log: log.clone(),
            reader: reader.clone(),
            id,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            ended: false,
        };
        let running = run(source, self.0.letters.clone());
        let task = tokio::spawn({
            let reader = reader.clone();
            async move {
                let report = running.await;
                reader.check(&report);
            }
        });
        let abort = task.abort_handle();
        let ended = task
            .map(|ended| match ended {
                Err(error) if error.is_panic() => {
                    let panic = error.into_panic();
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a non-string payload");
                    Some(Arc::from(message))
                }
                _ => None,
            })
            .boxed()
            .shared();
        let handle = LogHandle(Arc::new(HandleInner {
            reader,
            log,
            task: abort,
            ended,
        }));
        lock(&self.0.listeners).push(handle.clone());
        handle
    }
}

impl Publish<ScenarioEvent> for LogTier {
    fn publish(&self, event: ScenarioEvent) {
        let envelope = Envelope::new(event);
        self.0.log.append(|position| encode(envelope, position));
    }
}

impl Tier for LogTier {
    const NAME: &'static str = "log";

    const CAPABILITIES: Capabilities = Capabilities::none().decodes();

    type Handle = LogHandle;

    async fn fresh(_scenario: &'static str) -> Self {
        Self(Arc::new(TierState {
            log: Arc::new(Log::new()),
            listeners: Mutex::default(),
            letters: Arc::default(),
        }))
    }

    async fn spawn<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> Self::Handle {
        let limit = options.get_concurrency();
        let (name, interests) = (listener.name().to_owned(), listener.interests());
        self.start(&name, interests, limit, |source, letters| {
            runner::run::<_, OneByOne, _, _, _>(listener, source, letters, options)
        })
    }

    /// A batch listener's unit of concurrency is a batch: it may hold
    /// `concurrency` full batches unfinished.
    async fn spawn_batch<L: BatchListener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> Self::Handle {
        let limit = options.get_concurrency() * options.get_max_batch();
        let (name, interests) = (listener.name().to_owned(), listener.interests());
        self.start(&name, interests, limit, |source, letters| {
            runner::run::<_, InBatches, _, _, _>(listener, source, letters, options)
        })
    }

    async fn shutdown(&self, deadline: Duration) -> Stopped {
        let end = self.0.log.close();
        let listeners = lock(&self.0.listeners).clone();
        let all_ended = || join_all(listeners.iter().map(Running::finished));
        let in_time = tokio::time::timeout(deadline, all_ended()).await.is_ok();
        if !in_time {
            for listener in &listeners {
                listener.abort();
            }
            all_ended().await;
        }
        let mut stopped = Stopped::default();
        for listener in &listeners {
            let reader = &listener.0.reader;
            match reader.left(&self.0.log, end) {
                (left, true) => stopped.unattributed += left,
                (left, false) => {
                    *stopped.undelivered.entry(reader.name.clone()).or_default() += left;
                }
            }
        }
        stopped.drained = in_time && stopped.undelivered() == 0;
        stopped
    }

    async fn refused(&self) -> u64 {
        self.0.log.refused()
    }

    async fn dead_letters(&self) -> Vec<Letter> {
        lock(&self.0.letters.0).clone()
    }

    /// A reader of its own from the log's end, decoding each entry; what
    /// does not decode is no envelope, and the tap passes over it.
    async fn tap(&self) -> BoxStream<'static, Arc<Envelope<ScenarioEvent>>> {
        let log = self.0.log.clone();
        let (id, mut position) = log.open_reader();
        stream::poll_fn(move |cx| {
            loop {
                match log.read(id, position, cx.waker()) {
                    Read::Entry(bytes) => {
                        position += 1;
                        if let Ok(envelope) = JsonCodec.decode(&bytes) {
                            return Poll::Ready(Some(Arc::new(envelope)));
                        }
                    }
                    Read::Wait => return Poll::Pending,
                    Read::End => return Poll::Ready(None),
                }
            }
        })
        .boxed()
    }

    async fn publish_raw(&self, bytes: Vec<u8>) {
        self.0.log.append(|_| bytes);
    }
}

scenarios::scenarios!(LogTier);

/// What only the log tier's source has to get right: the drain at shutdown
/// waits for deliveries the runner still holds, and for retries the source
/// took back and has not handed out again.
mod log_tier {
    use std::collections::HashMap;
    use std::time::Duration;

    use event_bus::RetryPolicy;

    use super::LogTier;
    use super::scenarios::probes::Probe;
    use super::scenarios::{
        DEADLINE, EmitScenarioEvent, Running, Tier, roomy, settle, until, within,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_waiting_when_the_shutdown_begins_is_handled_before_the_source_ends() {
        let tier = LogTier::fresh("retry_across_shutdown").await;
        let probe = Probe::new("late-retry").failing(0, 1);
        // Long enough that the shutdown begins while the retry waits.
        let retry = RetryPolicy::exponential(2)
            .initial_backoff(Duration::from_millis(200))
            .jitter(false);
        // Room for event 1 beside the retry: the source reaches the log's
        // end while event 0 still waits to come back.
        let handle = tier
            .spawn(probe.clone(), roomy().concurrency(2).retry(retry))
            .await;
        tier.emit_user_created(0);
        tier.emit_user_created(1);
        until("event 0 to be taken back and event 1 handled", || {
            let counts = handle.counts();
            counts.retried == 1 && counts.handled == 1
        })
        .await;

        let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;
        assert!(stopped.drained, "{stopped:?}");
        assert_eq!(stopped.undelivered(), 0, "{stopped:?}");
        let mut calls: Vec<(u64, u32)> = probe
            .calls()
            .iter()
            .map(|call| (call.value, call.attempt))
            .collect();
        assert_eq!(calls.pop(), Some((0, 2)), "the retry came last");
        calls.sort_unstable();
        assert_eq!(calls, [(0, 1), (1, 1)]);
        let counts = handle.counts();
        assert_eq!(
            (counts.delivered, counts.handled, counts.retried),
            (2, 2, 1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_listener_drains_every_event_with_retries_in_flight() {
        const EVENTS: u64 = 400;
        let tier = LogTier::fresh("concurrent_drain").await;
        let probe = (0..EVENTS)
            .step_by(5)
            .fold(Probe::new("concurrent").yielding(2), |probe, value| {
                probe.failing(value, 1)
            });
        let retry = RetryPolicy::exponential(2).initial_backoff(Duration::from_millis(3));
        let handle = tier
            .spawn(probe.clone(), roomy().concurrency(4).retry(retry))
            .await;
        for value in 0..EVENTS {
            tier.emit_user_created(value);
        }
        // At once: most events are still in the log, some retries queued.
        settle(&tier, "a first retry", || handle.counts().retried > 0).await;
        let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;

        assert!(stopped.drained, "{stopped:?}");
        assert_eq!(stopped.undelivered(), 0, "{stopped:?}");
        let mut per_value: HashMap<u64, usize> = HashMap::new();
        for call in probe.handled() {
            *per_value.entry(call.value).or_default() += 1;
        }
        assert_eq!(per_value.len() as u64, EVENTS);
        assert!(per_value.values().all(|&times| times == 1), "{per_value:?}");
        let counts = handle.counts();
        assert_eq!(
            (
                counts.delivered,
                counts.handled,
                counts.retried,
                counts.dead_lettered
            ),
            (EVENTS, EVENTS, EVENTS / 5, 0),
            "{counts:?}"
        );
    }
}
