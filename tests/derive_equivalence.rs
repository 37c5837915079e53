//! The derive's output next to the code it replaces: `manual` below is what
//! `#[derive(DomainEvent)]` writes for `Derived`, by hand. Both must agree on
//! kinds, names, routing and emit helpers.

mod support;

use std::sync::Mutex;

use event_bus::handler::Routes;
use event_bus::{DomainEvent, Envelope, Event, EventBus, EventKind, HandlerError, Meta};

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Derived {
    UserCreated(u64),
    #[event(name = "user.removed")]
    UserDeleted {
        id: u64,
        reason: String,
    },
    CacheFlushed,
}

/// What the derive generates for `Derived`, written out.
mod manual {
    use event_bus::handler::Routes;
    use event_bus::{Event, EventKind, HandlerError, Meta, Publish};
    use std::future::Future;

    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Manual {
        UserCreated(u64),
        UserDeleted { id: u64, reason: String },
        CacheFlushed,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub(crate) enum ManualKind {
        UserCreated,
        UserDeleted,
        CacheFlushed,
    }

    impl EventKind for ManualKind {
        const ALL: &'static [Self] = &[Self::UserCreated, Self::UserDeleted, Self::CacheFlushed];

        fn index(self) -> usize {
            match self {
                Self::UserCreated => 0,
                Self::UserDeleted => 1,
                Self::CacheFlushed => 2,
            }
        }

        fn name(self) -> &'static str {
            match self {
                Self::UserCreated => "user.created",
                Self::UserDeleted => "user.removed",
                Self::CacheFlushed => "cache.flushed",
            }
        }
    }

    impl Event for Manual {
        type Kind = ManualKind;

        fn kind(&self) -> ManualKind {
            match *self {
                Self::UserCreated(..) => ManualKind::UserCreated,
                Self::UserDeleted { .. } => ManualKind::UserDeleted,
                Self::CacheFlushed => ManualKind::CacheFlushed,
            }
        }
    }

    pub(crate) trait EmitManual: Publish<Manual> {
        // A primitive payload is taken as it is; other payloads as
        // `impl Into<Payload>`.
        fn emit_user_created(&self, data: u64) {
            self.publish(Manual::UserCreated(data))
        }

        fn emit_user_deleted(&self, id: u64, reason: String) {
            self.publish(Manual::UserDeleted { id, reason })
        }

        fn emit_cache_flushed(&self) {
            self.publish(Manual::CacheFlushed)
        }
        // …and an `emit_*_wait` twin of each, calling `publish_wait`.
    }

    impl<T: Publish<Manual> + ?Sized> EmitManual for T {}

    type Handled = Result<(), HandlerError>;

    pub(crate) trait ManualHandler: Send + Sync + 'static {
        fn on_user_created(&self, data: &u64, meta: Meta) -> impl Future<Output = Handled> + Send {
            let _ = (data, meta);
            async { Ok(()) }
        }

        fn on_user_deleted(
            &self,
            id: &u64,
            reason: &String,
            meta: Meta,
        ) -> impl Future<Output = Handled> + Send {
            let _ = (id, reason, meta);
            async { Ok(()) }
        }

        fn on_cache_flushed(&self, meta: Meta) -> impl Future<Output = Handled> + Send {
            let _ = meta;
            async { Ok(()) }
        }

        fn dispatch(&self, event: &Manual, meta: Meta) -> impl Future<Output = Handled> + Send {
            async move {
                match *event {
                    Manual::UserCreated(ref data) => self.on_user_created(data, meta).await,
                    Manual::UserDeleted { ref id, ref reason } => {
                        self.on_user_deleted(id, reason, meta).await
                    }
                    Manual::CacheFlushed => self.on_cache_flushed(meta).await,
                }
            }
        }
    }

    impl<H: ManualHandler + ?Sized> Routes<H> for Manual {
        fn kind_of(method: &str) -> Option<ManualKind> {
            match method {
                "on_user_created" => Some(ManualKind::UserCreated),
                "on_user_deleted" => Some(ManualKind::UserDeleted),
                "on_cache_flushed" => Some(ManualKind::CacheFlushed),
                _ => None,
            }
        }

        fn route<'a>(
            handler: &'a H,
            event: &'a Self,
            meta: Meta,
        ) -> impl Future<Output = Handled> + Send + 'a {
            handler.dispatch(event, meta)
        }
    }
}

