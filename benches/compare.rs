//! The headline comparisons in one run, printed as a markdown table of
//! ratios (bus / best peer) with the absolute numbers beside them.
//!
//! ```text
//! cargo bench --bench compare -- --quick    # about a minute
//! cargo bench --bench compare               # ten times the events
//! cargo bench --bench compare -- --instructions   # only the counts
//! ```
//!
//! After the timed table it prints instructions per delivered event, counted
//! by `valgrind --tool=callgrind` on the bench's own binary (`--count`, one
//! case on a current-thread runtime, see `common::count`): a run of the
//! events minus a run of none, the same every run (`--no-instructions`
//! leaves them out).

mod common;

/// The example CMS, for the search listener's case.
#[cfg(feature = "search")]
#[path = "../examples/cms/app/mod.rs"]
#[allow(dead_code)]
mod app;
#[cfg(feature = "search")]
mod cms_index;

use std::hint::black_box;
use std::time::Instant;

use common::{BenchEvent, BenchEventKind, EmitBenchEvent, FanOut, Run};
use event_bus::{EventBus, KindSet, LagPolicy};

#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// How many times each case runs; the median is reported.
const REPEATS: usize = 3;

struct Row {
    case: String,
    bus: String,
    peer: String,
    ratio: f64,
    target: &'static str,
    met: bool,
    /// CPU time per delivered event, bus and peer, where the case runs
    /// tasks.
    cpu: Option<(f64, f64)>,
}

impl Row {
    fn with_cpu(mut self, bus: &Run, peer: &Run) -> Self {
        self.cpu = Some((bus.cpu_per_event(), peer.cpu_per_event()));
        self
    }
}

/// Lossless fan-out to `subscribers` from `emitters` emitting tasks: the
/// bus (backpressure) against the fastest lossless peer.
fn fan_out_row(
    runtime: &tokio::runtime::Runtime,
    subscribers: usize,
    emitters: usize,
    events: u64,
) -> Row {
    let runs: Vec<(FanOut, Run)> = FanOut::ALL
        .iter()
        .map(|&c| {
            let run = median_run(|| {
                runtime.block_on(common::fan_out_from(c, subscribers, events, emitters))
            });
            (c, run)
        })
        .collect();
    let from = if emitters == 1 {
        String::new()
    } else {
        format!(", {emitters} emitters")
    };
    let label = format!("N={subscribers}{from}");
    for (contender, run) in &runs {
        eprintln!(
            "fan-out {label:<17} {:<24} {:>7.2} M delivered/s, {:>6.0} ns CPU/event, {} dropped",
            contender.name(),
            run.per_second() / 1e6,
            run.cpu_per_event(),
            run.dropped
        );
    }
    let bus = runs
        .iter()
        .find(|(c, _)| *c == FanOut::BusBackpressure)
        .unwrap()
        .1;
    let (peer, best) = runs
        .iter()
        .filter(|(c, run)| !c.is_bus() && run.dropped == 0)
        .max_by(|a, b| a.1.per_second().total_cmp(&b.1.per_second()))
        .unwrap();
    let lossy = runs
        .iter()
        .find(|(c, _)| *c == FanOut::BusDropOldest)
        .unwrap()
        .1;
    eprintln!(
        "  (bus drop-oldest, unthrottled: {:.1} M/s delivered, {} dropped: not lossless)",
        lossy.per_second() / 1e6,
        lossy.dropped
    );
    let ratio = bus.per_second() / best.per_second();
    Row {
        case: format!("lossless fan-out, N = {subscribers}{from}"),
        bus: format!("{:.1} M/s", bus.per_second() / 1e6),
        peer: format!("{:.1} M/s ({})", best.per_second() / 1e6, peer.name()),
        ratio,
        target: "≥ 1.0",
        met: ratio >= 1.0,
        cpu: None,
    }
    .with_cpu(&bus, best)
}

