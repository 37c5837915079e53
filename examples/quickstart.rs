//! The shortest tour of `event-bus`: derive the events, emit them, two
//! listeners (one of them failing, and reading each event's id and attempt),
//! wait for the bus to settle, then shut down and read the report.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use event_bus::{
    DomainEvent, EventBus, HandlerError, ListenerOptions, Meta, RetryPolicy, listener,
};

// The application's events. The derive writes `AppEventKind`, the emit
// helpers (`bus.emit_user_created(…)`) and the handler trait
// (`AppEventHandler`, one `on_*` method per variant).
#[derive(Debug, DomainEvent)]
enum AppEvent {
    UserCreated { id: u64, email: String },
    PostPublished { id: u64, title: String },
}

/// Indexes published posts; never woken for anything else.
struct SearchIndexer;

#[listener]
impl AppEventHandler for SearchIndexer {
    async fn on_post_published(&self, id: &u64, title: &String) -> Result<(), HandlerError> {
        println!("search: indexed post {id} {title:?}");
        Ok(())
    }
}

/// Sends welcome mail, once per event however often it is delivered; the
/// mail server rejects one address.
#[derive(Default)]
struct Mailer {
    sent: Mutex<HashSet<uuid::Uuid>>,
}

#[listener]
impl AppEventHandler for Mailer {
    // A handler that declares `meta` as its last parameter gets the event's
    // id (the same on every attempt and every tier) and the attempt.
    async fn on_user_created(
        &self,
        id: &u64,
        email: &String,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        if self.sent.lock().unwrap().contains(&meta.id()) {
            return Ok(()); // a redelivery of a mail already sent
        }
        if email.ends_with(".invalid") {
            let attempt = meta.attempt();
            return Err(format!("mail server rejected {email} (attempt {attempt})").into());
        }
        println!("mailer: welcomed user {id} at {email}");
        self.sent.lock().unwrap().insert(meta.id());
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    // The bus logs retries, dead letters and lag through `tracing`.
    tracing_subscriber::fmt().with_target(false).init();

    let bus = EventBus::new();
    bus.spawn(SearchIndexer);
    // Retry twice, about 10ms then 20ms apart, before recording a dead letter.
    let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(10));
    bus.spawn_with(Mailer::default(), ListenerOptions::new().retry(retry));

    // Request handlers emit and move on: emitting never blocks and never fails.
    bus.emit_user_created(1, "ada@example.com".into());
    bus.emit_user_created(2, "bob@example.invalid".into());
    bus.emit_post_published(10, "Hello, events".into());

    // Wait until every listener is idle, retries included: no sleeps.
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
            "{}: delivered {}, handled {}, failed {}, dead-lettered {}",
            listener.name,
            listener.delivered,
            listener.handled,
            listener.failed,
            listener.dead_lettered
        );
    }

    let report = bus.shutdown(Duration::from_secs(5)).await;
    println!("shutdown: {report}");
}
