//! Handlers see the event's id and the attempt: plain listeners through
//! `Listener::handle`'s `Meta`, derive handlers when their method declares
//! it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::{
    DomainEvent, Envelope, EventBus, HandlerError, Listener, ListenerOptions, Meta, Priority,
    RetryPolicy, listener,
};

#[derive(Debug, DomainEvent)]
enum Shop {
    OrderPaid {
        order: u64,
    },
    #[event(priority = "high")]
    OrderRefunded(u64),
    StockCounted,
}

/// An attempt as a handler saw it: the event's id, the attempt, the name.
type Seen = (uuid::Uuid, u32, &'static str);

/// Fails every event's first two attempts, recording what each attempt saw.
#[derive(Clone, Default)]
struct Flaky {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Flaky {
    fn saw(&self, meta: Meta) -> Result<(), HandlerError> {
        self.seen
            .lock()
            .unwrap()
            .push((meta.id(), meta.attempt(), meta.name()));
        if meta.attempt() < 3 {
            return Err("not yet".into());
        }
        Ok(())
    }
}

#[listener]
impl ShopHandler for Flaky {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        assert_eq!(*order, 7);
        self.saw(meta)
    }

    async fn on_order_refunded(&self, _: &u64, meta: event_bus::Meta) -> Result<(), HandlerError> {
        assert_eq!(meta.priority(), Priority::High);
        self.saw(meta)
    }

    // No `meta`: `#[listener]` passes it to the methods that declare it.
    async fn on_stock_counted(&self) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn retrying() -> ListenerOptions {
    ListenerOptions::new()
        .retry(RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(1)))
}

#[tokio::test(start_paused = true)]
async fn a_derive_handler_that_declares_meta_sees_the_id_and_every_attempt() {
    let bus = EventBus::new();
    let mut ids = event_bus::testing::EventRecorder::new(&bus);
    let flaky = Flaky::default();
    let handle = bus.spawn_with(flaky.clone(), retrying());
    bus.emit_order_paid(7);
    bus.emit_order_refunded(8);
    bus.emit_stock_counted();
    bus.quiesce().await;

    let emitted: Vec<uuid::Uuid> = ids.take().iter().map(|e| e.id()).collect();
    let seen = flaky.seen.lock().unwrap().clone();
    // The refund is high priority: handled first, three attempts each.
    assert_eq!(
        seen,
        [
            (emitted[1], 1, "order.refunded"),
            (emitted[1], 2, "order.refunded"),
            (emitted[1], 3, "order.refunded"),
            (emitted[0], 1, "order.paid"),
            (emitted[0], 2, "order.paid"),
            (emitted[0], 3, "order.paid"),
        ]
    );
    assert_eq!(handle.metrics().handled, 3);
}

/// Records each attempt's sequence, attempt and id.
struct Attempts(Arc<Mutex<Vec<(u64, u32, uuid::Uuid)>>>);

impl Listener<Shop> for Attempts {
    async fn handle(&self, event: Arc<Envelope<Shop>>, meta: Meta) -> Result<(), HandlerError> {
        assert_eq!(meta.sequence(), event.sequence());
        self.0
            .lock()
            .unwrap()
            .push((event.sequence(), meta.attempt(), meta.id()));
        match meta.attempt() {
            1 => panic!("first attempt"),
            2 => Err("second attempt".into()),
            _ => Ok(()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_listener_is_told_the_attempt_after_errors_and_panics_alike() {
    let bus = EventBus::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    bus.spawn_with(Attempts(seen.clone()), retrying());
    let mut ids = event_bus::testing::EventRecorder::new(&bus);
    bus.emit_stock_counted();
    bus.quiesce().await;
    let id = ids.take()[0].id();
    let seen = seen.lock().unwrap().clone();
    let attempts: Vec<(u32, uuid::Uuid)> = seen.iter().map(|&(_, a, id)| (a, id)).collect();
    assert_eq!(attempts, [(1, id), (2, id), (3, id)]);
}

/// A batch handler that declares `metas` sees each event's id, in the order
/// of its payloads, and the batch's attempt.
#[derive(Clone, Default)]
struct Batches {
    seen: Arc<Mutex<Vec<(u64, uuid::Uuid, u32)>>>,
}

#[listener]
impl ShopBatchHandler for Batches {
    async fn on_order_refunded(
        &self,
        orders: &[&u64],
        metas: &[Meta],
    ) -> Result<(), event_bus::BatchError> {
        assert_eq!(orders.len(), metas.len());
        let mut seen = self.seen.lock().unwrap();
        for (order, meta) in orders.iter().zip(metas) {
            seen.push((**order, meta.id(), meta.attempt()));
        }
        if metas[0].attempt() == 1 {
            return Err(event_bus::BatchError::all("try again"));
        }
        Ok(())
    }

    // No `metas`: `#[listener]` passes them to the methods that declare them.
    async fn on_stock_counted(&self, count: usize) -> Result<(), event_bus::BatchError> {
        assert!(count > 0);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_derive_batch_handler_that_declares_metas_sees_each_id_and_the_attempt() {
    let bus = EventBus::new();
    let mut ids = event_bus::testing::EventRecorder::new(&bus);
    let batches = Batches::default();
    bus.spawn_with(batches.clone(), retrying().max_batch(8));
    for order in 0..3 {
        bus.emit_order_refunded(order);
    }
    bus.emit_stock_counted();
    bus.quiesce().await;

    let emitted: Vec<uuid::Uuid> = ids.take().iter().map(|e| e.id()).collect();
    let seen = batches.seen.lock().unwrap().clone();
    let expected: Vec<(u64, uuid::Uuid, u32)> = (1..=2)
        .flat_map(|attempt| (0..3).map(move |order| (order, attempt)))
        .map(|(order, attempt)| (order, emitted[order as usize], attempt))
        .collect();
    assert_eq!(seen, expected);
}

/// Under `StopAtFirst`, the retried first event is on its second attempt
/// and the events after it, never attempted, on their first: each `Meta`
/// says its own event's attempt.
#[derive(Clone, Default)]
struct FailsTheFirstOnce {
    seen: Arc<Mutex<Vec<Call>>>,
}

/// One call of a batch handler: each order with its meta's attempt.
type Call = Vec<(u64, u32)>;

#[listener]
impl ShopBatchHandler for FailsTheFirstOnce {
    async fn on_order_refunded(
        &self,
        orders: &[&u64],
        metas: &[Meta],
    ) -> Result<(), event_bus::BatchError> {
        let call: Vec<(u64, u32)> = orders
            .iter()
            .zip(metas)
            .map(|(o, m)| (**o, m.attempt()))
            .collect();
        let first = self.seen.lock().unwrap().is_empty();
        self.seen.lock().unwrap().push(call);
        if first {
            return Err(event_bus::BatchError::event(0, "busy"));
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn each_meta_of_a_batch_has_its_own_events_attempt() {
    let bus = EventBus::new();
    let listener = FailsTheFirstOnce::default();
    let options = retrying()
        .max_batch(8)
        .batch_failure(event_bus::BatchFailure::StopAtFirst);
    bus.spawn_with(listener.clone(), options);
    for order in 1..=3 {
        bus.emit_order_refunded(order);
    }
    bus.quiesce().await;
    let seen = listener.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [vec![(1, 1), (2, 1), (3, 1)], vec![(1, 2), (2, 1), (3, 1)]]
    );
}
