//! Delivery: every event reaches the listeners interested in it, once, with
//! its payload, in publish order, even for listeners spawned while events
//! are being published.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Barrier;

use super::probes::Probe;
use super::{
    DEADLINE, EmitScenarioEvent, Running, ScenarioEvent, ScenarioEventKind, Tier, roomy, settle,
    until, within,
};

pub(crate) async fn publish_subscribe_delivers_every_event_once_with_its_payload<T: Tier>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 300;
    let tier = T::fresh(scenario).await;
    let everything = Probe::new("everything");
    let deletions = Probe::new("deletions").interests(ScenarioEventKind::PostDeleted);
    let everything_handle = tier.spawn(everything.clone(), roomy()).await;
    let deletions_handle = tier.spawn(deletions.clone(), roomy()).await;

    let published: Vec<ScenarioEvent> = (0..EVENTS).map(ScenarioEvent::mixed).collect();
    for event in &published {
        tier.publish(event.clone());
    }
    let deleted: Vec<ScenarioEvent> = published
        .iter()
        .filter(|event| matches!(event, ScenarioEvent::PostDeleted(_)))
        .cloned()
        .collect();
    settle(&tier, "every event to be handled", || {
        everything.handled_count() == published.len() && deletions.handled_count() == deleted.len()
    })
    .await;
    let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;
    assert!(stopped.drained, "{stopped:?}");

    // Once each, with its payload; the final numbers, after shutdown.
    let mut seen: Vec<ScenarioEvent> = everything.handled().into_iter().map(|c| c.event).collect();
    seen.sort_by_key(ScenarioEvent::value);
    assert_eq!(seen, published);
    let ids: HashSet<_> = everything.handled().iter().map(|call| call.id).collect();
    assert_eq!(ids.len(), published.len(), "every event has its own id");
    // A listener is handed only the kinds it is interested in.
    let mut seen: Vec<ScenarioEvent> = deletions.handled().into_iter().map(|c| c.event).collect();
    seen.sort_by_key(ScenarioEvent::value);
    assert_eq!(seen, deleted);
    assert_eq!(everything_handle.counts().handled, EVENTS);
    assert_eq!(deletions_handle.counts().handled, deleted.len() as u64);
    assert_eq!(deletions_handle.counts().delivered, deleted.len() as u64);
}

pub(crate) async fn concurrent_subscribe_each_listener_receives_every_later_event_in_order<
    T: Tier,
>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 5_000;
    const SPAWNERS: usize = 5;
    const PER_SPAWNER: usize = 10;
    const LISTENERS: usize = SPAWNERS * PER_SPAWNER;
    let tier = T::fresh(scenario).await;
    // How many events the publisher has published, stored after each.
    let published = Arc::new(AtomicU64::new(0));
    let spawned = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(SPAWNERS + 1));

    let publisher = tokio::spawn({
        let (tier, published, spawned, start) = (
            tier.clone(),
            published.clone(),
            spawned.clone(),
            start.clone(),
        );
        async move {
            start.wait().await;
            for value in 0..EVENTS {
                if value == EVENTS - 1 {
                    // The last event reaches every listener, so each has
                    // something to wait for.
                    until("every listener to be spawned", || {
                        spawned.load(Ordering::SeqCst) == LISTENERS
                    })
                    .await;
                }
                tier.emit_user_created(value);
                published.store(value + 1, Ordering::SeqCst);
                if value % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    });
    let spawners: Vec<_> = (0..SPAWNERS)
        .map(|spawner| {
            let (tier, published, spawned, start) = (
                tier.clone(),
                published.clone(),
                spawned.clone(),
                start.clone(),
            );
            tokio::spawn(async move {
                start.wait().await;
                let mut listeners = Vec::new();
                for k in 0..PER_SPAWNER {
                    let probe = Probe::new(format!("listener-{spawner}-{k}"));
                    let handle = tier.spawn(probe.clone(), roomy()).await;
                    // Events numbered above this were published after the
                    // spawn returned: the publisher stores the count after
                    // each publish, and starts the next one after that.
                    let before = published.load(Ordering::SeqCst);
                    spawned.fetch_add(1, Ordering::SeqCst);
                    listeners.push((probe, handle, before));
                    tokio::task::yield_now().await;
                }
                listeners
            })
        })
        .collect();
    let mut listeners = Vec::new();
    for spawner in spawners {
        listeners.extend(within("a spawner", spawner).await.unwrap());
    }
    within("the publisher", publisher).await.unwrap();

    settle(&tier, "every listener to handle the last event", || {
        listeners
            .iter()
            .all(|(probe, _, _)| probe.handled_values().last() == Some(&(EVENTS - 1)))
    })
    .await;
    let stopped = within("shutdown", tier.shutdown(DEADLINE)).await;
    assert!(stopped.drained, "{stopped:?}");

    let mut mid_stream = 0;
    for (probe, handle, before) in &listeners {
        let values = probe.handled_values();
        let first = values[0];
        // A run of consecutive events up to the last: in order, none twice,
        // none missing, from no later than the spawn.
        assert_eq!(
            values,
            (first..EVENTS).collect::<Vec<_>>(),
            "{} (spawned after {before} events)",
            probe.name()
        );
        assert!(
            first <= before + 1,
            "{} was spawned after {before} events but missed events up to {first}",
            probe.name()
        );
        assert_eq!(handle.counts().handled, EVENTS - first);
        if 0 < *before && *before < EVENTS - 1 {
            mid_stream += 1;
        }
    }
    println!("{mid_stream} of {LISTENERS} listeners were spawned mid-stream");
}

pub(crate) async fn a_listener_with_concurrency_one_sees_events_in_publish_order<T: Tier>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 1_000;
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("in-order").yielding(1);
    let handle = tier.spawn(probe.clone(), roomy().concurrency(1)).await;
    for value in 0..EVENTS {
        tier.publish(ScenarioEvent::mixed(value));
    }
    settle(&tier, "every event to be handled", || {
        probe.handled_count() == EVENTS as usize
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(probe.handled_values(), (0..EVENTS).collect::<Vec<_>>());
    // The calls too: nothing was started out of order and retried in place.
    let called: Vec<u64> = probe.calls().iter().map(|call| call.value).collect();
    assert_eq!(called, (0..EVENTS).collect::<Vec<_>>());
    assert_eq!(handle.counts().handled, EVENTS);
}
