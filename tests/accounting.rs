//! The accounting invariant, for random interest sets, capacities, policies,
//! priorities, fairness bounds and interleavings of emits and receives: every
//! subscriber gets exactly what a model of its bounded priority lanes
//! predicts, so delivered + dropped == emitted of interest, in every lane,
//! always.

mod support;

use std::collections::VecDeque;

use event_bus::{EventBus, LagPolicy, ListenerOptions, Priority, TryRecvError};
use proptest::prelude::*;
use support::{Recorder, TestEvent, TestKind, kinds};

#[derive(Debug, Clone)]
struct SubscriberSpec {
    interests: u8,
    capacity: usize,
    policy: LagPolicy,
}

#[derive(Debug, Clone)]
enum Op {
    Emit(usize, Priority),
    Recv(usize),
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![
        3 => Just(Priority::Normal),
        1 => Just(Priority::High),
        1 => Just(Priority::Low),
    ]
}

fn subscriber_spec() -> impl Strategy<Value = SubscriberSpec> {
    (
        0u8..16,
        1usize..8,
        prop_oneof![Just(LagPolicy::DropOldest), Just(LagPolicy::Backpressure)],
    )
        .prop_map(|(interests, capacity, policy)| SubscriberSpec {
            interests,
            capacity,
            policy,
        })
}

const LANES: usize = Priority::ALL.len();

fn lane(priority: Priority) -> usize {
    Priority::ALL.iter().position(|&p| p == priority).unwrap()
}

/// What one subscriber's queue must hold, by the documented rules: a
/// bounded lane per priority, from which the receiver takes batches of up to
/// 32 (and at most the capacity) that can no longer be dropped; it hands out
/// the oldest event of the highest lane with events, unless a lower lane
/// with events has been passed `fairness` times, in which case the lowest
/// such lane goes once. Under backpressure, a plain `emit` queues past the
/// capacity up to twice it, and past that drops the oldest as `DropOldest`
/// does.
#[derive(Default)]
struct Model {
    queue: [VecDeque<u64>; LANES],
    taken: [VecDeque<u64>; LANES],
    passed: [usize; LANES],
    unreported: u64,
    delivered: [u64; LANES],
    dropped: [u64; LANES],
    overflowed: [u64; LANES],
}

impl Model {
    fn push(&mut self, spec: &SubscriberSpec, priority: Priority, value: u64) {
        let lane = lane(priority);
        // A backpressure lane that plain `emit` overflows holds up to
        // `OVERFLOW_FACTOR` times its capacity, then drops its oldest; an
        // event counts as overflowed when the lane (queued and taken) is at
        // its capacity.
        let ceiling = match spec.policy {
            LagPolicy::DropOldest => spec.capacity,
            LagPolicy::Backpressure => spec.capacity * event_bus::OVERFLOW_FACTOR,
            policy => panic!("the model does not know {policy:?}"),
        };
        // The capacity bounds what is queued; what the receiver has taken
        // cannot be dropped.
        if self.queue[lane].len() >= ceiling {
            self.queue[lane].pop_front();
            self.dropped[lane] += 1;
            self.unreported += 1;
        } else if spec.policy == LagPolicy::Backpressure
            && self.queue[lane].len() + self.taken[lane].len() >= spec.capacity
        {
            self.overflowed[lane] += 1;
        }
        self.queue[lane].push_back(value);
    }

    fn recv(&mut self, spec: &SubscriberSpec, fairness: usize) -> Result<u64, TryRecvError> {
        loop {
            let waiting: Vec<bool> = (0..LANES)
                .map(|l| !self.taken[l].is_empty() || !self.queue[l].is_empty())
                .collect();
            let starved = (0..LANES)
                .rev()
                .find(|&l| waiting[l] && self.passed[l] >= fairness);
            let Some(lane) = starved.or_else(|| (0..LANES).find(|&l| waiting[l])) else {
                if self.unreported > 0 {
                    return Err(TryRecvError::Lagged(std::mem::take(&mut self.unreported)));
                }
                return Err(TryRecvError::Empty);
            };
            if self.taken[lane].is_empty() {
                if self.unreported > 0 {
                    return Err(TryRecvError::Lagged(std::mem::take(&mut self.unreported)));
                }
                let take = self.queue[lane].len().min(32).min(spec.capacity);
                let batch: Vec<u64> = self.queue[lane].drain(..take).collect();
                self.taken[lane].extend(batch);
                continue;
            }
            let value = self.taken[lane].pop_front().unwrap();
            for (passed, _) in self
                .passed
                .iter_mut()
                .zip(&waiting)
                .skip(lane + 1)
                .filter(|(_, w)| **w)
            {
                *passed += 1;
            }
            self.passed[lane] = 0;
            self.delivered[lane] += 1;
            return Ok(value);
        }
    }

    fn len(&self) -> usize {
        (0..LANES)
            .map(|l| self.queue[l].len() + self.taken[l].len())
            .sum()
    }
}

