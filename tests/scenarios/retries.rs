//! Failures: a failed event is tried again with its attempt count and the
//! same id, holds back the events after it (concurrency 1), and once given
//! up becomes a dead letter while the listener goes on.

use std::collections::HashSet;
use std::time::Duration;

use event_bus::RetryPolicy;

use super::probes::{Call, Probe};
use super::{DEADLINE, EmitScenarioEvent, Letter, Running, Tier, roomy, settle, until, within};

/// Retries a few milliseconds apart: enough to be retries, short enough for
/// a suite.
fn retrying(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(attempts).initial_backoff(Duration::from_millis(2))
}

/// The (value, attempt) of each call, in order.
fn attempts(calls: &[Call]) -> Vec<(u64, u32)> {
    calls
        .iter()
        .map(|call| (call.value, call.attempt))
        .collect()
}

pub(crate) async fn a_failing_handler_is_resent_with_the_attempt_count_and_the_same_id<T: Tier>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 5;
    const FAILURES: u32 = 3;
    let tier = T::fresh(scenario).await;
    let probe = (0..EVENTS).fold(Probe::new("flaky"), |probe, value| {
        probe.failing(value, FAILURES)
    });
    let handle = tier
        .spawn(probe.clone(), roomy().retry(retrying(FAILURES + 1)))
        .await;
    for value in 0..EVENTS {
        tier.emit_user_created(value);
    }
    settle(&tier, "every event to be handled", || {
        probe.handled_count() == EVENTS as usize
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    let calls = probe.calls();
    let mut ids = HashSet::new();
    for value in 0..EVENTS {
        let of_event: Vec<&Call> = calls.iter().filter(|call| call.value == value).collect();
        let seen: Vec<u32> = of_event.iter().map(|call| call.attempt).collect();
        assert_eq!(
            seen,
            (1..=FAILURES + 1).collect::<Vec<_>>(),
            "event {value}"
        );
        let id = of_event[0].id;
        assert!(
            of_event.iter().all(|call| call.id == id),
            "event {value} changed its id between attempts: {of_event:?}"
        );
        ids.insert(id);
    }
    assert_eq!(ids.len(), EVENTS as usize, "every event has its own id");
    let counts = handle.counts();
    let failures = EVENTS * u64::from(FAILURES);
    assert_eq!(
        (
            counts.handled,
            counts.failed,
            counts.retried,
            counts.dead_lettered
        ),
        (EVENTS, failures, failures, 0),
        "{counts:?}"
    );
    assert_eq!(tier.dead_letters().await, []);
}

pub(crate) async fn an_unacked_event_blocks_the_next_one_with_concurrency_one<T: Tier>(
    scenario: &'static str,
) {
    let tier = T::fresh(scenario).await;
    // Handles everything at once: once it has, the tier has carried every
    // event, and had every chance to hand the next one over too early.
    let witness = Probe::new("witness");
    tier.spawn(witness.clone(), roomy()).await;
    // Event 0 fails twice, and its third attempt waits at the gate.
    let blocked = Probe::new("blocked").failing(0, 2).holding(0, 3);
    let handle = tier
        .spawn(blocked.clone(), roomy().concurrency(1).retry(retrying(3)))
        .await;
    for value in 0..3 {
        tier.emit_user_created(value);
    }

    until("the third attempt at event 0 to start", || {
        blocked.entered(0, 3)
    })
    .await;
    until("the witness to handle every event", || {
        witness.handled_count() == 3
    })
    .await;
    assert_eq!(
        attempts(&blocked.calls()),
        [(0, 1), (0, 2), (0, 3)],
        "an event was handed over while event 0 was not yet acked"
    );

    blocked.open();
    settle(&tier, "every event to be handled", || {
        blocked.handled_count() == 3
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;
    assert_eq!(
        attempts(&blocked.calls()),
        [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)]
    );
    let counts = handle.counts();
    assert_eq!((counts.handled, counts.retried), (3, 2), "{counts:?}");
}

pub(crate) async fn after_a_dead_letter_the_listener_handles_the_next_events<T: Tier>(
    scenario: &'static str,
) {
    const ATTEMPTS: u32 = 3;
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("poisoned").poisoned(3);
    let handle = tier
        .spawn(probe.clone(), roomy().retry(retrying(ATTEMPTS)))
        .await;
    for value in 0..10 {
        tier.emit_user_created(value);
    }
    settle(&tier, "every other event to be handled", || {
        probe.handled_count() == 9
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(probe.handled_values(), [0, 1, 2, 4, 5, 6, 7, 8, 9]);
    let poisoned = probe
        .calls()
        .into_iter()
        .find(|call| call.value == 3)
        .expect("event 3 was attempted");
    let letters = tier.dead_letters().await;
    assert_eq!(
        letters,
        [Letter {
            id: Some(poisoned.id),
            listener: "poisoned".into(),
            error: "poison 3".into(),
            attempts: ATTEMPTS,
        }]
    );
    let counts = handle.counts();
    assert_eq!(
        (
            counts.handled,
            counts.failed,
            counts.retried,
            counts.dead_lettered
        ),
        (9, 3, 2, 1),
        "{counts:?}"
    );
}
