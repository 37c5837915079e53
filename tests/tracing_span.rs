//! Each handler call runs in a span that follows from the span current at
//! emit, so a request's trace reaches the listeners it set off.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use event_bus::{Batch, BatchError, BatchListener, Envelope, EventBus, HandlerError, Listener};
use support::{Fields, FieldsVisitor, TestEvent, within};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[derive(Default)]
struct Spans {
    /// Span id to its name and fields.
    spans: HashMap<u64, (String, Fields)>,
    /// (span, the span it follows from).
    follows: Vec<(u64, u64)>,
    /// Message of each event with the name of the span it was logged in.
    events: Vec<(String, Option<String>)>,
}

#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Spans>>);

impl<S> tracing_subscriber::Layer<S> for SpanRecorder
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Vec::new();
        attrs.record(&mut FieldsVisitor(&mut fields));
        let name = attrs.metadata().name().to_owned();
        self.0
            .lock()
            .unwrap()
            .spans
            .insert(id.into_u64(), (name, fields));
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, _: Context<'_, S>) {
        self.0
            .lock()
            .unwrap()
            .follows
            .push((span.into_u64(), follows.into_u64()));
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut FieldsVisitor(&mut fields));
        let message = fields
            .into_iter()
            .find(|(k, _)| k == "message")
            .map(|(_, v)| v)
            .unwrap_or_default();
        let span = ctx.event_span(event).map(|s| s.name().to_owned());
        self.0.lock().unwrap().events.push((message, span));
    }
}

struct Indexer;

impl Listener<TestEvent> for Indexer {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        tracing::info!("indexing");
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn handler_span_follows_from_the_span_current_at_emit() {
    let recorder = SpanRecorder::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));

    let bus = EventBus::new();
    bus.spawn(Indexer);
    let request = tracing::info_span!("request", path = "/posts");
    let request_id = request.id().unwrap().into_u64();
    request.in_scope(|| bus.emit(TestEvent::A(1)));
    within("quiesce", bus.quiesce()).await;

    let spans = recorder.0.lock().unwrap();
    let (handle_id, (_, fields)) = spans
        .spans
        .iter()
        .find(|(_, (name, _))| name == "event_bus.handle")
        .expect("a handler span");
    assert!(
        spans.follows.contains(&(*handle_id, request_id)),
        "handler span does not follow from the request: {:?}",
        spans.follows
    );
    for (field, value) in [("listener", "Indexer"), ("event", "test.a")] {
        assert!(
            fields.contains(&(field.to_owned(), value.to_owned())),
            "{field} not {value}: {fields:?}"
        );
    }
    assert!(fields.iter().any(|(k, _)| k == "event_id"));
    assert!(
        spans
            .events
            .contains(&("indexing".to_owned(), Some("event_bus.handle".to_owned()))),
        "the handler's log is not inside its span: {:?}",
        spans.events
    );
}

struct BatchIndexer;

impl BatchListener<TestEvent> for BatchIndexer {
    async fn handle_batch(&self, _: &Batch<TestEvent>) -> Result<(), BatchError> {
        tracing::info!("indexing a batch");
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_span_follows_from_the_span_of_every_emit_in_it() {
    let recorder = SpanRecorder::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(recorder.clone()));

    let bus = EventBus::new();
    bus.spawn(BatchIndexer);
    let requests: Vec<u64> = (0..2)
        .map(|n| {
            let request = tracing::info_span!("request", n);
            request.in_scope(|| bus.emit(TestEvent::A(n)));
            request.id().unwrap().into_u64()
        })
        .collect();
    within("quiesce", bus.quiesce()).await;

    let spans = recorder.0.lock().unwrap();
    let (batch_id, (_, fields)) = spans
        .spans
        .iter()
        .find(|(_, (name, _))| name == "event_bus.handle_batch")
        .expect("a batch span");
    for request in requests {
        assert!(
            spans.follows.contains(&(*batch_id, request)),
            "batch span does not follow from request {request}: {:?}",
            spans.follows
        );
    }
    for (field, value) in [("listener", "BatchIndexer"), ("events", "2")] {
        assert!(
            fields.contains(&(field.to_owned(), value.to_owned())),
            "{field} not {value}: {fields:?}"
        );
    }
    assert!(
        spans.events.contains(&(
            "indexing a batch".to_owned(),
            Some("event_bus.handle_batch".to_owned())
        )),
        "the handler's log is not inside its span: {:?}",
        spans.events
    );
}