fn main() {
    // A child under callgrind: one counted case, then out.
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--count") {
        let (Some(contender), Some(subscribers), Some(n)) = (
            args.get(at + 1).and_then(|id| FanOut::from_id(id)),
            args.get(at + 2).and_then(|n| n.parse().ok()),
            args.get(at + 3).and_then(|n| n.parse().ok()),
        ) else {
            panic!("usage: compare --count <contender> <subscribers> <events>");
        };
        black_box(common::count::run(contender, subscribers, n));
        return;
    }
    let quick = std::env::args().any(|arg| arg == "--quick");
    if std::env::args().any(|arg| arg == "--instructions") {
        instructions(if quick { 20_000 } else { 100_000 });
        return;
    }
    let events: u64 = if quick { 200_000 } else { 2_000_000 };
    let ops: u64 = if quick { 2_000_000 } else { 20_000_000 };
    let runtime = common::runtime();
    let mut rows = Vec::new();

    for subscribers in [1, 4, 16] {
        rows.push(fan_out_row(&runtime, subscribers, 1, events));
    }
    // Several emitting tasks: the bus serialises them (its order is one
    // for every subscriber), the peers' senders race.
    for emitters in [2, 4] {
        rows.push(fan_out_row(&runtime, 4, emitters, events));
    }

    let selective_bus = median_run(|| runtime.block_on(common::selective(true, events)));
    let selective_peer = median_run(|| runtime.block_on(common::selective(false, events)));
    let ratio = selective_bus.per_second() / selective_peer.per_second();
    rows.push(
        Row {
            case: "selective, 16 listeners × 1 of 16 kinds".into(),
            bus: format!("{:.1} M/s", selective_bus.per_second() / 1e6),
            peer: format!(
                "{:.1} M/s (broadcast, filter on receive)",
                selective_peer.per_second() / 1e6
            ),
            ratio,
            target: "≥ 4.0",
            met: ratio >= 4.0,
            cpu: None,
        }
        .with_cpu(&selective_bus, &selective_peer),
    );

    // Emitting with nobody interested, against a raw send with no receiver.
    let data = common::payload(1);
    let bus = EventBus::<BenchEvent>::new();
    let _other_kind = bus.subscribe(BenchEventKind::K01);
    let bus_ns = median_ns(ops, || bus.emit(BenchEvent::K00(data.clone())));
    let (sender, _) = tokio::sync::broadcast::channel::<BenchEvent>(common::CAPACITY);
    let peer_ns = median_ns(ops, || {
        let _ = black_box(sender.send(BenchEvent::K00(data.clone())));
    });
    let ratio = bus_ns / peer_ns;
    rows.push(Row {
        case: "emit, no interested subscriber (time)".into(),
        bus: format!("{bus_ns:.1} ns"),
        peer: format!("{peer_ns:.1} ns (broadcast send, no receiver)"),
        ratio,
        target: "≤ 1.5",
        met: ratio <= 1.5,
        cpu: None,
    });

    // The derive's helper against the hand-written emit it stands for, on a
    // bus with one interested (never read, drop-oldest) subscriber.
    let bus = EventBus::<BenchEvent>::new();
    let _sink = bus.subscribe_with(KindSet::all(), common::CAPACITY, LagPolicy::DropOldest);
    let helper_ns = median_ns(ops / 4, || bus.emit_k00(data.clone()));
    let manual_ns = median_ns(ops / 4, || bus.emit(BenchEvent::K00(data.clone())));
    let ratio = helper_ns / manual_ns;
    rows.push(Row {
        case: "derive emit helper vs hand-written (time)".into(),
        bus: format!("{helper_ns:.1} ns"),
        peer: format!("{manual_ns:.1} ns (bus.emit(BenchEvent::K00(…)))"),
        ratio,
        target: "≤ 1.05",
        met: ratio <= 1.05,
        cpu: None,
    });
    drop(bus);

    let supervised = median_run(|| runtime.block_on(common::runtime_overhead(true, events)));
    let bare = median_run(|| runtime.block_on(common::runtime_overhead(false, events)));
    let ratio = supervised.per_second() / bare.per_second();
    rows.push(
        Row {
            case: "supervised listener vs bare receive loop".into(),
            bus: format!("{:.1} M/s", supervised.per_second() / 1e6),
            peer: format!(
                "{:.1} M/s (recv loop, same handler)",
                bare.per_second() / 1e6
            ),
            ratio,
            target: "≥ 0.8",
            met: ratio >= 0.8,
            cpu: None,
        }
        .with_cpu(&supervised, &bare),
    );

    // Low-load latency is mostly how fast a parked worker thread wakes,
    // which swings between runs by ten times; rounds that alternate the two
    // contenders give both the same swings.
    let rounds = if quick { 10 } else { 40 };
    let (mut bus_latency, mut mpsc_latency) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        bus_latency.extend(runtime.block_on(common::latencies(true, 500)));
        mpsc_latency.extend(runtime.block_on(common::latencies(false, 500)));
    }
    bus_latency.sort();
    mpsc_latency.sort();
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let bus = common::quantile(&bus_latency, q);
        let peer = common::quantile(&mpsc_latency, q);
        rows.push(Row {
            case: format!("emit → handler start, {name}, low load (time)"),
            bus: format!("{:.1} µs", bus.as_secs_f64() * 1e6),
            peer: format!("{:.1} µs (tokio mpsc recv loop)", peer.as_secs_f64() * 1e6),
            ratio: bus.as_secs_f64() / peer.as_secs_f64(),
            target: "—",
            met: true,
            cpu: None,
        });
    }

    for subscribers in [1, 16] {
        let bus = bus_bytes_per_event(subscribers);
        let peer = broadcast_bytes_per_event(subscribers);
        rows.push(Row {
            case: format!("memory per queued event, N = {subscribers}"),
            bus: format!("{bus:.0} B"),
            peer: format!("{peer:.0} B (broadcast<Arc<T>>)"),
            ratio: bus / peer,
            target: "—",
            met: true,
            cpu: None,
        });
    }

    #[cfg(feature = "search")]
    rows.push(search_indexing(
        &runtime,
        if quick { 1_000 } else { 10_000 },
    ));

    println!(
        "\n{} events per throughput case, median of {REPEATS}; {} cores\n",
        events,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| case | bus | best peer | bus / peer | target | met | CPU per delivered event, bus / peer |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        let cpu = row.cpu.map_or_else(
            || "—".to_owned(),
            |(bus, peer)| format!("{bus:.0} / {peer:.0} ns ({:.2})", bus / peer),
        );
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {} |",
            row.case,
            row.bus,
            row.peer,
            row.ratio,
            row.target,
            if row.met { "yes" } else { "**no**" },
            cpu
        );
    }
    if std::env::args().any(|arg| arg == "--no-instructions") {
        return;
    }
    instructions(if quick { 20_000 } else { 100_000 });
}

