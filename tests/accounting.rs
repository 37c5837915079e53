//! The accounting invariant, for random interest sets, capacities, policies
//! and interleavings of emits and receives: every subscriber gets exactly what
//! a model of its bounded queue predicts, so delivered + dropped == emitted of
//! interest, always.

mod support;

use std::collections::VecDeque;

use event_bus::{EventBus, KindSet, LagPolicy, ListenerOptions, TryRecvError};
use proptest::prelude::*;
use support::{Recorder, TestEvent, TestKind};

#[derive(Debug, Clone)]
struct SubscriberSpec {
    interests: u8,
    capacity: usize,
    policy: LagPolicy,
}

#[derive(Debug, Clone)]
enum Op {
    Emit(usize),
    Recv(usize),
}

fn kinds(mask: u8) -> KindSet<TestKind> {
    TestKind::ALL_KINDS
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, kind)| kind)
        .collect()
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

/// What one subscriber's queue must hold, by the documented rules: a
/// bounded queue, from which the receiver takes batches of up to 32 (and at
/// most its capacity) that can no longer be dropped.
#[derive(Default)]
struct Model {
    queue: VecDeque<u64>,
    batch: VecDeque<u64>,
    unreported: u64,
    delivered: u64,
    dropped: u64,
    overflowed: u64,
}

impl Model {
    fn push(&mut self, spec: &SubscriberSpec, value: u64) {
        if self.queue.len() >= spec.capacity {
            match spec.policy {
                LagPolicy::DropOldest => {
                    self.queue.pop_front();
                    self.dropped += 1;
                    self.unreported += 1;
                }
                LagPolicy::Backpressure => self.overflowed += 1,
            }
        }
        self.queue.push_back(value);
    }

    fn recv(&mut self, spec: &SubscriberSpec) -> Result<u64, TryRecvError> {
        if self.batch.is_empty() {
            if self.unreported > 0 {
                return Err(TryRecvError::Lagged(std::mem::take(&mut self.unreported)));
            }
            let take = self.queue.len().min(32).min(spec.capacity);
            self.batch.extend(self.queue.drain(..take));
        }
        let value = self.batch.pop_front().ok_or(TryRecvError::Empty)?;
        self.delivered += 1;
        Ok(value)
    }
}

proptest! {
    #[test]
    fn subscriptions_match_the_queue_model(
        specs in prop::collection::vec(subscriber_spec(), 1..5),
        ops in prop::collection::vec(
            prop_oneof![
                3 => (0usize..4).prop_map(Op::Emit),
                2 => (0usize..5).prop_map(Op::Recv),
            ],
            0..300,
        ),
    ) {
        let bus = EventBus::new();
        let mut subscriptions: Vec<_> = specs
            .iter()
            .map(|s| bus.subscribe_with(kinds(s.interests), s.capacity, s.policy))
            .collect();
        let mut models: Vec<Model> = specs.iter().map(|_| Model::default()).collect();
        let mut emitted_of_interest = vec![0u64; specs.len()];

        for (value, op) in ops.into_iter().enumerate() {
            match op {
                Op::Emit(kind) => {
                    bus.emit(TestEvent::of(TestKind::ALL_KINDS[kind], value as u64));
                    for (i, spec) in specs.iter().enumerate() {
                        if spec.interests & (1 << kind) != 0 {
                            models[i].push(spec, value as u64);
                            emitted_of_interest[i] += 1;
                        }
                    }
                }
                Op::Recv(i) if i < specs.len() => {
                    let got = subscriptions[i].try_recv().map(|e| e.value());
                    prop_assert_eq!(got, models[i].recv(&specs[i]));
                    prop_assert_eq!(
                        subscriptions[i].len(),
                        models[i].queue.len() + models[i].batch.len()
                    );
                }
                Op::Recv(_) => {}
            }
        }

        drop(bus);
        for (i, subscription) in subscriptions.iter_mut().enumerate() {
            let mut lagged = 0;
            loop {
                let got = subscription.try_recv().map(|e| e.value());
                let expected = models[i].recv(&specs[i]);
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
            prop_assert_eq!(subscription.delivered(), model.delivered);
            prop_assert_eq!(subscription.dropped(), model.dropped);
            prop_assert_eq!(subscription.overflowed(), model.overflowed);
            prop_assert_eq!(subscription.delivered() + subscription.dropped(), emitted_of_interest[i]);
            prop_assert!(lagged <= model.dropped);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn listeners_account_for_every_event_of_interest(
        specs in prop::collection::vec(subscriber_spec(), 1..4),
        bursts in prop::collection::vec(prop::collection::vec(0usize..4, 0..40), 1..8),
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
                    bus.spawn_with(Recorder::new(name, kinds(spec.interests)), options)
                })
                .collect();

            let mut emitted_of_interest = vec![0u64; specs.len()];
            for burst in &bursts {
                for &kind in burst {
                    bus.emit(TestEvent::of(TestKind::ALL_KINDS[kind], 0));
                    for (i, spec) in specs.iter().enumerate() {
                        if spec.interests & (1 << kind) != 0 {
                            emitted_of_interest[i] += 1;
                        }
                    }
                }
                // Let the listeners run between bursts.
                tokio::task::yield_now().await;
            }
            support::within("quiesce", bus.quiesce()).await;

            for (handle, expected) in handles.iter().zip(emitted_of_interest) {
                let m = handle.metrics();
                prop_assert_eq!(m.delivered + m.dropped, expected, "{}", handle.name());
                prop_assert_eq!(m.handled, m.delivered);
                prop_assert_eq!(m.queue_depth, 0);
            }
            Ok(())
        })?;
    }
}
