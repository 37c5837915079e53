//! The scenarios the benchmarks run, each for the bus and for the channels a
//! user would pick instead, on the same payload and capacity.

#![allow(dead_code, unreachable_pub, missing_docs)]

pub(crate) mod count;
pub(crate) mod cpu;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use event_bus::{DomainEvent, Envelope, EventBus, HandlerError, KindSet, LagPolicy, Listener};

/// Queue capacity of every channel and subscription.
pub const CAPACITY: usize = 1024;

/// The CMS's user payload: what a user-created event carries.
#[derive(Debug, Clone)]
pub struct UserEventData {
    pub id: i64,
    pub username: String,
    pub email: String,
}

pub fn payload(id: i64) -> UserEventData {
    UserEventData {
        id,
        username: "ada_lovelace".to_owned(),
        email: "ada@analytical-engine.example".to_owned(),
    }
}

/// Sixteen kinds, for selective delivery; fan-out uses the first.
#[derive(Debug, Clone, DomainEvent)]
pub enum BenchEvent {
    K00(UserEventData),
    K01(UserEventData),
    K02(UserEventData),
    K03(UserEventData),
    K04(UserEventData),
    K05(UserEventData),
    K06(UserEventData),
    K07(UserEventData),
    K08(UserEventData),
    K09(UserEventData),
    K10(UserEventData),
    K11(UserEventData),
    K12(UserEventData),
    K13(UserEventData),
    K14(UserEventData),
    K15(UserEventData),
}

impl BenchEvent {
    pub fn of_kind(kind: usize, data: UserEventData) -> Self {
        use BenchEvent::*;
        const MAKE: [fn(UserEventData) -> BenchEvent; 16] = [
            K00, K01, K02, K03, K04, K05, K06, K07, K08, K09, K10, K11, K12, K13, K14, K15,
        ];
        MAKE[kind](data)
    }

    pub fn kind_index(&self) -> usize {
        use event_bus::{Event, EventKind};
        self.kind().index()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The outcome of one run: how long, and how many deliveries and drops over
/// all subscribers.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub elapsed: Duration,
    /// The process's CPU time (user and system, every thread) over the run.
    pub cpu: Duration,
    pub delivered: u64,
    pub dropped: u64,
}

impl Run {
    pub fn per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU nanoseconds per delivered event.
    pub fn cpu_per_event(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.delivered.max(1) as f64
    }
}

/// The CPU time this process has used so far, user and system, all
/// threads.
pub fn cpu_time() -> Duration {
    cpu::cpu_of("self")
}

/// Sends `events` from `emitters` emitting tasks, each running `emit` on
/// its share; one emitter sends on the calling task, as a single producer
/// would.
async fn emit_from<F, Fut>(emitters: usize, events: u64, emit: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if emitters <= 1 {
        return emit(events).await;
    }
    let emitters = emitters as u64;
    let tasks: Vec<_> = (0..emitters)
        .map(|i| tokio::spawn(emit(events / emitters + u64::from(i < events % emitters))))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A fan-out contender: every subscriber takes every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanOut {
    /// The bus, default policy, unthrottled: drops what a consumer cannot take.
    BusDropOldest,
    /// The bus, backpressure policy, `emit_wait`: lossless.
    BusBackpressure,
    /// `tokio::sync::broadcast<T>`, the sender throttled on `len()`: lossless.
    Broadcast,
    /// `tokio::sync::broadcast<Arc<T>>`, throttled: lossless.
    BroadcastArc,
    /// `async-broadcast` (waits when full): lossless.
    AsyncBroadcast,
    /// One `kanal` bounded channel per subscriber, `Arc<T>`: lossless.
    Kanal,
    /// One `tokio::sync::mpsc` channel per subscriber, `Arc<T>`: lossless.
    Mpsc,
}

impl FanOut {
    pub const ALL: [FanOut; 7] = [
        FanOut::BusDropOldest,
        FanOut::BusBackpressure,
        FanOut::Broadcast,
        FanOut::BroadcastArc,
        FanOut::AsyncBroadcast,
        FanOut::Kanal,
        FanOut::Mpsc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FanOut::BusDropOldest => "bus (drop-oldest)",
            FanOut::BusBackpressure => "bus (backpressure)",
            FanOut::Broadcast => "tokio broadcast<T>",
            FanOut::BroadcastArc => "tokio broadcast<Arc<T>>",
            FanOut::AsyncBroadcast => "async-broadcast",
            FanOut::Kanal => "kanal fan-out",
            FanOut::Mpsc => "tokio mpsc fan-out",
        }
    }

    /// A short id for criterion's reports.
    pub fn id(self) -> &'static str {
        match self {
            FanOut::BusDropOldest => "bus-drop-oldest",
            FanOut::BusBackpressure => "bus-backpressure",
            FanOut::Broadcast => "broadcast",
            FanOut::BroadcastArc => "broadcast-arc",
            FanOut::AsyncBroadcast => "async-broadcast",
            FanOut::Kanal => "kanal",
            FanOut::Mpsc => "mpsc",
        }
    }

