//! Decoding: on a tier whose events cross a codec, bytes that no longer
//! decode become a dead letter with the reason, never a crash loop, and the
//! listener goes on.

use std::time::Duration;

use event_bus::RetryPolicy;
use uuid::Uuid;

use super::probes::Probe;
use super::{DEADLINE, EmitScenarioEvent, Need, Tier, roomy, settle, supports, within};

pub(crate) async fn an_undecodable_event_becomes_a_dead_letter_and_the_listener_goes_on<T: Tier>(
    scenario: &'static str,
) {
    if !supports::<T>(scenario, Need::Decodes) {
        return;
    }
    let tier = T::fresh(scenario).await;
    let probe = Probe::new("decoder");
    let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(2));
    tier.spawn(probe.clone(), roomy().retry(retry)).await;

    // An event of a type this build does not know, with an id to report,
    // and bytes that are no event at all.
    let unknown = Uuid::from_u128(0x0190_c0a4_7b3e_7cc2_9a41_2f6d_1e8b_5a73);
    let unknown_type = format!(
        r#"{{"id": "{unknown}", "type": "post.vanished", "time": "2024-07-10T08:30:12Z", "data": 7}}"#
    );
    tier.emit_user_created(1);
    tier.publish_raw(unknown_type.into_bytes()).await;
    tier.publish_raw(b"not an event".to_vec()).await;
    tier.emit_user_created(2);

    settle(&tier, "the decodable events to be handled", || {
        probe.handled_count() == 2
    })
    .await;
    within("two dead letters", async {
        while tier.dead_letters().await.len() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    within("shutdown", tier.shutdown(DEADLINE)).await;

    assert_eq!(probe.handled_values(), [1, 2]);
    let letters = tier.dead_letters().await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let with_id = letters
        .iter()
        .find(|letter| letter.id == Some(unknown))
        .unwrap_or_else(|| panic!("no dead letter carries the id {unknown}: {letters:?}"));
    assert!(with_id.error.contains("post.vanished"), "{with_id:?}");
    for letter in &letters {
        assert_eq!(letter.listener, "decoder", "{letter:?}");
        assert!(!letter.error.is_empty(), "{letter:?}");
        // Decoding the same bytes again cannot succeed: no retries.
        assert_eq!(letter.attempts, 1, "{letter:?}");
    }
}
