//! Closing: shutdown while everything is busy accounts for every event,
//! a closed tier refuses what is published after, a stopped listener stays
//! stopped, and a graceful shutdown drains every event exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::probes::{BatchProbe, Probe};
use super::{
    DEADLINE, EmitScenarioEvent, Running, ScenarioEvent, Tier, roomy, settle, until, within,
};

pub(crate) async fn concurrent_close_accounts_for_every_event_published_before_shutdown<T: Tier>(
    scenario: &'static str,
) {
    const PUBLISHERS: u64 = 3;
    /// The most events one publisher publishes: a bound on its loop.
    const LIMIT: u64 = 20_000;
    let tier = T::fresh(scenario).await;
    let poisoned = (0..PUBLISHERS)
        .flat_map(|publisher| (7..LIMIT).step_by(50).map(move |i| publisher * LIMIT + i));
    let failing = poisoned.fold(Probe::new("failing").yielding(2), Probe::poisoned);
    let steady = Probe::new("steady").yielding(1);
    let probes = [steady.clone(), Probe::new("slow").yielding(20), failing];
    let mut handles = Vec::new();
    for probe in &probes {
        handles.push(tier.spawn(probe.clone(), roomy()).await);
    }
    let batches = BatchProbe::new("batches");
    batches.open();
    let batch_options = roomy().max_batch(16).max_wait(Duration::from_millis(1));
    let batch_handle = tier.spawn_batch(batches, batch_options).await;

    let shutting_down = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    // Publishes that returned before the shutdown began: each must end
    // handled, dead-lettered or reported undelivered.
    let before_shutdown = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            let tier = tier.clone();
            let (shutting_down, stop) = (shutting_down.clone(), stop.clone());
            let (published, before_shutdown) = (published.clone(), before_shutdown.clone());
            tokio::spawn(async move {
                for i in 0..LIMIT {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    tier.emit_user_created(publisher * LIMIT + i);
                    published.fetch_add(1, Ordering::SeqCst);
                    if !shutting_down.load(Ordering::SeqCst) {
                        before_shutdown.fetch_add(1, Ordering::SeqCst);
                    }
                    if i % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();

    until("the steady listener to be busy", || {
        steady.handled_count() >= 100
    })
    .await;
    shutting_down.store(true, Ordering::SeqCst);
    // Short: the slow listener is stopped with events left.
    let stopped = within("shutdown", tier.shutdown(Duration::from_millis(20))).await;
    // The publishers go on a little into the closed tier.
    let at_close = published.load(Ordering::SeqCst);
    until("publishes after the shutdown", || {
        published.load(Ordering::SeqCst) >= at_close + 50
            || publishers.iter().all(|publisher| publisher.is_finished())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for publisher in publishers {
        within("a publisher", publisher).await.unwrap();
    }
    for handle in handles.iter().chain([&batch_handle]) {
        within("a listener to end", handle.finished()).await;
    }

    let published = published.load(Ordering::SeqCst);
    let before_shutdown = before_shutdown.load(Ordering::SeqCst);
    let refused = tier.refused().await;
    let accepted = published - refused;
    assert!(
        before_shutdown <= accepted,
        "{before_shutdown} events were published before the shutdown, but only {accepted} of {published} accepted"
    );
    let names = probes.iter().map(Probe::name).chain(["batches"]);
    for (name, handle) in names.zip(handles.iter().chain([&batch_handle])) {
        let counts = handle.counts();
        let undelivered = stopped.undelivered_by(name);
        assert_eq!(
            counts.handled + counts.dead_lettered + undelivered,
            accepted,
            "{name}: {counts:?} and {undelivered} undelivered do not account for the {accepted} events accepted ({stopped:?})",
        );
        assert_eq!(counts.dropped, 0, "{name}: {counts:?}");
    }
    for probe in &probes {
        let handled = probe.handled();
        let ids: HashSet<_> = handled.iter().map(|call| call.id).collect();
        assert_eq!(
            ids.len(),
            handled.len(),
            "{} handled an event twice",
            probe.name()
        );
    }
    let letters = tier.dead_letters().await;
    let failing = handles[2].counts();
    assert_eq!(letters.len() as u64, failing.dead_lettered);
    let attempted: HashSet<_> = probes[2].calls().iter().map(|call| call.id).collect();
    assert!(
        letters
            .iter()
            .all(|letter| letter.id.is_some_and(|id| attempted.contains(&id))),
        "a dead letter names an event its listener was never handed"
    );
    println!(
        "{published} published, {before_shutdown} before the shutdown, {refused} refused, {} undelivered",
        stopped.undelivered()
    );
}

pub(crate) async fn events_published_after_shutdown_are_refused_and_never_handled<T: Tier>(
    scenario: &'static str,
) {
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("closed");
    let handle = tier.spawn(probe.clone(), roomy()).await;
    for value in 0..10 {
        tier.emit_user_created(value);
    }
    let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;
    assert!(stopped.drained, "{stopped:?}");

    for value in 10..20 {
        tier.emit_user_created(value);
    }
    within(
        "a publish_wait after shutdown to return",
        tier.publish_wait(ScenarioEvent::UserCreated(20)),
    )
    .await;
    assert_eq!(tier.refused().await, 11);
    assert_eq!(probe.handled_values(), (0..10).collect::<Vec<_>>());
    assert_eq!(handle.counts().handled, 10);
    assert_eq!(handle.counts().delivered, 10);
}

pub(crate) async fn an_aborted_listener_handles_nothing_after_it_stopped<T: Tier>(
    scenario: &'static str,
) {
    let tier = T::fresh(scenario).await;
    let witness = Probe::new("witness");
    tier.spawn(witness.clone(), roomy()).await;
    let aborted = Probe::new("aborted").holding(5, 1);
    let handle = tier.spawn(aborted.clone(), roomy()).await;
    for value in 0..10 {
        tier.emit_user_created(value);
    }
    until("event 5 to be in the handler", || aborted.entered(5, 1)).await;
    handle.abort();
    within("the aborted listener to end", handle.finished()).await;
    let at_stop = handle.counts();
    // Were the stopped handler still running, it would go on now.
    aborted.open();
    for value in 10..20 {
        tier.emit_user_created(value);
    }
    settle(&tier, "the witness to handle every event", || {
        witness.handled_count() == 20
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(aborted.handled_values(), [0, 1, 2, 3, 4]);
    let called: Vec<u64> = aborted.calls().iter().map(|call| call.value).collect();
    assert_eq!(called, [0, 1, 2, 3, 4, 5], "a call started after the abort");
    assert_eq!(handle.counts(), at_stop);
    assert_eq!(at_stop.handled, 5);
}

pub(crate) async fn graceful_shutdown_drains_every_queued_event_exactly_once<T: Tier>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 300;
    let tier = T::fresh(scenario).await;
    let probes = [
        Probe::new("drain-a").yielding(3),
        Probe::new("drain-b").yielding(1),
        Probe::new("drain-concurrent").yielding(3),
    ];
    let mut handles = Vec::new();
    for (probe, concurrency) in probes.iter().zip([1, 1, 4]) {
        let options = roomy().concurrency(concurrency);
        handles.push(tier.spawn(probe.clone(), options).await);
    }
    for value in 0..EVENTS {
        tier.publish(ScenarioEvent::mixed(value));
    }
    // At once: the events are still queued.
    let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;

    assert!(stopped.drained, "{stopped:?}");
    assert_eq!(stopped.undelivered(), 0, "{stopped:?}");
    let mut ids_of_first = None;
    for (probe, handle) in probes.iter().zip(&handles) {
        let mut per_id: HashMap<_, usize> = HashMap::new();
        for call in probe.handled() {
            *per_id.entry(call.id).or_default() += 1;
        }
        assert!(
            per_id.values().all(|&times| times == 1),
            "{} handled an event twice",
            probe.name()
        );
        assert_eq!(per_id.len() as u64, EVENTS, "{}", probe.name());
        let mut values = probe.handled_values();
        values.sort_unstable();
        assert_eq!(values, (0..EVENTS).collect::<Vec<_>>(), "{}", probe.name());
        assert_eq!(handle.counts().handled, EVENTS, "{}", probe.name());
        let ids: HashSet<_> = per_id.into_keys().collect();
        let first = ids_of_first.get_or_insert_with(|| ids.clone());
        assert_eq!(
            *first, ids,
            "listeners saw different ids for the same events"
        );
    }
}