use manual::{EmitManual, Manual, ManualHandler, ManualKind};

/// One handler for both: it records the calls each routing makes.
#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }

    fn push(&self, call: String) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(call);
        Ok(())
    }
}

impl DerivedHandler for Calls {
    async fn on_user_created(&self, data: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.push(format!("created {data} #{}", meta.attempt()))
    }

    async fn on_user_deleted(
        &self,
        id: &u64,
        reason: &String,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        self.push(format!("deleted {id} {reason} #{}", meta.attempt()))
    }

    async fn on_cache_flushed(&self, meta: Meta) -> Result<(), HandlerError> {
        self.push(format!("flushed #{}", meta.attempt()))
    }
}

impl ManualHandler for Calls {
    async fn on_user_created(&self, data: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.push(format!("created {data} #{}", meta.attempt()))
    }

    async fn on_user_deleted(
        &self,
        id: &u64,
        reason: &String,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        self.push(format!("deleted {id} {reason} #{}", meta.attempt()))
    }

    async fn on_cache_flushed(&self, meta: Meta) -> Result<(), HandlerError> {
        self.push(format!("flushed #{}", meta.attempt()))
    }
}

#[test]
fn same_kinds_names_and_indices() {
    let kinds = |all: &[(&'static str, usize)]| all.to_vec();
    assert_eq!(
        kinds(
            &DerivedKind::ALL
                .iter()
                .map(|k| (k.name(), k.index()))
                .collect::<Vec<_>>()
        ),
        kinds(
            &ManualKind::ALL
                .iter()
                .map(|k| (k.name(), k.index()))
                .collect::<Vec<_>>()
        ),
    );
    let pairs = [
        (
            Derived::UserCreated(1).name(),
            Manual::UserCreated(1).name(),
        ),
        (
            Derived::UserDeleted {
                id: 1,
                reason: String::new(),
            }
            .name(),
            Manual::UserDeleted {
                id: 1,
                reason: String::new(),
            }
            .name(),
        ),
        (Derived::CacheFlushed.name(), Manual::CacheFlushed.name()),
    ];
    for (derived, manual) in pairs {
        assert_eq!(derived, manual);
    }
}

#[tokio::test]
async fn same_routing() {
    let calls = Calls::default();
    let derived = [
        Derived::UserCreated(1),
        Derived::UserDeleted {
            id: 2,
            reason: "spam".into(),
        },
        Derived::CacheFlushed,
    ];
    let manual = [
        Manual::UserCreated(1),
        Manual::UserDeleted {
            id: 2,
            reason: "spam".into(),
        },
        Manual::CacheFlushed,
    ];
    let meta = Meta::new(&Envelope::new(Derived::CacheFlushed), 3);
    for event in &derived {
        <Derived as Routes<Calls>>::route(&calls, event, meta)
            .await
            .unwrap();
    }
    let through_derive = calls.take();
    for event in &manual {
        <Manual as Routes<Calls>>::route(&calls, event, meta)
            .await
            .unwrap();
    }
    assert_eq!(through_derive, calls.take());
    assert_eq!(
        through_derive,
        ["created 1 #3", "deleted 2 spam #3", "flushed #3"]
    );

    for method in [
        "on_user_created",
        "on_user_deleted",
        "on_cache_flushed",
        "on_other",
    ] {
        assert_eq!(
            <Derived as Routes<Calls>>::kind_of(method).map(|k| k.name()),
            <Manual as Routes<Calls>>::kind_of(method).map(|k| k.name()),
        );
    }
}

#[test]
fn same_emit_helpers() {
    let derived = EventBus::<Derived>::new();
    let manual = EventBus::<Manual>::new();
    let mut derived_events = event_bus::testing::EventRecorder::new(&derived);
    let mut manual_events = event_bus::testing::EventRecorder::new(&manual);

    derived.emit_user_created(1);
    derived.emit_user_deleted(2, "spam".into());
    derived.emit_cache_flushed();
    manual.emit_user_created(1);
    manual.emit_user_deleted(2, "spam".into());
    manual.emit_cache_flushed();

    assert_eq!(derived_events.names(), manual_events.names());
}
