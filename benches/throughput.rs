//! Throughput, the bus side by side with the channels users would pick
//! instead, on the same payload and capacity, in the same run:
//! fan-out to 1, 4 and 16 subscribers; selective delivery to 16 listeners
//! of one kind each; the supervised listener runtime against a bare receive
//! loop.
//!
//! ```text
//! cargo bench --bench throughput
//! ```
//!
//! `cargo bench --bench compare` runs the same scenarios and prints the
//! ratios, with the events each contender dropped.

mod common;

use std::time::Duration;

use common::FanOut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const EVENTS: u64 = 100_000;

/// Runs `scenario` once per iteration and adds up the time each run took.
fn timed(
    runtime: &tokio::runtime::Runtime,
    iterations: u64,
    scenario: impl Fn() -> common::Run,
) -> Duration {
    let _enter = runtime.enter();
    (0..iterations).map(|_| scenario().elapsed).sum()
}

fn fan_out(c: &mut Criterion) {
    let runtime = common::runtime();
    let mut group = c.benchmark_group("fan-out");
    group.sample_size(10);
    for subscribers in [1_usize, 4, 16] {
        group.throughput(Throughput::Elements(EVENTS * subscribers as u64));
        for contender in FanOut::ALL {
            group.bench_with_input(
                BenchmarkId::new(contender.id(), subscribers),
                &subscribers,
                |b, &n| {
                    b.iter_custom(|iterations| {
                        timed(&runtime, iterations, || {
                            runtime.block_on(common::fan_out(contender, n, EVENTS))
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

fn selective(c: &mut Criterion) {
    let runtime = common::runtime();
    let mut group = c.benchmark_group("selective-16-of-16");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS));
    for (id, bus) in [("bus", true), ("broadcast-filter-on-receive", false)] {
        group.bench_function(id, |b| {
            b.iter_custom(|iterations| {
                timed(&runtime, iterations, || {
                    runtime.block_on(common::selective(bus, EVENTS))
                })
            })
        });
    }
    group.finish();
}

fn listener_runtime(c: &mut Criterion) {
    let runtime = common::runtime();
    let mut group = c.benchmark_group("listener-runtime");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS));
    for (id, supervised) in [("supervised", true), ("bare-receive-loop", false)] {
        group.bench_function(id, |b| {
            b.iter_custom(|iterations| {
                timed(&runtime, iterations, || {
                    runtime.block_on(common::runtime_overhead(supervised, EVENTS))
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out, selective, listener_runtime);
criterion_main!(benches);
