//! with a subscriber that collects spans, the supervised path (a
//! different branch since 68db2d4) still finishes every delivery exactly
//! once, counts the same, and runs each handler call in its span.

mod scripted;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use event_bus::BatchFailure;
use scripted::matrix::{batches, one_by_one};
use scripted::{ENTERED, Mode};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Enables everything; tracks spans and the entered stack (one thread).
#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, &'static Metadata<'static>>>,
    follows: AtomicU64,
    events: AtomicU64,
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        self.spans.lock().unwrap().insert(id, span.metadata());
        Id::from_u64(id)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {
        self.follows.fetch_add(1, Ordering::SeqCst);
    }

    fn event(&self, _: &Event<'_>) {
        self.events.fetch_add(1, Ordering::SeqCst);
    }

    fn enter(&self, span: &Id) {
        let name = self.spans.lock().unwrap()[&span.into_u64()].name();
        ENTERED.with(|e| e.borrow_mut().push((span.into_u64(), name)));
    }

    fn exit(&self, span: &Id) {
        ENTERED.with(|e| {
            let mut stack = e.borrow_mut();
            if let Some(at) = stack.iter().rposition(|(s, _)| *s == span.into_u64()) {
                stack.remove(at);
            }
        });
    }
}

fn traced() -> tracing::subscriber::DefaultGuard {
    tracing::subscriber::set_default(Recorder::default())
}

fn all_in(spans: &[Option<&'static str>], name: &str) {
    assert!(!spans.is_empty());
    for span in spans {
        assert_eq!(*span, Some(name), "{spans:?}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn traced_exactly_once_one_by_one() {
    let _guard = traced();
    for mode in [Mode::InPlace, Mode::Redelivered] {
        for concurrency in [1, 3] {
            let spans = one_by_one(mode, concurrency).await;
            all_in(&spans, "event_bus.handle");
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn traced_exactly_once_batches() {
    let _guard = traced();
    for mode in [Mode::InPlace, Mode::Redelivered] {
        for concurrency in [1, 3] {
            for failure in [BatchFailure::Independent, BatchFailure::StopAtFirst] {
                let spans = batches(mode, concurrency, failure, 4).await;
                all_in(&spans, "event_bus.handle_batch");
            }
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn untraced_handlers_see_no_span() {
    let spans = one_by_one(Mode::InPlace, 1).await;
    assert!(spans.iter().all(Option::is_none));
}
