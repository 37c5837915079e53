//! The fan-out cases in a form whose cost is counted, not timed: on a
//! current-thread runtime, the emitter sends a chunk of events, then every
//! subscriber takes what is queued for it, with no task ever parked. Under
//! `valgrind --tool=callgrind` the instructions of a run do not move
//! between runs; a run of `n` events minus a run of none, divided by the
//! deliveries, is the cost per delivered event of the queue itself: what a
//! delivery costs once the wake-ups, which the timed cases add, are taken
//! away.

use std::hint::black_box;
use std::sync::Arc;

use event_bus::{EventBus, KindSet, LagPolicy};

use super::{BenchEvent, CAPACITY, FanOut, UserEventData, payload};

/// How many events are sent before the subscribers take them: within every
/// contender's capacity, so no send waits.
const CHUNK: u64 = 512;

/// Runs `contender` for `n` events to `subscribers`, in chunks; returns the
/// deliveries. The bus runs lossless (`Backpressure`); its drop-oldest
/// variant is not counted.
pub(crate) fn run(contender: FanOut, subscribers: usize, n: u64) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async move { deliveries(contender, subscribers, n) })
}

/// Sends `n` events with `send`, a chunk at a time, calling `take` after
/// each chunk; `take` answers how many it took.
fn in_chunks(n: u64, mut send: impl FnMut(UserEventData), mut take: impl FnMut() -> u64) -> u64 {
    let data = payload(1);
    let (mut sent, mut taken) = (0, 0);
    while sent < n {
        let chunk = CHUNK.min(n - sent);
        for _ in 0..chunk {
            send(data.clone());
        }
        taken += take();
        sent += chunk;
    }
    taken
}

fn deliveries(contender: FanOut, subscribers: usize, n: u64) -> u64 {
    match contender {
        FanOut::BusBackpressure | FanOut::BusDropOldest => {
            let bus = EventBus::<BenchEvent>::new();
            let mut subscriptions: Vec<_> = (0..subscribers)
                .map(|_| bus.subscribe_with(KindSet::all(), CAPACITY, LagPolicy::Backpressure))
                .collect();
            in_chunks(
                n,
                |data| bus.emit(BenchEvent::K00(data)),
                || {
                    take_all(&mut subscriptions, |subscription| {
                        subscription.try_recv().ok()
                    })
                },
            )
        }
        FanOut::Broadcast => {
            let (sender, _) = tokio::sync::broadcast::channel::<UserEventData>(CAPACITY);
            let mut receivers: Vec<_> = (0..subscribers).map(|_| sender.subscribe()).collect();
            in_chunks(
                n,
                |data| {
                    let _ = sender.send(data);
                },
                || take_all(&mut receivers, |receiver| receiver.try_recv().ok()),
            )
        }
        FanOut::BroadcastArc => {
            let (sender, _) = tokio::sync::broadcast::channel::<Arc<UserEventData>>(CAPACITY);
            let mut receivers: Vec<_> = (0..subscribers).map(|_| sender.subscribe()).collect();
            in_chunks(
                n,
                |data| {
                    let _ = sender.send(Arc::new(data));
                },
                || take_all(&mut receivers, |receiver| receiver.try_recv().ok()),
            )
        }
        FanOut::AsyncBroadcast => {
            let (sender, receiver) = async_broadcast::broadcast::<Arc<UserEventData>>(CAPACITY);
            let mut receivers: Vec<_> = (0..subscribers).map(|_| receiver.clone()).collect();
            drop(receiver);
            in_chunks(
                n,
                |data| {
                    sender.try_broadcast(Arc::new(data)).expect("room");
                },
                || take_all(&mut receivers, |receiver| receiver.try_recv().ok()),
            )
        }
        FanOut::Kanal => {
            let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..subscribers)
                .map(|_| kanal::bounded::<Arc<UserEventData>>(CAPACITY))
                .unzip();
            in_chunks(
                n,
                |data| {
                    let event = Arc::new(data);
                    for sender in &senders {
                        assert!(sender.try_send(event.clone()).expect("open"), "room");
                    }
                },
                || {
                    take_all(&mut receivers, |receiver| {
                        receiver.try_recv().ok().flatten()
                    })
                },
            )
        }
        FanOut::Mpsc => {
            let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..subscribers)
                .map(|_| tokio::sync::mpsc::channel::<Arc<UserEventData>>(CAPACITY))
                .unzip();
            in_chunks(
                n,
                |data| {
                    let event = Arc::new(data);
                    for sender in &senders {
                        sender.try_send(event.clone()).expect("room");
                    }
                },
                || take_all(&mut receivers, |receiver| receiver.try_recv().ok()),
            )
        }
    }
}

/// Takes from each of `receivers`, with `next`, all that is queued for it;
/// answers how many.
fn take_all<R, T>(receivers: &mut [R], mut next: impl FnMut(&mut R) -> Option<T>) -> u64 {
    let mut taken = 0;
    for receiver in receivers {
        while let Some(event) = next(receiver) {
            black_box(&event);
            taken += 1;
        }
    }
    taken
}
