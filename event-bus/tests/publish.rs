//! The derive's emit helpers work on anything that publishes: the bus, an
//! application state that exposes one, and a user's own `Publish` type, here
//! an outbox transaction that buffers its events until commit.
#![cfg(feature = "derive")]

use std::sync::{Arc, Mutex};

use event_bus::{DomainEvent, EventBus, KindSet, LagPolicy, Publish};
use futures::FutureExt;

#[derive(Debug, Clone, PartialEq)]
struct UserEventData {
    id: u64,
}

struct User {
    id: u64,
    password_hash: String,
}

impl From<&User> for UserEventData {
    fn from(user: &User) -> Self {
        Self { id: user.id }
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AppEvent {
    UserCreated(UserEventData),
    UserDeleted { id: u64, reason: String },
    CacheFlushed,
}

/// Like an outbox transaction: events wait in a buffer until `commit`.
#[derive(Default)]
struct Outbox {
    pending: Mutex<Vec<AppEvent>>,
}

impl Publish<AppEvent> for Outbox {
    fn publish(&self, event: AppEvent) {
        self.pending.lock().unwrap().push(event);
    }
}

impl Outbox {
    fn commit(self, bus: &EventBus<AppEvent>) {
        for event in self.pending.into_inner().unwrap() {
            bus.emit(event);
        }
    }
}

struct AppState {
    events: EventBus<AppEvent>,
}

impl AsRef<EventBus<AppEvent>> for AppState {
    fn as_ref(&self) -> &EventBus<AppEvent> {
        &self.events
    }
}

/// A request handler written once for every publisher.
fn register(events: &impl Publish<AppEvent>, user: &User) {
    events.emit_user_created(user);
}

fn ada() -> User {
    User {
        id: 1,
        password_hash: "…".into(),
    }
}

#[test]
fn helpers_on_a_user_publisher_buffer_every_shape() {
    let tx = Outbox::default();
    let user = ada();
    assert!(!user.password_hash.is_empty());
    tx.emit_user_created(&user);
    tx.emit_user_deleted(1, "spam".into());
    tx.emit_cache_flushed();
    register(&tx, &user);
    assert_eq!(
        *tx.pending.lock().unwrap(),
        [
            AppEvent::UserCreated(UserEventData { id: 1 }),
            AppEvent::UserDeleted {
                id: 1,
                reason: "spam".into()
            },
            AppEvent::CacheFlushed,
            AppEvent::UserCreated(UserEventData { id: 1 }),
        ]
    );
}

#[tokio::test]
async fn an_outbox_publishes_nothing_before_commit() {
    let bus = EventBus::new();
    let mut all = bus.subscribe(KindSet::all());
    let tx = Outbox::default();
    tx.emit_user_created(&ada());
    // The default `publish_wait` has nothing to wait for.
    tx.emit_cache_flushed_wait()
        .now_or_never()
        .expect("a buffering publisher's wait is ready at once");
    assert!(all.is_empty());

    tx.commit(&bus);
    assert_eq!(
        **all.recv().await.unwrap(),
        AppEvent::UserCreated(UserEventData { id: 1 })
    );
    assert_eq!(**all.recv().await.unwrap(), AppEvent::CacheFlushed);
}

#[tokio::test]
async fn helpers_on_the_bus_and_an_app_state_emit_at_once() {
    let state = Arc::new(AppState {
        events: EventBus::new(),
    });
    let mut all = state.events.subscribe(KindSet::all());

    state.events.emit_cache_flushed(); // the bus
    state.emit_user_deleted(2, "gone".into()); // the state, through the `Arc`
    register(&*state, &ada()); // generic code, given the state
    register(&state.events, &ada()); // and given the bus

    let mut names = Vec::new();
    while let Ok(envelope) = all.try_recv() {
        names.push(envelope.name());
    }
    assert_eq!(
        names,
        [
            "cache.flushed",
            "user.deleted",
            "user.created",
            "user.created"
        ]
    );
    assert_eq!(state.events.metrics().emitted, 4);
}

#[test]
fn whatever_exposes_a_bus_publishes_in_generic_code() {
    fn publishes<P: Publish<AppEvent> + ?Sized>(publisher: &P) {
        publisher.emit_cache_flushed();
    }
    let bus = EventBus::new();
    let state = AppState {
        events: bus.clone(),
    };
    publishes(&bus);
    publishes(&&bus);
    publishes(&Arc::new(bus.clone()));
    publishes(&Box::new(bus.clone()));
    publishes(&state);
    publishes(&&state);
    publishes(&Outbox::default());
    assert_eq!(bus.metrics().emitted, 6);
}

#[tokio::test]
async fn wait_helpers_on_a_bus_wait_for_backpressure_room() {
    let state = AppState {
        events: EventBus::new(),
    };
    let mut full =
        state
            .events
            .subscribe_with(AppEventKind::CacheFlushed, 1, LagPolicy::Backpressure);
    state.emit_cache_flushed();

    let mut waiting = Box::pin(state.emit_cache_flushed_wait());
    assert!(
        (&mut waiting).now_or_never().is_none(),
        "the queue is full: `emit_wait` waits"
    );
    full.recv().await.unwrap();
    waiting.await;
    full.recv().await.unwrap();
    assert_eq!(full.dropped() + full.overflowed(), 0);
}