    /// The contender of an [`id`](Self::id).
    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|contender| contender.id() == id)
    }

    pub fn is_bus(self) -> bool {
        matches!(self, FanOut::BusDropOldest | FanOut::BusBackpressure)
    }
}

/// Joins consumer tasks, each returning (delivered, dropped).
async fn join(consumers: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let mut total = (0, 0);
    for consumer in consumers {
        let (delivered, dropped) = consumer.await.unwrap();
        total.0 += delivered;
        total.1 += dropped;
    }
    total
}

/// `events` events to `subscribers` subscribers, each taking all of them,
/// from one emitter.
pub async fn fan_out(contender: FanOut, subscribers: usize, events: u64) -> Run {
    fan_out_from(contender, subscribers, events, 1).await
}

/// [`fan_out`] from `emitters` emitting tasks, which share the events.
pub async fn fan_out_from(
    contender: FanOut,
    subscribers: usize,
    events: u64,
    emitters: usize,
) -> Run {
    let data = payload(1);
    let cpu = cpu_time();
    let started = Instant::now();
    let (delivered, dropped) = match contender {
        FanOut::BusDropOldest | FanOut::BusBackpressure => {
            let policy = if contender == FanOut::BusBackpressure {
                LagPolicy::Backpressure
            } else {
                LagPolicy::DropOldest
            };
            let bus = EventBus::<BenchEvent>::new();
            let consumers = (0..subscribers)
                .map(|_| {
                    let mut subscription = bus.subscribe_with(KindSet::all(), CAPACITY, policy);
                    tokio::spawn(async move {
                        let (mut delivered, mut dropped) = (0, 0);
                        loop {
                            match subscription.recv().await {
                                Ok(event) => {
                                    black_box(&event);
                                    delivered += 1;
                                }
                                Err(event_bus::RecvError::Lagged(n)) => dropped += n,
                                Err(event_bus::RecvError::Closed) => break,
                            }
                        }
                        (delivered, dropped)
                    })
                })
                .collect();
            let lossless = contender == FanOut::BusBackpressure;
            emit_from(emitters, events, |share| {
                let (bus, data) = (bus.clone(), data.clone());
                async move {
                    if lossless {
                        for _ in 0..share {
                            bus.emit_wait(BenchEvent::K00(data.clone())).await;
                        }
                    } else {
                        for i in 0..share {
                            bus.emit(BenchEvent::K00(data.clone()));
                            if i % CAPACITY as u64 == 0 {
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                }
            })
            .await;
            drop(bus);
            join(consumers).await
        }
        FanOut::Broadcast => {
            let (sender, _) = tokio::sync::broadcast::channel::<UserEventData>(CAPACITY);
            let consumers = broadcast_consumers(&sender, subscribers);
            emit_from(emitters, events, |share| {
                let (sender, data) = (sender.clone(), data.clone());
                throttled_broadcast(sender, share, move || data.clone())
            })
            .await;
            drop(sender);
            join(consumers).await
        }
        FanOut::BroadcastArc => {
            let (sender, _) = tokio::sync::broadcast::channel::<Arc<UserEventData>>(CAPACITY);
            let consumers = broadcast_consumers(&sender, subscribers);
            emit_from(emitters, events, |share| {
                let (sender, data) = (sender.clone(), data.clone());
                throttled_broadcast(sender, share, move || Arc::new(data.clone()))
            })
            .await;
            drop(sender);
            join(consumers).await
        }
        FanOut::AsyncBroadcast => {
            let (sender, receiver) = async_broadcast::broadcast::<Arc<UserEventData>>(CAPACITY);
            let consumers = (0..subscribers)
                .map(|_| {
                    let mut receiver = receiver.clone();
                    tokio::spawn(async move {
                        let mut delivered = 0;
                        while let Ok(event) = receiver.recv().await {
                            black_box(&event);
                            delivered += 1;
                        }
                        (delivered, 0)
                    })
                })
                .collect();
            drop(receiver);
            emit_from(emitters, events, |share| {
                let (sender, data) = (sender.clone(), data.clone());
                async move {
                    for _ in 0..share {
                        sender.broadcast(Arc::new(data.clone())).await.unwrap();
                    }
                }
            })
            .await;
            drop(sender);
            join(consumers).await
        }
        FanOut::Kanal => {
            let (senders, consumers): (Vec<_>, Vec<_>) = (0..subscribers)
                .map(|_| {
                    let (sender, receiver) = kanal::bounded_async::<Arc<UserEventData>>(CAPACITY);
                    let consumer = tokio::spawn(async move {
                        let mut delivered = 0;
                        while let Ok(event) = receiver.recv().await {
                            black_box(&event);
                            delivered += 1;
                        }
                        (delivered, 0)
                    });
                    (sender, consumer)
                })
                .unzip();
            emit_from(emitters, events, |share| {
                let (senders, data) = (senders.clone(), data.clone());
                async move {
                    for _ in 0..share {
                        let event = Arc::new(data.clone());
                        for sender in &senders {
                            sender.send(event.clone()).await.unwrap();
                        }
                    }
                }
            })
            .await;
            drop(senders);
            join(consumers).await
        }
        FanOut::Mpsc => {
            let (senders, consumers): (Vec<_>, Vec<_>) = (0..subscribers)
                .map(|_| {
                    let (sender, mut receiver) =
                        tokio::sync::mpsc::channel::<Arc<UserEventData>>(CAPACITY);
                    let consumer = tokio::spawn(async move {
                        let mut delivered = 0;
                        while let Some(event) = receiver.recv().await {
                            black_box(&event);
                            delivered += 1;
                        }
                        (delivered, 0)
                    });
                    (sender, consumer)
                })
                .unzip();
            emit_from(emitters, events, |share| {
                let (senders, data) = (senders.clone(), data.clone());
                async move {
                    for _ in 0..share {
                        let event = Arc::new(data.clone());
                        for sender in &senders {
                            sender.send(event.clone()).await.unwrap();
                        }
                    }
                }
            })
            .await;
            drop(senders);
            join(consumers).await
        }
    };
    Run {
        elapsed: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu),
        delivered,
        dropped,
    }
}

fn broadcast_consumers<T: Clone + Send + 'static>(
    sender: &tokio::sync::broadcast::Sender<T>,
    subscribers: usize,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    (0..subscribers)
        .map(|_| {
            let mut receiver = sender.subscribe();
            tokio::spawn(async move {
                let (mut delivered, mut dropped) = (0, 0);
                loop {
                    match receiver.recv().await {
                        Ok(event) => {
                            black_box(&event);
                            delivered += 1;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => dropped += n,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
                (delivered, dropped)
            })
        })
        .collect()
}

/// Sends with the lossless throttle users write for broadcast: wait while
/// the slowest receiver's backlog fills the ring.
async fn throttled_broadcast<T>(
    sender: tokio::sync::broadcast::Sender<T>,
    events: u64,
    make: impl Fn() -> T,
) {
    for _ in 0..events {
        while sender.len() >= CAPACITY {
            tokio::task::yield_now().await;
        }
        let _ = sender.send(make());
    }
}

/// A deterministic, uniform sequence of kinds in `0..16`.
pub fn kinds(events: u64) -> Vec<usize> {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    (0..events)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 16) as usize
        })
        .collect()
}

/// Selective delivery: 16 subscribers, each interested in one of 16 kinds;
/// `events` events of uniformly random kinds. Both contenders are lossless.
pub async fn selective(bus: bool, events: u64) -> Run {
    let data = payload(1);
    let kinds = kinds(events);
    let cpu = cpu_time();
    let started = Instant::now();
    let (delivered, dropped) = if bus {
        let bus = EventBus::<BenchEvent>::new();
        let consumers = (0..16)
            .map(|kind| {
                let kind = <BenchEventKind as event_bus::EventKind>::ALL[kind];
                let mut subscription = bus.subscribe_with(kind, CAPACITY, LagPolicy::Backpressure);
                tokio::spawn(async move {
                    let mut delivered = 0;
                    while let Ok(event) = subscription.recv().await {
                        black_box(&event);
                        delivered += 1;
                    }
                    (delivered, 0)
                })
            })
            .collect();
        for &kind in &kinds {
            bus.emit_wait(BenchEvent::of_kind(kind, data.clone())).await;
        }
        drop(bus);
        join(consumers).await
    } else {
        let (sender, _) = tokio::sync::broadcast::channel::<Arc<BenchEvent>>(CAPACITY);
        let consumers = (0..16)
            .map(|mine| {
                let mut receiver = sender.subscribe();
                tokio::spawn(async move {
                    let (mut delivered, mut dropped) = (0, 0);
                    loop {
                        match receiver.recv().await {
                            Ok(event) if event.kind_index() == mine => {
                                black_box(&event);
                                delivered += 1;
                            }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                dropped += n
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        }
                    }
                    (delivered, dropped)
                })
            })
            .collect();
        for &kind in &kinds {
            while sender.len() >= CAPACITY {
                tokio::task::yield_now().await;
            }
            let _ = sender.send(Arc::new(BenchEvent::of_kind(kind, data.clone())));
        }
        drop(sender);
        join(consumers).await
    };
    Run {
        elapsed: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu),
        delivered,
        dropped,
    }
}

