//! The memory tier's dead letters: the bus's store, and the handles that
//! read it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;

use crate::dead_letter::{DeadLetter, DeadLetterSink, UndecodableLetter};
use crate::sync::{Mutex, lock};
use crate::throttle::Throttle;

/// The bus's dead letters: read them, take them, or subscribe to new ones.
///
/// The bus keeps the most recent dead letters up to the capacity set with
/// [`Builder::dead_letter_capacity`](crate::Builder::dead_letter_capacity)
/// (10,000 by default); an older one evicted to make room is counted in
/// [`BusMetrics::dead_letters_evicted`](crate::BusMetrics). A
/// [subscription](DeadLetters::subscribe) sees every dead letter recorded
/// after it was made, with no bound, so an application that must keep them
/// all (in its database, say) subscribes at start.
///
/// # Examples
///
/// ```
/// # use event_bus::{EventBus, Event, EventKind, Listener, HandlerError, Envelope};
/// # use std::sync::Arc;
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum Kind { Ping }
/// # impl EventKind for Kind {
/// #     const ALL: &'static [Self] = &[Kind::Ping];
/// #     fn index(self) -> usize { 0 }
/// #     fn name(self) -> &'static str { "ping" }
/// # }
/// # #[derive(Debug)]
/// # struct Ping;
/// # impl Event for Ping { type Kind = Kind; fn kind(&self) -> Kind { Kind::Ping } }
/// struct Broken;
///
/// impl Listener<Ping> for Broken {
///     async fn handle(&self, _: Arc<Envelope<Ping>>, _: event_bus::Meta) -> Result<(), HandlerError> {
///         Err("database unavailable".into())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::new();
/// let mut dead = bus.dead_letters().subscribe();
/// bus.spawn(Broken);
/// bus.emit(Ping);
///
/// let letter = dead.recv().await.unwrap();
/// assert_eq!(letter.error, "database unavailable");
/// assert_eq!(letter.attempts, 1);
/// assert_eq!(bus.dead_letters().len(), 1);
/// # }
/// ```
pub struct DeadLetters<E> {
    store: Arc<Store<E>>,
}

impl<E> DeadLetters<E> {
    pub(crate) fn new(store: Arc<Store<E>>) -> Self {
        Self { store }
    }

    /// The dead letters kept, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<DeadLetter<E>>> {
        lock(&self.store.inner).letters.iter().cloned().collect()
    }

    /// Removes and returns the dead letters kept, oldest first.
    pub fn take(&self) -> Vec<Arc<DeadLetter<E>>> {
        lock(&self.store.inner).letters.drain(..).collect()
    }

    /// The number of dead letters kept.
    pub fn len(&self) -> usize {
        lock(&self.store.inner).letters.len()
    }

    /// Whether no dead letter is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stream of every dead letter recorded from now on.
    ///
    /// It ends once the bus has shut down (or every handle was dropped) and
    /// every listener has finished, so no more dead letters can come.
    pub fn subscribe(&self) -> DeadLetterSubscription<E> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut inner = lock(&self.store.inner);
        if !inner.closed {
            // Subscriptions dropped since the last dead letter leave now, so
            // that subscribing and dropping in a loop cannot grow the list.
            inner
                .subscribers
                .retain(|subscriber| !subscriber.is_closed());
            inner.subscribers.push(sender);
        }
        DeadLetterSubscription { receiver }
    }
}

impl<E> Clone for DeadLetters<E> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
        }
    }
}

impl<E> fmt::Debug for DeadLetters<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// New dead letters, as they are recorded. See [`DeadLetters::subscribe`].
///
/// Also a [`Stream`] of `Arc<DeadLetter<E>>`.
pub struct DeadLetterSubscription<E> {
    receiver: mpsc::UnboundedReceiver<Arc<DeadLetter<E>>>,
}

impl<E> DeadLetterSubscription<E> {
    /// The next dead letter, or `None` once no more can come.
    pub async fn recv(&mut self) -> Option<Arc<DeadLetter<E>>> {
        self.receiver.recv().await
    }
}

impl<E> Stream for DeadLetterSubscription<E> {
    type Item = Arc<DeadLetter<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

impl<E> fmt::Debug for DeadLetterSubscription<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterSubscription")
            .finish_non_exhaustive()
    }
}

pub(crate) struct Store<E> {
    capacity: usize,
    inner: Mutex<StoreInner<E>>,
    /// Rate-limits the eviction warning.
    evictions: Throttle,
}

struct StoreInner<E> {
    letters: VecDeque<Arc<DeadLetter<E>>>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<DeadLetter<E>>>>,
    evicted: u64,
    closed: bool,
}

impl<E> Store<E> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            evictions: Throttle::new(),
            inner: Mutex::new(StoreInner {
                letters: VecDeque::new(),
                subscribers: Vec::new(),
                evicted: 0,
                closed: false,
            }),
        }
    }

    pub(crate) fn store(&self, letter: DeadLetter<E>) {
        let letter = Arc::new(letter);
        let evicted = {
            let mut inner = lock(&self.inner);
            inner
                .subscribers
                .retain(|subscriber| subscriber.send(letter.clone()).is_ok());
            if self.capacity == 0 {
                inner.evicted += 1;
                // Keeping none is the setting, not a condition to warn of.
                return;
            }
            let evicted = inner.letters.len() >= self.capacity;
            if evicted {
                // Dropped after the lock: a dead letter's drop drops its
                // event, which is the application's code.
                let oldest = inner.letters.pop_front();
                inner.evicted += 1;
                inner.letters.push_back(letter);
                oldest
            } else {
                inner.letters.push_back(letter);
                None
            }
        };
        if let Some(oldest) = evicted {
            drop(oldest);
            // Logged after the lock, and at most once a second.
            if let Some(since) = self.evictions.admit(1) {
                tracing::warn!(
                    capacity = self.capacity,
                    evicted = since.total,
                    "dead-letter store full; evicted the oldest dead letters"
                );
            }
        }
    }

    pub(crate) fn evicted(&self) -> u64 {
        lock(&self.inner).evicted
    }

    /// Ends every subscription: no more dead letters can be recorded.
    pub(crate) fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        inner.subscribers.clear();
    }
}

/// The memory tier's sink: the bus's store.
impl<E: Send + Sync + 'static> DeadLetterSink<E> for Store<E> {
    fn record(&self, letter: DeadLetter<E>) -> impl Future<Output = ()> + Send {
        self.store(letter);
        std::future::ready(())
    }

    /// The memory tier never decodes, so this is never called on the bus's
    /// own store; should it be, the letter is logged at error level, whole.
    fn record_undecodable(&self, letter: UndecodableLetter) -> impl Future<Output = ()> + Send {
        tracing::error!(
            listener = %letter.listener,
            event = letter.name.as_deref().unwrap_or("?"),
            event_id = ?letter.id,
            error = %letter.error,
            payload = %String::from_utf8_lossy(&letter.payload),
            "an event did not decode; dropped it as a dead letter",
        );
        std::future::ready(())
    }
}
