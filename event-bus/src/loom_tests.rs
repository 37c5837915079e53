//! Loom models of the bus's hand-written protocols, run on the real code
//! with loom's atomics, mutexes and a model of tokio's `Notify` (see
//! `sync.rs`):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p event-bus --lib --release loom_
//! ```
//!
//! - the room-waiter protocol of backpressure queues: `emit_wait` counts
//!   itself as a waiter, then checks for room under the emit lock; the
//!   consumer frees a place, then reads the waiters' count; a reservation
//!   given back does the same. No interleaving may leave a waiter asleep
//!   while the lane has room.
//! - the quiesce handshake: `quiesce` arms its wake-up, scans the listeners
//!   and checks that no emit reached a listener meanwhile; a listener that
//!   finishes an event wakes it. It must return once listeners are idle,
//!   follow a chain of listeners to its end, and never wait on emits that
//!   reach only subscriptions.

use std::sync::Arc;

use loom::future::block_on;
use loom::thread;

use crate::LagPolicy;
use crate::event::{Event, EventKind, KindSet};
use crate::listener::RetryPolicy;
use crate::memory::listeners::ListenerState;
use crate::memory::queue::QueueConfig;
use crate::memory::shared::Shared;
use crate::memory::source::{MemoryDelivery, MemorySource};
use crate::runner::{Delivery, Source};
use crate::{EventBus, Subscription};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    A,
    B,
    C,
}

impl EventKind for Kind {
    const ALL: &'static [Self] = &[Kind::A, Kind::B, Kind::C];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        ["a", "b", "c"][self as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ev(Kind, u32);

impl Event for Ev {
    type Kind = Kind;

    fn kind(&self) -> Kind {
        self.0
    }
}

/// Receives the next event, parked until the queue wakes the thread.
fn recv(subscription: &mut Subscription<Ev>) -> Ev {
    match block_on(subscription.recv()) {
        Ok(envelope) => **envelope,
        Err(error) => panic!("unexpected {error:?}"),
    }
}

/// Receives from two subscriptions as events come, yielding while both are
/// empty, until `a` holds `a_len` events and `b` holds `b_len`.
fn recv_both(
    a: &mut Subscription<Ev>,
    from_a: &mut Vec<Ev>,
    a_len: usize,
    b: &mut Subscription<Ev>,
    from_b: &mut Vec<Ev>,
    b_len: usize,
) {
    while from_a.len() < a_len || from_b.len() < b_len {
        let mut idle = true;
        for (subscription, into) in [(&mut *a, &mut *from_a), (&mut *b, &mut *from_b)] {
            if let Ok(envelope) = subscription.try_recv() {
                into.push(**envelope);
                idle = false;
            }
        }
        if idle {
            thread::yield_now();
        }
    }
}

#[test]
fn loom_emit_wait_is_woken_when_the_consumer_frees_a_place() {
    loom::model(|| {
        let bus = EventBus::<Ev>::new();
        let mut subscription = bus.subscribe_with(Kind::A, 1, LagPolicy::Backpressure);
        bus.emit(Ev(Kind::A, 0));
        let emitter = {
            let bus = bus.clone();
            thread::spawn(move || block_on(bus.emit_wait(Ev(Kind::A, 1))))
        };
        assert_eq!(recv(&mut subscription), Ev(Kind::A, 0));
        assert_eq!(recv(&mut subscription), Ev(Kind::A, 1));
        emitter.join().unwrap();
        assert_eq!(subscription.overflowed(), 0);
    });
}

#[test]
fn loom_a_place_reserved_by_another_waiter_is_not_counted_as_the_consumers() {
    loom::model(|| {
        // `both` wants A and B; `full` wants A only and is full. An
        // `emit_wait(A)` reserves `both`'s place and waits for `full`; an
        // `emit_wait(B)` waits for `both`. Once `full` frees a place, both
        // must complete.
        let bus = EventBus::<Ev>::new();
        let mut both = bus.subscribe_with([Kind::A, Kind::B], 1, LagPolicy::Backpressure);
        let mut full = bus.subscribe_with(Kind::A, 1, LagPolicy::Backpressure);
        bus.emit(Ev(Kind::A, 0));
        assert_eq!(recv(&mut both), Ev(Kind::A, 0));
        let a = {
            let bus = bus.clone();
            thread::spawn(move || block_on(bus.emit_wait(Ev(Kind::A, 1))))
        };
        let b = {
            let bus = bus.clone();
            thread::spawn(move || block_on(bus.emit_wait(Ev(Kind::B, 2))))
        };
        // Which of the two emits gets `both`'s place first is up to the
        // schedule: read both queues as events come.
        let (mut from_both, mut from_full) = (Vec::new(), Vec::new());
        recv_both(&mut both, &mut from_both, 2, &mut full, &mut from_full, 2);
        from_both.sort_by_key(|ev| ev.1);
        assert_eq!(from_both, [Ev(Kind::A, 1), Ev(Kind::B, 2)]);
        assert_eq!(from_full, [Ev(Kind::A, 0), Ev(Kind::A, 1)]);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(both.overflowed() + full.overflowed(), 0);
    });
}

#[test]
fn loom_emit_wait_is_woken_at_the_watermark_of_what_the_consumer_holds() {
    loom::model(|| {
        // `both` (capacity 4) wants A and B and holds three events; `full`
        // (capacity 1) wants A and is full. `emit_wait(A)` reserves `both`'s
        // last place and waits for `full`, which stays full; `emit_wait(B)`
        // waits for `both`. Once the consumer of `both` has handed out one
        // event, two places are free to it (the reservation is another
        // emitter's, not the consumer's to free), so `emit_wait(B)` must
        // complete while `full` stays full.
        let bus = EventBus::<Ev>::new();
        let mut both = bus.subscribe_with([Kind::A, Kind::B], 4, LagPolicy::Backpressure);
        let mut full = bus.subscribe_with(Kind::A, 1, LagPolicy::Backpressure);
        bus.emit(Ev(Kind::A, 0));
        bus.emit(Ev(Kind::B, 1));
        bus.emit(Ev(Kind::B, 2));
        let a = {
            let bus = bus.clone();
            thread::spawn(move || block_on(bus.emit_wait(Ev(Kind::A, 3))))
        };
        let b = {
            let bus = bus.clone();
            thread::spawn(move || block_on(bus.emit_wait(Ev(Kind::B, 4))))
        };
        assert_eq!(recv(&mut both), Ev(Kind::A, 0));
        b.join().unwrap();
        let (mut from_both, mut from_full) = (vec![Ev(Kind::A, 0)], Vec::new());
        recv_both(&mut both, &mut from_both, 5, &mut full, &mut from_full, 2);
        a.join().unwrap();
        from_both.sort_by_key(|ev| ev.1);
        assert_eq!(
            from_both,
            [
                Ev(Kind::A, 0),
                Ev(Kind::B, 1),
                Ev(Kind::B, 2),
                Ev(Kind::A, 3),
                Ev(Kind::B, 4)
            ]
        );
        assert_eq!(from_full, [Ev(Kind::A, 0), Ev(Kind::A, 3)]);
        assert_eq!(both.overflowed() + full.overflowed(), 0);
    });
}

/// A listener of `kinds`, driven by hand on a loom thread: the runtime's
/// queue, source and deliveries, without a tokio task.
struct ModelListener {
    source: MemorySource<Ev>,
    taken: Option<MemoryDelivery<Ev>>,
}

impl ModelListener {
    fn spawn(shared: &Arc<Shared<Ev>>, name: &str, kinds: impl Into<KindSet<Kind>>) -> Self {
        let config = QueueConfig {
            capacity: 4,
            policy: LagPolicy::DropOldest,
            fairness: 4,
        };
        let queue = shared.make_queue(Some(name.into()), kinds.into(), config);
        let state = Arc::new(ListenerState::new(queue.clone(), RetryPolicy::none()));
        shared.runtime.add(&state);
        shared.route(&queue);
        Self {
            source: MemorySource::new(shared.clone(), queue),
            taken: None,
        }
    }

