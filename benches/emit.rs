//! The cost of one emit, next to what it replaces: emitting an event nobody
//! wants against a `broadcast::Sender::send` with no receiver, and the
//! derive's emit helper against the hand-written `bus.emit(…)`.
//!
//! ```text
//! cargo bench --bench emit
//! ```

mod common;

use std::hint::black_box;

use common::{BenchEvent, BenchEventKind, EmitBenchEvent};
use criterion::{Criterion, criterion_group, criterion_main};
use event_bus::{EventBus, KindSet, LagPolicy};

fn no_interested_subscriber(c: &mut Criterion) {
    let mut group = c.benchmark_group("emit-nobody-interested");
    let data = common::payload(1);
    let bus = EventBus::<BenchEvent>::new();
    let _other_kind = bus.subscribe(BenchEventKind::K01);
    group.bench_function("bus", |b| {
        b.iter(|| bus.emit(BenchEvent::K00(data.clone())))
    });
    let (sender, _) = tokio::sync::broadcast::channel::<BenchEvent>(common::CAPACITY);
    group.bench_function("broadcast-send-no-receiver", |b| {
        b.iter(|| black_box(sender.send(BenchEvent::K00(data.clone()))).is_err())
    });
    group.finish();
}

fn derive_helper(c: &mut Criterion) {
    let mut group = c.benchmark_group("emit-one-subscriber");
    let data = common::payload(1);
    let bus = EventBus::<BenchEvent>::new();
    // Never read: the queue stays full and drops its oldest, at a steady cost.
    let _sink = bus.subscribe_with(KindSet::all(), common::CAPACITY, LagPolicy::DropOldest);
    group.bench_function("derive-helper", |b| b.iter(|| bus.emit_k00(data.clone())));
    group.bench_function("hand-written", |b| {
        b.iter(|| bus.emit(BenchEvent::K00(data.clone())))
    });
    group.finish();
}

criterion_group!(benches, no_interested_subscriber, derive_helper);
criterion_main!(benches);