proptest! {
    #[test]
    fn subscriptions_match_the_queue_model(
        specs in prop::collection::vec(subscriber_spec(), 1..5),
        fairness in 1usize..6,
        ops in prop::collection::vec(
            prop_oneof![
                3 => (0usize..4, priority()).prop_map(|(kind, p)| Op::Emit(kind, p)),
                2 => (0usize..5).prop_map(Op::Recv),
            ],
            0..300,
        ),
    ) {
        let bus = EventBus::builder().fairness(fairness).build();
        let mut subscriptions: Vec<_> = specs
            .iter()
            .map(|s| bus.subscribe_with(kinds(s.interests.into()), s.capacity, s.policy))
            .collect();
        let mut models: Vec<Model> = specs.iter().map(|_| Model::default()).collect();
        let mut emitted_of_interest = vec![[0u64; LANES]; specs.len()];

        for (value, op) in ops.into_iter().enumerate() {
            match op {
                Op::Emit(kind, priority) => {
                    let event = TestEvent::of(TestKind::ALL_KINDS[kind], value as u64);
                    bus.with_priority(priority).emit(event);
                    for (i, spec) in specs.iter().enumerate() {
                        if spec.interests & (1 << kind) != 0 {
                            models[i].push(spec, priority, value as u64);
                            emitted_of_interest[i][lane(priority)] += 1;
                        }
                    }
                }
                Op::Recv(i) if i < specs.len() => {
                    let got = subscriptions[i].try_recv().map(|e| e.value());
                    prop_assert_eq!(got, models[i].recv(&specs[i], fairness));
                    prop_assert_eq!(subscriptions[i].len(), models[i].len());
                }
                Op::Recv(_) => {}
            }
        }

        drop(bus);
        for (i, subscription) in subscriptions.iter_mut().enumerate() {
            let mut lagged = 0;
            loop {
                let got = subscription.try_recv().map(|e| e.value());
                let expected = models[i].recv(&specs[i], fairness);
                match got {
                    Err(TryRecvError::Closed) => {
                        prop_assert_eq!(expected, Err(TryRecvError::Empty));
                        break;
                    }
                    Err(TryRecvError::Lagged(n)) => lagged += n,
                    _ => {}
                }
                prop_assert_eq!(got, expected);
            }
            let model = &models[i];
            for (l, &priority) in Priority::ALL.iter().enumerate() {
                let counts = subscription.lane(priority);
                prop_assert_eq!(counts.delivered, model.delivered[l]);
                prop_assert_eq!(counts.dropped, model.dropped[l]);
                prop_assert_eq!(counts.overflowed, model.overflowed[l]);
                // Every lane accounts for every event of its priority.
                prop_assert_eq!(counts.delivered + counts.dropped, emitted_of_interest[i][l]);
            }
            let dropped: u64 = model.dropped.iter().sum();
            prop_assert_eq!(subscription.dropped(), dropped);
            prop_assert!(lagged <= dropped);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn listeners_account_for_every_event_of_interest(
        specs in prop::collection::vec(subscriber_spec(), 1..4),
        bursts in prop::collection::vec(
            prop::collection::vec((0usize..4, priority()), 0..40),
            1..8,
        ),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let bus = EventBus::new();
            let names = ["first", "second", "third"];
            let handles: Vec<_> = specs
                .iter()
                .zip(names)
                .map(|(spec, name)| {
                    let options = ListenerOptions::new()
                        .capacity(spec.capacity)
                        .lag_policy(spec.policy);
                    bus.spawn_with(Recorder::new(name, kinds(spec.interests.into())), options)
                })
                .collect();

            let mut emitted_of_interest = vec![[0u64; LANES]; specs.len()];
            for burst in &bursts {
                for &(kind, priority) in burst {
                    bus.with_priority(priority).emit(TestEvent::of(TestKind::ALL_KINDS[kind], 0));
                    for (i, spec) in specs.iter().enumerate() {
                        if spec.interests & (1 << kind) != 0 {
                            emitted_of_interest[i][lane(priority)] += 1;
                        }
                    }
                }
                // Let the listeners run between bursts.
                tokio::task::yield_now().await;
            }
            support::within("quiesce", bus.quiesce()).await;

            for (handle, expected) in handles.iter().zip(emitted_of_interest) {
                let m = handle.metrics();
                for (l, &priority) in Priority::ALL.iter().enumerate() {
                    let lane = m.lane(priority);
                    prop_assert_eq!(lane.delivered + lane.dropped, expected[l], "{} {}", handle.name(), priority);
                }
                prop_assert_eq!(m.delivered + m.dropped, expected.iter().sum::<u64>(), "{}", handle.name());
                prop_assert_eq!(m.handled, m.delivered);
                prop_assert_eq!(m.queue_depth, 0);
            }
            Ok(())
        })?;
    }
}
