//! What only some tiers promise: priority lanes, lag policies, listeners
//! that outlive their process, consumer groups and replay.

use event_bus::{LagPolicy, ListenerOptions};

use super::probes::Probe;
use super::{
    DEADLINE, EmitScenarioEvent, Need, Running, Tier, roomy, settle, supports, until, within,
};

pub(crate) async fn a_high_priority_event_overtakes_queued_normal_ones<T: Tier>(
    scenario: &'static str,
) {
    if !supports::<T>(scenario, Need::Priority) {
        return;
    }
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("prioritized").holding(0, 1);
    tier.spawn(probe.clone(), roomy()).await;
    tier.emit_user_created(0);
    until("event 0 to be in the handler", || probe.entered(0, 1)).await;
    for value in 1..=100 {
        tier.emit_user_created(value);
    }
    tier.emit_post_taken_down(1_000);
    probe.open();
    settle(&tier, "every event to be handled", || {
        probe.handled_count() == 102
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    // The event in the handler finishes; the take-down goes before the
    // normal events queued ahead of it, which keep their order.
    let expected: Vec<u64> = [0, 1_000].into_iter().chain(1..=100).collect();
    assert_eq!(probe.handled_values(), expected);
}

pub(crate) async fn a_full_drop_oldest_listener_accounts_for_every_event<T: Tier>(
    scenario: &'static str,
) {
    if !supports::<T>(scenario, Need::LagPolicies) {
        return;
    }
    const EVENTS: u64 = 1_000;
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("lagging").holding(0, 1);
    let options = ListenerOptions::new()
        .capacity(8)
        .lag_policy(LagPolicy::DropOldest);
    let handle = tier.spawn(probe.clone(), options).await;
    tier.emit_user_created(0);
    until("event 0 to be in the handler", || probe.entered(0, 1)).await;
    for value in 1..EVENTS {
        tier.emit_user_created(value);
    }
    probe.open();
    settle(&tier, "every event to be handled or dropped", || {
        let counts = handle.counts();
        counts.delivered + counts.dropped == EVENTS && counts.handled == counts.delivered
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    let counts = handle.counts();
    assert_eq!(counts.delivered + counts.dropped, EVENTS, "{counts:?}");
    assert!(
        counts.dropped > 0,
        "a full queue of 8 dropped nothing: {counts:?}"
    );
    assert_eq!(counts.handled, counts.delivered, "{counts:?}");
    // What was kept is in order, the newest included: the oldest went.
    let values = probe.handled_values();
    assert_eq!(values.len() as u64, counts.handled);
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    assert_eq!(values.first(), Some(&0));
    assert_eq!(values.last(), Some(&(EVENTS - 1)));
}

pub(crate) async fn a_persistent_listener_resumes_after_a_restart<T: Tier>(scenario: &'static str) {
    if !supports::<T>(scenario, Need::Persistent) {
        return;
    }
    let tier = T::fresh(scenario).await;
    let first = Probe::new("resumer");
    let handle = tier.spawn(first.clone(), roomy()).await;
    for value in 0..10 {
        tier.emit_user_created(value);
    }
    // Acknowledged, not only handled: an unacked event would be redelivered.
    until("the first ten events to be acked", || {
        handle.counts().handled == 10
    })
    .await;
    handle.abort();
    within("the listener to stop", handle.finished()).await;
    // Published while no instance of the listener runs.
    for value in 10..20 {
        tier.emit_user_created(value);
    }
    let second = Probe::new("resumer");
    tier.spawn(second.clone(), roomy()).await;
    settle(&tier, "the restarted listener to catch up", || {
        second.handled_count() == 10
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(first.handled_values(), (0..10).collect::<Vec<_>>());
    assert_eq!(second.handled_values(), (10..20).collect::<Vec<_>>());
}

pub(crate) async fn a_group_shares_its_events_each_once_across_instances<T: Tier>(
    scenario: &'static str,
) {
    if !supports::<T>(scenario, Need::Groups) {
        return;
    }
    const EVENTS: u64 = 300;
    let tier = T::fresh(scenario).await;
    let instances: Vec<Probe> = (0..3).map(|_| Probe::new("indexer").yielding(1)).collect();
    for instance in &instances {
        tier.spawn_in_group("indexers", instance.clone(), roomy())
            .await;
    }
    let auditor = Probe::new("auditor");
    tier.spawn(auditor.clone(), roomy()).await;
    for value in 0..EVENTS {
        tier.emit_user_created(value);
    }
    let handled = || instances.iter().map(Probe::handled_count).sum::<usize>();
    settle(
        &tier,
        "the group and the auditor to handle every event",
        || handled() == EVENTS as usize && auditor.handled_count() == EVENTS as usize,
    )
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    // Once across the group, and every event for a listener outside it.
    let mut values: Vec<u64> = instances.iter().flat_map(Probe::handled_values).collect();
    values.sort_unstable();
    assert_eq!(values, (0..EVENTS).collect::<Vec<_>>());
    let mut audited = auditor.handled_values();
    audited.sort_unstable();
    assert_eq!(audited, (0..EVENTS).collect::<Vec<_>>());
    let shares: Vec<usize> = instances.iter().map(Probe::handled_count).collect();
    println!("the group's instances handled {shares:?}");
}

pub(crate) async fn a_replaying_listener_starts_from_the_first_event<T: Tier>(
    scenario: &'static str,
) {
    if !supports::<T>(scenario, Need::Replay) {
        return;
    }
    let tier = T::fresh(scenario).await;
    // Published before any listener exists.
    for value in 0..10 {
        tier.emit_user_created(value);
    }
    let probe = Probe::new("replayer");
    tier.spawn_replaying(probe.clone(), roomy()).await;
    for value in 10..20 {
        tier.emit_user_created(value);
    }
    settle(&tier, "every event to be handled", || {
        probe.handled_count() == 20
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(probe.handled_values(), (0..20).collect::<Vec<_>>());
}
