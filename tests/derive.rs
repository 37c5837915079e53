//! `#[derive(DomainEvent)]` and `#[listener]`, used as a user's crate would.

mod support;

use std::sync::{Arc, Mutex};

use event_bus::handler::Routes;
use event_bus::{DomainEvent, Event, EventBus, EventKind, HandlerError, KindSet, listener};
use support::within;

#[derive(Debug, Clone, PartialEq)]
struct User {
    id: i64,
    username: String,
    password_hash: String,
}

/// What listeners need of a user: no password hash.
#[derive(Debug, Clone, PartialEq)]
struct UserEventData {
    id: i64,
    username: String,
}

impl From<&User> for UserEventData {
    fn from(user: &User) -> Self {
        Self {
            id: user.id,
            username: user.username.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AppEvent {
    UserCreated(UserEventData),
    #[event(name = "user.removed")]
    UserDeleted {
        id: i64,
        reason: String,
    },
    PostPublished {
        id: i64,
    },
    CacheFlushed,
    #[event(skip_emit)]
    HTTPRequestSent(u16),
}

#[test]
fn kinds_names_and_indices_follow_the_variants() {
    let names: Vec<&str> = AppEventKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "user.created",
            "user.removed",
            "post.published",
            "cache.flushed",
            "http.request.sent"
        ]
    );
    for (i, kind) in AppEventKind::ALL.iter().enumerate() {
        assert_eq!(kind.index(), i);
        assert_eq!(AppEventKind::from_name(kind.name()), Some(*kind));
    }
    let event = AppEvent::UserDeleted {
        id: 1,
        reason: "spam".into(),
    };
    assert_eq!(event.kind(), AppEventKind::UserDeleted);
    assert_eq!(event.name(), "user.removed");
    assert_eq!(AppEvent::CacheFlushed.kind(), AppEventKind::CacheFlushed);
}

/// The application's state: the emit helpers work on it once it exposes its
/// bus.
struct AppState {
    events: EventBus<AppEvent>,
}

impl AsRef<EventBus<AppEvent>> for AppState {
    fn as_ref(&self) -> &EventBus<AppEvent> {
        &self.events
    }
}

#[tokio::test]
async fn emit_helpers_work_on_the_bus_and_on_the_state() {
    let bus = EventBus::new();
    let mut recorder = event_bus::testing::EventRecorder::new(&bus);
    let state = Arc::new(AppState {
        events: bus.clone(),
    });
    let user = User {
        id: 7,
        username: "ada".into(),
        password_hash: "x".into(),
    };

    state.emit_user_created(&user); // through `From<&User> for UserEventData`
    state.emit_user_deleted(7, "spam".into());
    bus.emit_post_published(3);
    bus.emit_cache_flushed();
    state.emit_cache_flushed_wait().await;
    bus.emit_user_created_wait(UserEventData {
        id: 8,
        username: "bob".into(),
    })
    .await;

    let events: Vec<AppEvent> = recorder
        .events()
        .iter()
        .map(|e| e.event().clone())
        .collect();
    assert_eq!(
        events,
        [
            AppEvent::UserCreated(UserEventData {
                id: 7,
                username: "ada".into()
            }),
            AppEvent::UserDeleted {
                id: 7,
                reason: "spam".into()
            },
            AppEvent::PostPublished { id: 3 },
            AppEvent::CacheFlushed,
            AppEvent::CacheFlushed,
            AppEvent::UserCreated(UserEventData {
                id: 8,
                username: "bob".into()
            }),
        ]
    );
}

/// Records which handler method ran with what.
#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    fn push(&self, call: String) {
        self.0.lock().unwrap().push(call);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

#[derive(Default)]
struct Everything(Calls);

#[listener]
impl AppEventHandler for Everything {
    async fn on_user_created(&self, data: &UserEventData) -> Result<(), HandlerError> {
        self.0.push(format!("created {}", data.username));
        Ok(())
    }

    async fn on_user_deleted(&self, id: &i64, reason: &String) -> Result<(), HandlerError> {
        self.0.push(format!("deleted {id} for {reason}"));
        Ok(())
    }

    async fn on_post_published(&self, id: &i64) -> Result<(), HandlerError> {
        self.0.push(format!("published {id}"));
        Ok(())
    }

    async fn on_cache_flushed(&self) -> Result<(), HandlerError> {
        self.0.push("flushed".into());
        Ok(())
    }

