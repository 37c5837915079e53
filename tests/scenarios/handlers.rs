//! Handlers written the other ways: with the derive, whose methods see the
//! event's id and attempt through `Meta`, and in batches.

use futures::StreamExt;

use super::probes::{BatchProbe, MetaProbe};
use super::{DEADLINE, EmitScenarioEvent, Running, Tier, roomy, settle, until, within};

pub(crate) async fn a_derive_handler_sees_the_emitted_id_and_attempt_one<T: Tier>(
    scenario: &'static str,
) {
    let tier = T::fresh(scenario).await;
    let mut tap = tier.tap().await;
    let probe = MetaProbe::default();
    let handle = tier.spawn(probe.clone(), roomy()).await;
    tier.emit_user_created(1);
    tier.emit_post_edited(2, 20);
    // No method for it: the listener is never handed it.
    tier.emit_post_deleted(3);

    let emitted = within(
        "the tap to see every event",
        tap.by_ref().take(3).collect::<Vec<_>>(),
    )
    .await;
    settle(&tier, "both events to be handled", || {
        probe.calls().len() == 2
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    let calls = probe.calls();
    let seen: Vec<_> = calls
        .iter()
        .map(|(value, meta)| (*value, meta.id(), meta.attempt(), meta.name()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, emitted[0].id(), 1, "user.created"),
            (2, emitted[1].id(), 1, "post.edited"),
        ]
    );
    assert_ne!(emitted[0].id(), emitted[1].id());
    assert_eq!(handle.counts().delivered, 2);
}

pub(crate) async fn a_batch_listener_gets_every_event_once_in_bounded_ordered_batches<T: Tier>(
    scenario: &'static str,
) {
    const EVENTS: u64 = 200;
    const MAX_BATCH: usize = 7;
    let tier = T::fresh(scenario).await;
    let probe = BatchProbe::new("batches");
    let options = roomy().max_batch(MAX_BATCH).concurrency(1);
    let handle = tier.spawn_batch(probe.clone(), options).await;
    // The first batch waits in the handler while the rest is published, so
    // that more than a batch is ready when it returns.
    tier.emit_user_created(0);
    until("the first batch to be handed over", || {
        !probe.batches().is_empty()
    })
    .await;
    for value in 1..EVENTS {
        tier.emit_user_created(value);
    }
    probe.open();
    settle(&tier, "every event to be handled", || {
        probe.events() == EVENTS as usize
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    let batches = probe.batches();
    for (attempt, batch) in &batches {
        assert_eq!(*attempt, 1);
        assert!(
            (1..=MAX_BATCH).contains(&batch.len()),
            "a batch of {} events, with max_batch {MAX_BATCH}",
            batch.len()
        );
    }
    // Every event once, in publish order, across the batches.
    let values: Vec<u64> = batches
        .iter()
        .flat_map(|(_, batch)| batch.clone())
        .collect();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>());
    assert!(
        batches.iter().any(|(_, batch)| batch.len() == MAX_BATCH),
        "with {EVENTS} events ready, no batch was full: {batches:?}"
    );
    let counts = handle.counts();
    assert_eq!((counts.delivered, counts.handled), (EVENTS, EVENTS));
}