    /// Takes the next event as the runner does (in flight until finished).
    fn take(&mut self) -> Ev {
        let Some(Ok(delivery)) = block_on(std::future::poll_fn(|cx| self.source.poll_next(cx)))
        else {
            panic!("the source has ended");
        };
        let event = ***delivery.envelope();
        self.taken = Some(delivery);
        event
    }

    /// Finishes the event taken, as the runner does after the handler.
    fn finish(&mut self) {
        block_on(self.taken.take().expect("an event was taken").ack());
    }
}

#[test]
fn loom_quiesce_follows_a_chain_of_listeners_to_its_end() {
    loom::model(|| {
        let bus = EventBus::<Ev>::new();
        let shared = bus.shared().clone();
        let mut first = ModelListener::spawn(&shared, "first", Kind::A);
        let mut second = ModelListener::spawn(&shared, "second", Kind::C);
        let done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        bus.emit(Ev(Kind::A, 0));
        let chain = {
            let bus = bus.clone();
            thread::spawn(move || {
                assert_eq!(first.take(), Ev(Kind::A, 0));
                // The handler emits a follow-up before it finishes.
                bus.emit(Ev(Kind::C, 1));
                first.finish();
            })
        };
        let end = {
            let done = done.clone();
            thread::spawn(move || {
                assert_eq!(second.take(), Ev(Kind::C, 1));
                done.store(true, loom::sync::atomic::Ordering::SeqCst);
                second.finish();
            })
        };
        block_on(shared.quiesce());
        assert!(
            done.load(loom::sync::atomic::Ordering::SeqCst),
            "quiesce returned before the chain's last event was handled"
        );
        chain.join().unwrap();
        end.join().unwrap();
    });
}

#[test]
fn loom_quiesce_does_not_wait_on_emits_that_reach_only_subscriptions() {
    loom::model(|| {
        let bus = EventBus::<Ev>::new();
        let shared = bus.shared().clone();
        let _idle = ModelListener::spawn(&shared, "idle", Kind::A);
        let subscription = bus.subscribe(Kind::B);
        let emitter = {
            let bus = bus.clone();
            thread::spawn(move || {
                bus.emit(Ev(Kind::B, 0));
                bus.emit(Ev(Kind::B, 1));
            })
        };
        // Must return whatever the emits do meanwhile: loom reports a
        // deadlock if it waits for a wake-up nobody sends.
        block_on(shared.quiesce());
        emitter.join().unwrap();
        drop(subscription);
    });
}