/// Instructions per delivered event of each lossless contender's queue,
/// counted by callgrind on a current-thread runtime (`common::count`): the
/// same binary and inputs count the same every run. Skipped, with a line
/// saying so, where valgrind is not installed.
fn instructions(events: u64) {
    let exe = std::env::current_exe().expect("the bench's own binary");
    let count = |contender: FanOut, subscribers: usize, n: u64| -> Option<u64> {
        let output = std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["--count", contender.id()])
            .arg(subscribers.to_string())
            .arg(n.to_string())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .find_map(|line| line.split("Collected :").nth(1))
            .and_then(|count| count.trim().parse().ok())
    };
    let per_event = |contender: FanOut, subscribers: usize| -> Option<f64> {
        let all = count(contender, subscribers, events)?;
        let none = count(contender, subscribers, 0)?;
        Some(all.saturating_sub(none) as f64 / (events * subscribers as u64) as f64)
    };
    if per_event(FanOut::BusBackpressure, 1).is_none() {
        println!("\n(instruction counts skipped: valgrind did not run)");
        return;
    }
    println!(
        "\nInstructions per delivered event (callgrind, current-thread runtime, \
         {events} events sent 512 at a time, each subscriber then taking its own):\n"
    );
    println!("| case | bus | best peer | bus / peer | target | met |");
    println!("|---|---|---|---|---|---|");
    for subscribers in [1, 4, 16] {
        let bus = per_event(FanOut::BusBackpressure, subscribers).unwrap_or(f64::NAN);
        let peers: Vec<(FanOut, f64)> = FanOut::ALL
            .into_iter()
            .filter(|contender| !contender.is_bus())
            .filter_map(|contender| Some((contender, per_event(contender, subscribers)?)))
            .collect();
        for (peer, count) in &peers {
            eprintln!(
                "instructions N={subscribers:<2} {:<24} {count:>7.0} per delivered event (bus {bus:.0})",
                peer.name()
            );
        }
        let (peer, best) = *peers
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a peer counted");
        let ratio = bus / best;
        println!(
            "| lossless fan-out, N = {subscribers} | {bus:.0} | {best:.0} ({}) | {ratio:.2} | ≤ 1.0 | {} |",
            peer.name(),
            if ratio <= 1.0 { "yes" } else { "**no**" }
        );
    }
}

