//! The distributed tier against raw async-nats doing the same, side by
//! side in one run, as ratios: `cargo bench --bench nats`. It starts a
//! nats-server of its own (`/usr/sbin/nats-server`, else `nats-server` on
//! the `PATH`, or `EVENT_BUS_NATS_SERVER`) on a free port of 127.0.0.1,
//! with JetStream on file storage in a temporary directory, and kills it at
//! the end; with `EVENT_BUS_BENCH_NATS=nats://host:port` it uses that
//! server instead, and deletes its streams after.
//!
//! Both sides use one client connection each, the tier's stream (file
//! storage, one replica) and the same payload: the JSON of an
//! [`Envelope`] as the tier encodes it (the raw side encodes one per
//! message too), with a `Nats-Msg-Id` header, as the tier sets one. Each
//! throughput case runs [`ROUNDS`] rounds, the tier then raw async-nats in
//! even rounds and the other way in odd ones; a ratio is the median of the
//! rounds' ratios (tier / raw, higher is better).
//!
//! - **publish, awaited**: [`PUBLISH_AWAITED`] events, one at a time,
//!   each waiting for the stream's ack: `JetStream::publish` against
//!   `context.send_publish(..).await?.await?`.
//! - **publish, pipelined**: [`PUBLISH_PIPELINED`] events through the
//!   derive's `emit_*` helper (the `Publish` trait), then
//!   `JetStream::flush`, against raw `send_publish` futures with at most
//!   256 acks outstanding (the tier publisher's window), oldest awaited
//!   first, and the last acks awaited at the end.
//! - **consume**: [`CONSUMED`] events published before, read from the
//!   start by a new durable consumer each round until all are handled: a
//!   listener spawned with `JetStream::spawn_with` (a handler that does
//!   nothing) against a raw loop on a pull consumer of the same
//!   configuration (explicit ack, the same `max_ack_pending`, the same
//!   filter subject, the same pull size) that decodes (as the tier must,
//!   to hand its handler an event) and acks each message. Three
//!   shapes: concurrency 1 (`max_ack_pending` 1: a round trip per event,
//!   in stream order), concurrency 16 (16), and a batch listener of
//!   `max_batch` 100 (100; the raw loop pulls batches of 100 with
//!   `consumer.batch()` and acks each message); for the batch listener
//!   it also prints how many events its batches held (the median of the
//!   rounds' means).
//! - **latency**: from the publish call to the start of the handler,
//!   p50/p99 over [`LATENCY_SAMPLES`] events published one at a time, each
//!   once the previous was handled: the tier's `emit_*` helper to a
//!   listener of concurrency 1, and, interleaved with it, raw
//!   `send_publish` to a raw loop on a pull consumer (on a subject of its
//!   own, so that neither sees the other's events).
//! - **relay latency**: from an outbox commit's call (SQLite in a
//!   temporary file, WAL) to the start of a JetStream listener's handler,
//!   p50/p99 over [`LATENCY_SAMPLES`] events committed one at a time: the
//!   relay (`JetStream::spawn_relay`) woken in process by the commit,
//!   publishing, and the listener's consumer delivering.

