//! `quiesce` resolves exactly when every listener queue is empty and no
//! handler is running, following chains of listeners that emit.

mod support;

use std::sync::Arc;
use std::time::Duration;

use event_bus::{Envelope, EventBus, HandlerError, Listener, ListenerOptions, RetryPolicy};
use futures::FutureExt;
use support::{Gate, Gated, Recorder, TestEvent, TestKind, stuck_listener, within};

/// Turns every event of one kind into an event of the next kind.
struct Relay {
    from: TestKind,
    to: TestKind,
    bus: EventBus<TestEvent>,
}

impl Listener<TestEvent> for Relay {
    fn name(&self) -> &str {
        match self.from {
            TestKind::A => "a-to-b",
            _ => "b-to-c",
        }
    }

    fn interests(&self) -> event_bus::KindSet<TestKind> {
        self.from.into()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        tokio::task::yield_now().await;
        self.bus.emit(TestEvent::of(self.to, event.value()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_follows_a_chain_of_listeners_to_its_end() {
    for round in 0..20 {
        let bus = EventBus::new();
        let end = Recorder::new("end", TestKind::C);
        bus.spawn(end.clone());
        bus.spawn(Relay {
            from: TestKind::B,
            to: TestKind::C,
            bus: bus.clone(),
        });
        bus.spawn(Relay {
            from: TestKind::A,
            to: TestKind::B,
            bus: bus.clone(),
        });

        for i in 0..50 {
            bus.emit(TestEvent::A(i));
        }
        within("quiesce", bus.quiesce()).await;
        assert_eq!(end.events().len(), 50, "round {round}");
        // The relays hold handles; shut down to end them.
        bus.shutdown(support::DEADLINE).await;
    }
}

#[tokio::test]
async fn quiesce_waits_for_a_running_handler() {
    let bus = EventBus::new();
    let gate = Gate::closed();
    let listener = bus.spawn(Gated(gate.clone()));
    bus.emit(TestEvent::A(1));

    let mut quiesce = Box::pin(bus.quiesce());
    // Let the listener take the event and block in its handler.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(listener.metrics().in_flight, 1);
    assert!(
        (&mut quiesce).now_or_never().is_none(),
        "a handler is running"
    );

    gate.open();
    within("quiesce", quiesce).await;
    assert_eq!(listener.metrics().handled, 1);
}

#[tokio::test]
async fn quiesce_returns_at_once_without_listeners() {
    let bus = EventBus::new();
    let _subscription = bus.subscribe(TestKind::A);
    bus.emit(TestEvent::A(1)); // queued for a subscription, not a listener
    assert!(bus.quiesce().now_or_never().is_some());
}

#[tokio::test(start_paused = true)]
async fn quiesce_waits_out_retries() {
    struct Fails;
    impl Listener<TestEvent> for Fails {
        async fn handle(
            &self,
            _: Arc<Envelope<TestEvent>>,
            _: event_bus::Meta,
        ) -> Result<(), HandlerError> {
            Err("fails".into())
        }
    }

    let bus = EventBus::new();
    let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_secs(1));
    bus.spawn_with(Fails, ListenerOptions::new().retry(retry));
    bus.emit(TestEvent::A(1));
    within("quiesce", bus.quiesce()).await;
    assert_eq!(bus.dead_letters().len(), 1);
}

#[tokio::test]
async fn an_aborted_listener_does_not_hold_quiesce() {
    let bus = EventBus::new();
    let listener = stuck_listener(&bus, 5);
    listener.abort();
    within("aborted listener to end", listener.finished()).await;
    within("quiesce", bus.quiesce()).await;
    let metrics = listener.metrics();
    assert!(metrics.finished);
    assert_eq!(metrics.handled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_returns_while_events_reach_only_subscriptions() {
    const LISTENERS: usize = 200;
    const CALLS: usize = 200;
    let bus = EventBus::new();
    // Idle listeners make each scan long; none of them wants `D`.
    for _ in 0..LISTENERS {
        bus.spawn(Recorder::new("idle", TestKind::A));
    }
    let _subscription = bus.subscribe(TestKind::D);

    // Moves the bus sequence during the scans without handing any listener
    // work, so no listener will ever report itself idle again.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let emitter = std::thread::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        move || {
            let mut emitted = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && emitted < 50_000_000 {
                bus.emit(TestEvent::D(emitted));
                emitted += 1;
            }
        }
    });

    let mut stalled = None;
    for call in 0..CALLS {
        if tokio::time::timeout(Duration::from_secs(2), bus.quiesce())
            .await
            .is_err()
        {
            stalled = Some(call);
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    emitter.join().unwrap();
    assert_eq!(
        stalled, None,
        "quiesce call stalled for 2s with every listener idle"
    );
    bus.shutdown(support::DEADLINE).await;
}