/// The CMS search listener as the CMS runs it (batches of up to 256, one
/// index commit each) against one event per commit, on `posts` published
/// posts. One run each: the one-at-a-time side takes a while.
#[cfg(feature = "search")]
fn search_indexing(runtime: &tokio::runtime::Runtime, posts: usize) -> Row {
    let fixture = runtime.block_on(cms_index::Fixture::new(posts));
    let batched = runtime.block_on(fixture.index(event_bus::DEFAULT_MAX_BATCH));
    let single = runtime.block_on(fixture.index(1));
    let rate = |took: std::time::Duration| posts as f64 / took.as_secs_f64();
    eprintln!(
        "CMS search indexing, {posts} posts: batched {:.2?}, one at a time {:.2?}",
        batched, single
    );
    let ratio = rate(batched) / rate(single);
    Row {
        case: format!("CMS search listener, {posts} post events, batched vs one at a time"),
        bus: format!("{:.0} events/s", rate(batched)),
        peer: format!("{:.0} events/s (max_batch 1)", rate(single)),
        ratio,
        target: "—",
        met: true,
        cpu: None,
    }
}

fn median_run(mut run: impl FnMut() -> Run) -> Run {
    let mut runs: Vec<Run> = (0..REPEATS).map(|_| run()).collect();
    runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    runs[REPEATS / 2]
}

/// Median nanoseconds per call of `op`, over `REPEATS` timed loops.
fn median_ns(ops: u64, mut op: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..ops {
                op();
            }
            started.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[REPEATS / 2]
}

const QUEUED: usize = common::CAPACITY;

/// Heap bytes per event with `QUEUED` events waiting in each of
/// `subscribers` full queues, counting the queues themselves.
fn bus_bytes_per_event(subscribers: usize) -> f64 {
    let before = ALLOCATOR.allocated();
    let bus = EventBus::<BenchEvent>::new();
    let subscriptions: Vec<_> = (0..subscribers)
        .map(|_| bus.subscribe_with(KindSet::all(), QUEUED, LagPolicy::Backpressure))
        .collect();
    for i in 0..QUEUED {
        bus.emit(BenchEvent::K00(common::payload(i as i64)));
    }
    let bytes = ALLOCATOR.allocated() - before;
    black_box((bus, subscriptions));
    bytes as f64 / QUEUED as f64
}

fn broadcast_bytes_per_event(subscribers: usize) -> f64 {
    let before = ALLOCATOR.allocated();
    let (sender, receiver) = tokio::sync::broadcast::channel::<std::sync::Arc<BenchEvent>>(QUEUED);
    let receivers: Vec<_> = (1..subscribers).map(|_| sender.subscribe()).collect();
    for i in 0..QUEUED {
        let _ = sender.send(std::sync::Arc::new(BenchEvent::K00(common::payload(
            i as i64,
        ))));
    }
    let bytes = ALLOCATOR.allocated() - before;
    black_box((sender, receiver, receivers));
    bytes as f64 / QUEUED as f64
}