    async fn on_http_request_sent(&self, status: &u16) -> Result<(), HandlerError> {
        self.0.push(format!("http {status}"));
        Ok(())
    }
}

fn one_of_each() -> Vec<AppEvent> {
    vec![
        AppEvent::UserCreated(UserEventData {
            id: 1,
            username: "ada".into(),
        }),
        AppEvent::UserDeleted {
            id: 1,
            reason: "spam".into(),
        },
        AppEvent::PostPublished { id: 2 },
        AppEvent::CacheFlushed,
        AppEvent::HTTPRequestSent(204),
    ]
}

#[tokio::test]
async fn the_handler_trait_routes_every_variant_to_its_method() {
    let handler = Everything::default();
    for event in one_of_each() {
        let envelope = event_bus::Envelope::new(event);
        let meta = event_bus::Meta::new(&envelope, 1);
        handler.dispatch(&envelope, meta).await.unwrap();
    }
    assert_eq!(
        handler.0.take(),
        [
            "created ada",
            "deleted 1 for spam",
            "published 2",
            "flushed",
            "http 204"
        ]
    );
}

/// Implements three of five methods: a cache that cares about users and
/// posts only.
#[derive(Clone, Default)]
struct Cache(Arc<Calls>);

#[listener(name = "cache")]
impl AppEventHandler for Cache {
    async fn on_user_created(&self, data: &UserEventData) -> Result<(), HandlerError> {
        self.0.push(format!("user {}", data.id));
        Ok(())
    }

    async fn on_user_deleted(&self, id: &i64, _: &String) -> Result<(), HandlerError> {
        self.0.push(format!("user {id}"));
        Ok(())
    }

    async fn on_post_published(&self, id: &i64) -> Result<(), HandlerError> {
        if *id < 0 {
            return Err("negative post id".into());
        }
        self.0.push(format!("post {id}"));
        Ok(())
    }
}

#[tokio::test]
async fn a_listener_is_interested_in_exactly_the_methods_it_implements() {
    assert_eq!(
        event_bus::Listener::<AppEvent>::interests(&Cache::default()),
        KindSet::from([
            AppEventKind::UserCreated,
            AppEventKind::UserDeleted,
            AppEventKind::PostPublished
        ])
    );

    let bus = EventBus::new();
    let cache = Cache::default();
    let handle = bus.spawn(cache.clone());
    assert_eq!(handle.name(), "cache");
    for event in one_of_each() {
        bus.emit(event);
    }
    bus.emit_post_published(-1);
    within("quiesce", bus.quiesce()).await;

    assert_eq!(cache.0.take(), ["user 1", "user 1", "post 2"]);
    let metrics = handle.metrics();
    // Never queued, never woken, for the two kinds it does not handle.
    assert_eq!(metrics.delivered, 4);
    assert_eq!((metrics.handled, metrics.dead_lettered), (3, 1));
    assert_eq!(bus.dead_letters().take()[0].error, "negative post id");
}

#[test]
fn routes_maps_method_names_to_kinds() {
    assert_eq!(
        <AppEvent as Routes<Cache>>::kind_of("on_http_request_sent"),
        Some(AppEventKind::HTTPRequestSent)
    );
    assert_eq!(<AppEvent as Routes<Cache>>::kind_of("on_nothing"), None);
}

/// A struct variant with many fields: its helpers take them all, and the
/// generated code passes clippy's argument-count lint.
#[derive(Debug, PartialEq, DomainEvent)]
enum Audit {
    Logged {
        actor: u32,
        action: String,
        target: u32,
        before: Option<String>,
        after: Option<String>,
        ip: [u8; 4],
        at: u64,
        request: u128,
    },
}

#[test]
fn struct_variants_of_many_fields_keep_their_order() {
    let bus = EventBus::new();
    let mut recorder = event_bus::testing::EventRecorder::new(&bus);
    bus.emit_logged(
        1,
        "rename".into(),
        2,
        Some("a".into()),
        Some("b".into()),
        [127, 0, 0, 1],
        3,
        4,
    );
    assert_eq!(
        recorder.events()[0].event(),
        &Audit::Logged {
            actor: 1,
            action: "rename".into(),
            target: 2,
            before: Some("a".into()),
            after: Some("b".into()),
            ip: [127, 0, 0, 1],
            at: 3,
            request: 4,
        }
    );
}

/// Variants that share a prefix, which clippy's `enum_variant_names` flags:
/// the user's `allow` reaches the kind enum the derive writes beside it (the
/// workspace's `cargo clippy --all-targets -- -D warnings` fails otherwise).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, DomainEvent)]
enum ItemEvent {
    ItemCreated(u64),
    ItemUpdated(u64),
    ItemDeleted(u64),
}

#[test]
fn lint_levels_on_the_enum_reach_its_kind_enum() {
    let bus = EventBus::<ItemEvent>::new();
    let mut recorder = event_bus::testing::EventRecorder::new(&bus);
    bus.emit_item_created(1);
    bus.emit_item_updated(1);
    bus.emit_item_deleted(1);
    recorder.assert_kinds(&[
        ItemEventKind::ItemCreated,
        ItemEventKind::ItemUpdated,
        ItemEventKind::ItemDeleted,
    ]);
}
