//! The shortest tour of `event-bus`: emit events, two listeners (one of them
//! failing), wait for the bus to settle, then shut down and read the report.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    Envelope, Event, EventBus, EventKind, HandlerError, KindSet, Listener, ListenerOptions,
    RetryPolicy,
};

// The application's events. `#[derive(DomainEvent)]` writes the `EventKind`
// and `Event` impls below.
#[derive(Debug)]
enum AppEvent {
    UserCreated { id: u64, email: String },
    PostPublished { id: u64, title: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AppEventKind {
    UserCreated,
    PostPublished,
}

impl EventKind for AppEventKind {
    const ALL: &'static [Self] = &[Self::UserCreated, Self::PostPublished];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::UserCreated => "user.created",
            Self::PostPublished => "post.published",
        }
    }
}

impl Event for AppEvent {
    type Kind = AppEventKind;

    fn kind(&self) -> AppEventKind {
        match self {
            Self::UserCreated { .. } => AppEventKind::UserCreated,
            Self::PostPublished { .. } => AppEventKind::PostPublished,
        }
    }
}

/// Indexes published posts; never woken for anything else.
struct SearchIndexer;

impl Listener<AppEvent> for SearchIndexer {
    fn interests(&self) -> KindSet<AppEventKind> {
        KindSet::from(AppEventKind::PostPublished)
    }

    async fn handle(&self, event: Arc<Envelope<AppEvent>>) -> Result<(), HandlerError> {
        if let AppEvent::PostPublished { id, title } = event.event() {
            println!("search: indexed post {id} {title:?}");
        }
        Ok(())
    }
}

/// Sends welcome mail; the mail server rejects one address.
struct Mailer;

impl Listener<AppEvent> for Mailer {
    fn interests(&self) -> KindSet<AppEventKind> {
        KindSet::from(AppEventKind::UserCreated)
    }

    async fn handle(&self, event: Arc<Envelope<AppEvent>>) -> Result<(), HandlerError> {
        let AppEvent::UserCreated { id, email } = event.event() else {
            return Ok(());
        };
        if email.ends_with(".invalid") {
            return Err(format!("mail server rejected {email}").into());
        }
        println!("mailer: welcomed user {id} at {email}");
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    // The bus logs retries, dead letters and lag through `tracing`.
    tracing_subscriber::fmt().with_target(false).init();

    let bus = EventBus::new();
    bus.spawn(SearchIndexer);
    // Retry twice, 10ms then 20ms apart, before recording a dead letter.
    let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(10));
    bus.spawn_with(Mailer, ListenerOptions::new().retry(retry));

    // Request handlers emit and move on: `emit` never blocks and never fails.
    bus.emit(AppEvent::UserCreated {
        id: 1,
        email: "ada@example.com".into(),
    });
    bus.emit(AppEvent::UserCreated {
        id: 2,
        email: "bob@example.invalid".into(),
    });
    bus.emit(AppEvent::PostPublished {
        id: 10,
        title: "Hello, events".into(),
    });

    // Wait until every listener is idle: retries included, no sleeps.
    bus.quiesce().await;

    for letter in bus.dead_letters().snapshot() {
        println!(
            "dead letter: {} #{} failed in {} after {} attempts: {}",
            letter.envelope.name(),
            letter.envelope.sequence(),
            letter.listener,
            letter.attempts,
            letter.error
        );
    }
    for listener in bus.metrics().listeners {
        println!(
            "{}: handled {}, failed {}, dead-lettered {}",
            listener.name, listener.handled, listener.failed, listener.dead_lettered
        );
    }

    let report = bus.shutdown(Duration::from_secs(5)).await;
    println!("shutdown: {report}");
}