/// The handler both runtime contenders call.
#[derive(Clone, Default)]
pub struct Count(pub Arc<AtomicU64>);

impl Count {
    fn handle(&self, event: &BenchEvent) {
        black_box(event);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Listener<BenchEvent> for Count {
    async fn handle(
        &self,
        event: Arc<Envelope<BenchEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        Count::handle(self, event.event());
        Ok(())
    }
}

/// Emit → handler ran, for `events` events: through a supervised listener,
/// or a bare receive loop on a subscription calling the same handler.
pub async fn runtime_overhead(supervised: bool, events: u64) -> Run {
    let data = payload(1);
    let bus = EventBus::<BenchEvent>::new();
    let count = Count::default();
    let options = event_bus::ListenerOptions::new()
        .capacity(CAPACITY)
        .lag_policy(LagPolicy::Backpressure);
    let cpu = cpu_time();
    let started = Instant::now();
    if supervised {
        bus.spawn_with(count.clone(), options);
        for _ in 0..events {
            bus.emit_wait(BenchEvent::K00(data.clone())).await;
        }
        bus.quiesce().await;
    } else {
        let mut subscription =
            bus.subscribe_with(KindSet::all(), CAPACITY, LagPolicy::Backpressure);
        let handler = count.clone();
        let consumer = tokio::spawn(async move {
            while let Ok(event) = subscription.recv().await {
                handler.handle(event.event());
            }
        });
        for _ in 0..events {
            bus.emit_wait(BenchEvent::K00(data.clone())).await;
        }
        drop(bus);
        consumer.await.unwrap();
    }
    Run {
        elapsed: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu),
        delivered: count.0.load(Ordering::Relaxed),
        dropped: 0,
    }
}

/// Handler-start latencies at low load: one event at a time, the next only
/// after the handler ran. The bus's listener, or a tokio mpsc receive loop.
pub async fn latencies(bus: bool, samples: usize) -> Vec<Duration> {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let data = payload(1);
    let mut latencies = Vec::with_capacity(samples);
    if bus {
        struct Stamp(tokio::sync::mpsc::UnboundedSender<Instant>);
        impl Listener<BenchEvent> for Stamp {
            async fn handle(
                &self,
                _: Arc<Envelope<BenchEvent>>,
                _: event_bus::Meta,
            ) -> Result<(), HandlerError> {
                let _ = self.0.send(Instant::now());
                Ok(())
            }
        }
        let bus = EventBus::<BenchEvent>::new();
        bus.spawn(Stamp(started_tx));
        for _ in 0..samples {
            let emitted = Instant::now();
            bus.emit(BenchEvent::K00(data.clone()));
            let handled = started_rx.recv().await.unwrap();
            latencies.push(handled - emitted);
        }
    } else {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<BenchEvent>(CAPACITY);
        tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                black_box(&event);
                let _ = started_tx.send(Instant::now());
            }
        });
        for _ in 0..samples {
            let emitted = Instant::now();
            sender.send(BenchEvent::K00(data.clone())).await.unwrap();
            let handled = started_rx.recv().await.unwrap();
            latencies.push(handled - emitted);
        }
    }
    latencies.sort();
    latencies
}

/// The `q`-quantile of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
