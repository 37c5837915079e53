//! A noise-free cost measure: runs one case of the in-memory bus on a
//! current-thread runtime, for instruction counts under callgrind, which
//! do not move between runs as wall-clock figures do on a shared machine.
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! B=$(ls target/release/deps/instructions-* | grep -v '\.d$')
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B listener 100000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null $B listener 0
//! ```
//!
//! The difference of the two totals ("Collected"), divided by the events,
//! is the cost per delivered event. Cases: `subscription` (emit, then
//! `try_recv`, in chunks of 512), `listener` (a supervised listener,
//! `quiesce` every 512), `unrouted` (an emit nobody receives), `helper`
//! (the derive's emit helper, received as in `subscription`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use event_bus::{DomainEvent, Envelope, EventBus, HandlerError, KindSet, Listener, Meta};

/// A payload without allocations of its own, so that the counts are the
/// bus's: 56 bytes, as the compare bench's user payload.
#[derive(Debug, Clone)]
struct Data {
    id: u64,
    _rest: [u64; 6],
}

#[derive(Debug, Clone, DomainEvent)]
enum Ev {
    /// What every case emits.
    Ping(Data),
    /// What nobody in the `unrouted` case emits.
    Other(Data),
}

struct Count(Arc<AtomicU64>);

impl Listener<Ev> for Count {
    async fn handle(&self, event: Arc<Envelope<Ev>>, _: Meta) -> Result<(), HandlerError> {
        if let Ev::Ping(data) = &**event {
            self.0.fetch_add(data.id & 1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn interests(&self) -> KindSet<EvKind> {
        EvKind::Ping.into()
    }
}

fn data(i: u64) -> Data {
    Data {
        id: i,
        _rest: [i; 6],
    }
}

const CHUNK: u64 = 512;

/// Emits `n` events with `emit`, `CHUNK` at a time, calling `drain` after
/// each chunk.
async fn in_chunks(n: u64, emit: impl Fn(u64), mut drain: impl AsyncFnMut()) {
    let mut i = 0;
    while i < n {
        let chunk = CHUNK.min(n - i);
        (i..i + chunk).for_each(&emit);
        drain().await;
        i += chunk;
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let (Some(case), Some(n)) = (args.next(), args.next().and_then(|n| n.parse().ok())) else {
        // `cargo bench` runs every bench target with no case: nothing to do.
        eprintln!("usage: instructions <subscription|listener|unrouted|helper> <events>");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let sum = runtime.block_on(run(&case, n));
    std::hint::black_box(sum);
}

async fn run(case: &str, n: u64) -> u64 {
    let bus = EventBus::<Ev>::new();
    let mut sum = 0;
    match case {
        "subscription" | "helper" => {
            let mut subscription = bus.subscribe(KindSet::all());
            let emit = |i| match case {
                "helper" => bus.emit_ping(data(i)),
                _ => bus.emit(Ev::Ping(data(i))),
            };
            in_chunks(n, emit, async || {
                while let Ok(event) = subscription.try_recv() {
                    if let Ev::Ping(data) = &**event {
                        sum += data.id;
                    }
                }
            })
            .await;
        }
        "listener" => {
            let count = Arc::new(AtomicU64::new(0));
            bus.spawn(Count(count.clone()));
            bus.quiesce().await;
            in_chunks(
                n,
                |i| bus.emit(Ev::Ping(data(i))),
                async || bus.quiesce().await,
            )
            .await;
            sum = count.load(Ordering::Relaxed);
        }
        "unrouted" => {
            let _other = bus.subscribe(EvKind::Other);
            (0..n).for_each(|i| bus.emit(Ev::Ping(data(i))));
        }
        other => eprintln!("no case {other:?}"),
    }
    sum
}