#[path = "common/cpu.rs"]
mod cpu;

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::Stream as NatsStream;
use cpu::cpu_of;
use event_bus::codec::JsonCodec;
use event_bus::nats::{Config, Distributed, JetStream, JetStreamListener, Start};
use event_bus::{
    Batch, BatchError, BatchListener, DomainEvent, Envelope, HandlerError, ListenerOptions,
    listener,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
enum Bench {
    ItemAdded { id: i64, title: String },
}

const TITLE: &str = "a title of some length";
const PUBLISH_AWAITED: usize = 2_000;
const PUBLISH_PIPELINED: usize = 20_000;
const CONSUMED: usize = 10_000;
const LATENCY_SAMPLES: usize = 300;
/// Rounds of each throughput case.
const ROUNDS: usize = 9;
/// The tier publisher's window (`IN_FLIGHT` in `src/nats/jetstream.rs`).
const IN_FLIGHT: usize = 256;
/// The tier pump's smallest pull (`PULL_BATCH` in `src/nats/source.rs`).
const PULL_BATCH: usize = 128;

fn main() {
    let server = match std::env::var("EVENT_BUS_BENCH_NATS") {
        Ok(url) => Server::External(url),
        Err(_) => Server::start(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    // On a worker, as the tier's tasks are: a future blocked on by the main
    // thread is woken through a slower path.
    let url = server.url();
    runtime.block_on(async { tokio::spawn(async move { run(&url).await }).await.unwrap() });
    drop(runtime);
    drop(server);
    println!("(run in {:.0?})", started.elapsed());
}

/// The bench's state: the tier's handle and a raw client of its own.
struct Bed {
    tier: JetStream<Bench>,
    raw: async_nats::jetstream::Context,
    stream: NatsStream,
    /// The subject the tier publishes `Bench::ItemAdded` on.
    subject: String,
    next_id: AtomicU64,
}

impl Bed {
    fn id(&self) -> i64 {
        i64::try_from(self.next_id.fetch_add(1, Ordering::Relaxed)).unwrap()
    }

    /// The tier's payload and id, for the raw side.
    fn message(&self) -> PublishMessage {
        self.message_of(self.id())
    }

    /// The tier's payload for the event of `id`, with its envelope's id as
    /// the `Nats-Msg-Id`.
    fn message_of(&self, id: i64) -> PublishMessage {
        let envelope = Envelope::new(Bench::ItemAdded {
            id,
            title: TITLE.to_owned(),
        });
        let payload = JsonCodec.encode(&envelope).unwrap();
        PublishMessage::build()
            .payload(payload.into())
            .message_id(envelope.id().to_string())
    }

    async fn last_sequence(&self) -> u64 {
        let mut stream = self.stream.clone();
        stream.info().await.unwrap().state.last_sequence
    }
}

async fn run(url: &str) {
    let prefix = format!("bench{}", std::process::id());
    let tier = JetStream::<Bench>::connect(url, Config::new(prefix.as_str()))
        .await
        .unwrap();
    let raw = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream_name = prefix.to_uppercase();
    let stream = raw.get_stream(&stream_name).await.unwrap();
    let subject = tier.subject_of(
        Envelope::new(Bench::ItemAdded {
            id: 0,
            title: String::new(),
        })
        .name(),
    );
    let bed = Bed {
        tier,
        raw,
        stream,
        subject,
        next_id: AtomicU64::new(0),
    };
    println!(
        "nats-server at {url}; stream {stream_name} on file; ratios are tier / raw async-nats, \
         median of {ROUNDS} alternating rounds"
    );
    // `cargo bench --bench nats -- consume` runs the cases whose name has
    // `consume` in it.
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let wanted = |case: &str| filter.as_deref().is_none_or(|part| case.contains(part));
    let mut table = Vec::new();
    if wanted(AWAITED) {
        table.push(publish_awaited(&bed).await);
    }
    if wanted(PIPELINED) {
        table.push(publish_pipelined(&bed).await);
    }
    let shapes = [Shape::One, Shape::Sixteen, Shape::Batch];
    if shapes.iter().any(|shape| wanted(shape.name())) {
        let first = bed.last_sequence().await;
        for _ in 0..CONSUMED {
            bed.tier.emit_item_added(bed.id(), TITLE.to_owned());
        }
        bed.tier.flush().await;
        assert_eq!(bed.tier.unpublished(), 0);
        for shape in shapes {
            if wanted(shape.name()) {
                table.push(consume(&bed, first, shape).await);
            }
        }
    }
    println!();
    println!("| case | tier | raw async-nats | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in &table {
        println!("{row}");
    }
    if wanted(LATENCY) {
        latency(&bed).await;
    }
    if wanted(RELAY_LATENCY) {
        relay_latency(&bed).await;
    }
    bed.tier.shutdown(Duration::from_secs(5)).await;
    for name in [format!("{stream_name}_DLQ"), stream_name] {
        let _ = bed.raw.delete_stream(&name).await;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

/// Runs `tier` and `raw` for `ROUNDS` rounds, alternating which goes
/// first; each returns how many events it moved and how long it took.
/// Returns the table row.
async fn rounds<T, R, TF, RF>(case: &str, mut tier: T, mut raw: R) -> String
where
    T: FnMut(usize) -> TF,
    R: FnMut(usize) -> RF,
    TF: Future<Output = (usize, Duration)>,
    RF: Future<Output = (usize, Duration)>,
{
    let (mut tiers, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // CPU time per event, of this process and of the server: (tier, raw).
    let (mut here, mut there) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    // Write system calls per event: (tier, raw).
    let mut written = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let tier_first = round % 2 == 0;
        let mut t = None;
        let mut r = None;
        for tier_now in [tier_first, !tier_first] {
            let before = Cpu::now();
            let (events, elapsed) = if tier_now {
                tier(round).await
            } else {
                raw(round).await
            };
            let (client, server) = before.per_event(events);
            let writes = before.writes_per_event(events);
            let rate = events as f64 / elapsed.as_secs_f64();
            if tier_now {
                t = Some(rate);
                here.0.push(client);
                there.0.push(server);
                written.0.push(writes);
            } else {
                r = Some(rate);
                here.1.push(client);
                there.1.push(server);
                written.1.push(writes);
            }
        }
        let (t, r) = (t.unwrap(), r.unwrap());
        tiers.push(t);
        raws.push(r);
        ratios.push(t / r);
    }
    let ratio = median(ratios.clone());
    let spread = ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!("  {case}: ratios of the rounds {spread}");
    let server = if SERVER_PID.get().is_some() {
        format!(
            ", of nats-server {:.1} / {:.1} µs",
            median(there.0),
            median(there.1)
        )
    } else {
        String::new()
    };
    println!(
        "    per event, tier / raw: CPU of this process {:.1} / {:.1} µs{server}; \
         writes to the socket {:.2} / {:.2}",
        median(here.0),
        median(here.1),
        median(written.0),
        median(written.1),
    );
    format!(
        "| {case} | {:.0} events/s | {:.0} events/s | {ratio:.2} | ≥ 0.8 |",
        median(tiers),
        median(raws)
    )
}

/// The pid of the server the bench started.
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU time so far of this process and of the server (Linux: the sum of
/// their threads' `schedstat`; zero elsewhere), and this process's write
/// system calls (each a segment the server reads).
struct Cpu {
    client: Duration,
    server: Duration,
    writes: u64,
}

impl Cpu {
    fn now() -> Self {
        Self {
            client: cpu_of("self"),
            server: SERVER_PID
                .get()
                .map_or(Duration::ZERO, |pid| cpu_of(&pid.to_string())),
            writes: writes(),
        }
    }

    /// Write system calls per event since `self`.
    fn writes_per_event(&self, events: usize) -> f64 {
        writes().saturating_sub(self.writes) as f64 / events as f64
    }

    /// Microseconds per event since `self`, of this process and of the
    /// server.
    fn per_event(&self, events: usize) -> (f64, f64) {
        let now = Self::now();
        let per = |spent: Duration| spent.as_secs_f64() * 1e6 / events as f64;
        (
            per(now.client.saturating_sub(self.client)),
            per(now.server.saturating_sub(self.server)),
        )
    }
}

/// This process's write system calls so far (`/proc/self/io`).
fn writes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("syscw:")?.trim().parse().ok())
        .unwrap_or(0)
}

const AWAITED: &str = "publish, one at a time, awaiting each ack";
const PIPELINED: &str = "publish, pipelined (emit_* then flush; raw: 256 acks outstanding)";
const LATENCY: &str = "latency: publish call → handler start, p50 / p99";
const RELAY_LATENCY: &str = "relay latency: outbox commit call → handler start, p50 / p99";

async fn publish_awaited(bed: &Bed) -> String {
    rounds(
        AWAITED,
        |_| async {
            let started = Instant::now();
            for _ in 0..PUBLISH_AWAITED {
                bed.tier
                    .publish(Bench::ItemAdded {
                        id: bed.id(),
                        title: TITLE.to_owned(),
                    })
                    .await
                    .unwrap();
            }
            (PUBLISH_AWAITED, started.elapsed())
        },
        |_| async {
            let started = Instant::now();
            for _ in 0..PUBLISH_AWAITED {
                bed.raw
                    .send_publish(bed.subject.clone(), bed.message())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            (PUBLISH_AWAITED, started.elapsed())
        },
    )
    .await
}

async fn publish_pipelined(bed: &Bed) -> String {
    rounds(
        PIPELINED,
        |_| async {
            let started = Instant::now();
            for _ in 0..PUBLISH_PIPELINED {
                bed.tier.emit_item_added(bed.id(), TITLE.to_owned());
            }
            bed.tier.flush().await;
            let elapsed = started.elapsed();
            assert_eq!(bed.tier.unpublished(), 0);
            (PUBLISH_PIPELINED, elapsed)
        },
        |_| async {
            let started = Instant::now();
            let mut acks: VecDeque<PublishAckFuture> = VecDeque::with_capacity(IN_FLIGHT);
            for _ in 0..PUBLISH_PIPELINED {
                if acks.len() == IN_FLIGHT {
                    acks.pop_front().unwrap().await.unwrap();
                }
                let ack = bed
                    .raw
                    .send_publish(bed.subject.clone(), bed.message())
                    .await
                    .unwrap();
                acks.push_back(ack);
            }
            for ack in acks {
                ack.await.unwrap();
            }
            (PUBLISH_PIPELINED, started.elapsed())
        },
    )
    .await
}

/// Counts handled events, and notes when the last of [`CONSUMED`] was.
#[derive(Default)]
struct Tally {
    counted: AtomicU64,
    /// Handler calls.
    calls: AtomicU64,
    done: Mutex<Option<Instant>>,
}

impl Tally {
    fn add(&self, events: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.counted.fetch_add(events, Ordering::Relaxed) + events == CONSUMED as u64 {
            *self.done.lock().unwrap() = Some(Instant::now());
        }
    }

    /// When the last event was handled.
    async fn done(&self) -> Instant {
        wait_for(|| *self.done.lock().unwrap()).await
    }
}

/// A listener that does nothing, and counts.
struct Counter(Arc<Tally>);

#[listener]
impl BenchHandler for Counter {
    async fn on_item_added(&self, _id: &i64, _title: &String) -> Result<(), HandlerError> {
        self.0.add(1);
        Ok(())
    }
}

/// A batch listener that does nothing, and counts.
struct BatchCounter(Arc<Tally>);

impl BatchListener<Bench> for BatchCounter {
    async fn handle_batch(&self, batch: &Batch<Bench>) -> Result<(), BatchError> {
        self.0.add(batch.iter().count() as u64);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Shape {
    One,
    Sixteen,
    Batch,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::One => "consume, concurrency 1 (max_ack_pending 1)",
            Shape::Sixteen => "consume, concurrency 16 (max_ack_pending 16)",
            Shape::Batch => "consume, batch listener, max_batch 100 (max_ack_pending 100)",
        }
    }

    fn max_ack_pending(self) -> usize {
        match self {
            Shape::One => 1,
            Shape::Sixteen => 16,
            Shape::Batch => 100,
        }
    }
}

async fn consume(bed: &Bed, first: u64, shape: Shape) -> String {
    // Events per handler call, each round's.
    let sizes = &Mutex::new(Vec::new());
    let row = rounds(
        shape.name(),
        |round| async move {
            let tally = Arc::<Tally>::default();
            let group = format!("tier-{}-{round}", shape.max_ack_pending());
            let distributed = Distributed::new()
                .group(group.as_str())
                .start(Start::After(first));
            let started = Instant::now();
            let handle: JetStreamListener = match shape {
                Shape::One | Shape::Sixteen => {
                    let options = ListenerOptions::new().concurrency(shape.max_ack_pending());
                    bed.tier
                        .spawn_with(Counter(tally.clone()), options, distributed)
                        .await
                        .unwrap()
                }
                Shape::Batch => {
                    let options = ListenerOptions::new().max_batch(100);
                    bed.tier
                        .spawn_with(BatchCounter(tally.clone()), options, distributed)
                        .await
                        .unwrap()
                }
            };
            let elapsed = tally.done().await - started;
            let calls = tally.calls.load(Ordering::Relaxed).max(1);
            sizes.lock().unwrap().push(CONSUMED as f64 / calls as f64);
            handle.abort();
            handle.finished().await;
            let _ = bed.stream.delete_consumer(&group).await;
            (CONSUMED, elapsed)
        },
        |round| async move {
            let group = format!("raw-{}-{round}", shape.max_ack_pending());
            let started = Instant::now();
            let consumer = raw_consumer(
                bed,
                &group,
                &bed.subject,
                DeliverPolicy::ByStartSequence {
                    start_sequence: first + 1,
                },
                shape.max_ack_pending(),
            )
            .await;
            let mut read = 0;
            match shape {
                Shape::One | Shape::Sixteen => {
                    let mut messages = consumer
                        .stream()
                        .max_messages_per_batch(shape.max_ack_pending().max(PULL_BATCH))
                        .expires(Duration::from_secs(5))
                        .heartbeat(Duration::from_secs(2))
                        .messages()
                        .await
                        .unwrap();
                    while read < CONSUMED {
                        let message = messages.next().await.unwrap().unwrap();
                        std::hint::black_box(JsonCodec.decode::<Bench>(&message.payload).unwrap());
                        message.ack().await.unwrap();
                        read += 1;
                    }
                }
                Shape::Batch => {
                    while read < CONSUMED {
                        let mut batch = consumer
                            .batch()
                            .max_messages(100)
                            .expires(Duration::from_secs(5))
                            .messages()
                            .await
                            .unwrap();
                        while let Some(message) = batch.next().await {
                            let message = message.unwrap();
                            std::hint::black_box(
                                JsonCodec.decode::<Bench>(&message.payload).unwrap(),
                            );
                            message.ack().await.unwrap();
                            read += 1;
                        }
                    }
                }
            }
            let elapsed = started.elapsed();
            let _ = bed.stream.delete_consumer(&group).await;
            (read, elapsed)
        },
    )
    .await;
    if let Shape::Batch = shape {
        let size = median(sizes.lock().unwrap().clone());
        println!(
            "    the tier's batch listener: {size:.1} events per batch (median of the rounds)"
        );
    }
    row
}

/// A durable pull consumer as the tier makes one for a listener.
async fn raw_consumer(
    bed: &Bed,
    name: &str,
    filter: &str,
    deliver_policy: DeliverPolicy,
    max_ack_pending: usize,
) -> PullConsumer {
    bed.stream
        .create_consumer(PullConfig {
            durable_name: Some(name.to_owned()),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: 4,
            filter_subject: filter.to_owned(),
            max_ack_pending: i64::try_from(max_ack_pending).unwrap(),
            ..PullConfig::default()
        })
        .await
        .unwrap()
}

/// When each event's handler started, by event id.
#[derive(Clone, Default)]
struct Stopwatch(Arc<Mutex<HashMap<i64, Instant>>>);

#[listener]
impl BenchHandler for Stopwatch {
    async fn on_item_added(&self, id: &i64, _title: &String) -> Result<(), HandlerError> {
        self.0.lock().unwrap().insert(*id, Instant::now());
        Ok(())
    }
}

async fn latency(bed: &Bed) {
    let watch = Stopwatch::default();
    let handle = bed
        .tier
        .spawn_with(
            watch.clone(),
            ListenerOptions::new(),
            Distributed::new().group("latency"),
        )
        .await
        .unwrap();
    // The raw loop: a consumer on a subject of its own, recording when each
    // message came, by its event's id (decoded, as the tier decodes).
    let raw_subject = format!("{}.raw", bed.subject);
    let consumer = raw_consumer(bed, "raw-latency", &raw_subject, DeliverPolicy::New, 1).await;
    let arrived: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let raw_loop = tokio::spawn({
        let arrived = arrived.clone();
        async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .expires(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
                .unwrap();
            while let Some(message) = messages.next().await {
                let at = Instant::now();
                let message = message.unwrap();
                let envelope = JsonCodec.decode::<Bench>(&message.payload).unwrap();
                let Bench::ItemAdded { id, .. } = envelope.event();
                let id = *id;
                arrived.lock().unwrap().insert(id, at);
                message.ack().await.unwrap();
            }
        }
    });
    let (mut tier, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..LATENCY_SAMPLES {
        // The tier: emit, then wait until the handler started.
        let id = bed.id();
        let sent = Instant::now();
        bed.tier.emit_item_added(id, TITLE.to_owned());
        let started = wait_for(|| watch.0.lock().unwrap().get(&id).copied()).await;
        tier.push(started.saturating_duration_since(sent));
        // Raw: publish, await the ack, then wait until the loop had it.
        let key = bed.id();
        let message = bed.message_of(key);
        let sent = Instant::now();
        bed.raw
            .send_publish(raw_subject.clone(), message)
            .await
            .unwrap()
            .await
            .unwrap();
        let came = wait_for(|| arrived.lock().unwrap().get(&key).copied()).await;
        raw.push(came.saturating_duration_since(sent));
    }
    raw_loop.abort();
    handle.abort();
    let (t50, t99) = (percentile(&mut tier, 0.5), percentile(&mut tier, 0.99));
    let (r50, r99) = (percentile(&mut raw, 0.5), percentile(&mut raw, 0.99));
    println!(
        "| {LATENCY} ({LATENCY_SAMPLES} events, one at a time) \
         | {t50:.0?} / {t99:.0?} | {r50:.0?} / {r99:.0?} | {:.2} / {:.2} (time) | — |",
        t50.as_secs_f64() / r50.as_secs_f64(),
        t99.as_secs_f64() / r99.as_secs_f64(),
    );
}

async fn relay_latency(bed: &Bed) {
    let dir = tempfile::tempdir().unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("outbox.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let store = event_bus::sql::SqliteStore::<Bench>::new(pool)
        .await
        .unwrap();
    let relay = bed
        .tier
        .spawn_relay(&store, event_bus::sql::Durable::new())
        .await
        .unwrap();
    let watch = Stopwatch::default();
    let handle = bed
        .tier
        .spawn_with(
            watch.clone(),
            ListenerOptions::new(),
            Distributed::new().group("relay-latency"),
        )
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let id = bed.id();
        let sent = Instant::now();
        let tx = store.begin().await.unwrap();
        tx.emit_item_added(id, TITLE.to_owned());
        tx.commit().await.unwrap();
        let started = wait_for(|| watch.0.lock().unwrap().get(&id).copied()).await;
        samples.push(started.saturating_duration_since(sent));
    }
    handle.abort();
    relay.abort();
    store.shutdown(Duration::from_secs(5)).await;
    let (p50, p99) = (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    );
    println!(
        "| {RELAY_LATENCY} ({LATENCY_SAMPLES} events, one at a time) | {p50:.1?} / {p99:.1?} | — | — | — |"
    );
}

/// Polls `look` until it has a value, for 60 s at most. The value is an
/// instant the other side took, so the poll's period does not matter.
async fn wait_for<T>(mut look: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = look() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "the events were not handled in 60 s"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// The nats-server the bench runs against.
enum Server {
    /// Started by the bench; killed when dropped.
    Own {
        child: Child,
        port: u16,
        _storage: tempfile::TempDir,
    },
    /// `EVENT_BUS_BENCH_NATS`.
    External(String),
}

impl Server {
    fn start() -> Self {
        let binary = std::env::var_os("EVENT_BUS_NATS_SERVER")
            .map(PathBuf::from)
            .or_else(|| {
                let debian = PathBuf::from("/usr/sbin/nats-server");
                debian.exists().then_some(debian)
            })
            .unwrap_or_else(|| "nats-server".into());
        let storage = tempfile::tempdir().unwrap();
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(storage.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (set EVENT_BUS_NATS_SERVER to its path)");
        let _ = SERVER_PID.set(child.id());
        let server = Self::Own {
            child,
            port,
            _storage: storage,
        };
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Own { port, .. } => format!("nats://127.0.0.1:{port}"),
            Self::External(url) => url.clone(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Self::Own { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
