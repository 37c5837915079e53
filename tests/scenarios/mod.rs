//! The scenario suite: every delivery rule the tiers share, written once,
//! generic over a [`Tier`], as Watermill's `pubsub/tests` is over its
//! backends.
//!
//! A tier's constructor (`tests/scenarios_<tier>.rs`) implements [`Tier`]
//! for a small wrapper, declares its [`Capabilities`], and runs the suite
//! with `scenarios!(MyTier);`: one `#[tokio::test]` per scenario, named for
//! what it proves. A scenario that needs a capability the tier lacks prints
//! so (`-- --nocapture` shows it) and passes; it is never skipped silently.
//!
//! Scenarios wait on conditions with a deadline ([`until`], [`settle`]),
//! never on sleeps, and read their final numbers after
//! [`Tier::shutdown`], once the listeners' tasks have ended, so that an
//! event handled twice late is still seen.

// Each tier's test crate compiles this module and uses the part its
// capabilities allow; what one tier skips is dead code in its crate.
#![allow(dead_code)]

pub(crate) mod closing;
pub(crate) mod decoding;
pub(crate) mod delivery;
pub(crate) mod handlers;
pub(crate) mod probes;
pub(crate) mod retries;
pub(crate) mod tier_semantics;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    BatchListener, DomainEvent, Envelope, Listener, ListenerMetrics, ListenerOptions, Publish,
};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long a scenario waits for anything that should happen: generous,
/// since a tier may talk to a server, and a test under load is slow.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// The one event type of every scenario. Each scenario numbers the events
/// it publishes, so an event's [`value`](ScenarioEvent::value) names it.
#[derive(Debug, Clone, PartialEq, Eq, DomainEvent, Serialize, Deserialize)]
pub(crate) enum ScenarioEvent {
    UserCreated(u64),
    PostEdited {
        id: u64,
        revision: u64,
    },
    PostDeleted(u64),
    #[event(priority = "high")]
    PostTakenDown(u64),
}

impl ScenarioEvent {
    /// The number the scenario gave the event.
    pub(crate) fn value(&self) -> u64 {
        match *self {
            Self::UserCreated(value)
            | Self::PostEdited { id: value, .. }
            | Self::PostDeleted(value)
            | Self::PostTakenDown(value) => value,
        }
    }

    /// Event `value` of a mix of the normal-priority kinds, with a payload
    /// derived from the value, so that a scenario can check payloads.
    pub(crate) fn mixed(value: u64) -> Self {
        match value % 3 {
            0 => Self::UserCreated(value),
            1 => Self::PostEdited {
                id: value,
                revision: value * 7 + 1,
            },
            _ => Self::PostDeleted(value),
        }
    }
}

/// A tier as the scenarios see it: a fresh instance per scenario, which
/// publishes (through [`Publish`], so the derive's `emit_*` helpers work on
/// it), spawns listeners, shuts down and keeps dead letters.
///
/// Optional parts have defaults that panic, and are called only when
/// [`CAPABILITIES`](Tier::CAPABILITIES) says the tier has them.
pub(crate) trait Tier:
    Publish<ScenarioEvent> + Clone + Send + Sync + Sized + 'static
{
    /// The tier's name, in skip messages.
    const NAME: &'static str;

    /// What the tier can do beyond the scenarios every tier runs.
    const CAPABILITIES: Capabilities;

    /// A running listener.
    type Handle: Running;

    /// A fresh instance, isolated from every other scenario's (its own bus,
    /// schema, stream), named for `scenario`.
    fn fresh(scenario: &'static str) -> impl Future<Output = Self> + Send;

    /// Spawns `listener` with `options`. When this returns, the listener
    /// receives every event published afterwards.
    fn spawn<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> impl Future<Output = Self::Handle> + Send;

    /// Spawns a batch listener, as [`spawn`](Tier::spawn).
    fn spawn_batch<L: BatchListener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> impl Future<Output = Self::Handle> + Send;

    /// Stops accepting events, lets the listeners finish within `deadline`,
    /// stops those still busy, and returns, once every listener's task has
    /// ended, what was left.
    fn shutdown(&self, deadline: Duration) -> impl Future<Output = Stopped> + Send;

    /// How many publishes the tier refused because it was shutting down.
    fn refused(&self) -> impl Future<Output = u64> + Send;

    /// The dead letters recorded so far, oldest first.
    fn dead_letters(&self) -> impl Future<Output = Vec<Letter>> + Send;

    /// Every event published from now on, as the tier carries it (with the
    /// id it was given), in publish order.
    fn tap(&self) -> impl Future<Output = BoxStream<'static, Arc<Envelope<ScenarioEvent>>>> + Send;

    /// Waits until every listener is idle. Only with
    /// [`Capabilities::quiesce`].
    fn quiesce(&self) -> impl Future<Output = ()> + Send {
        unsupported::<Self, _>("quiesce", Need::Quiesce)
    }

    /// Publishes raw bytes, as a decoding tier stores an event, so that the
    /// listeners are handed what `bytes` decode to (or a dead letter when
    /// they do not). Only with [`Capabilities::decodes`].
    fn publish_raw(&self, bytes: Vec<u8>) -> impl Future<Output = ()> + Send {
        let _ = bytes;
        unsupported::<Self, _>("publish_raw", Need::Decodes)
    }

    /// Spawns `listener` as one instance of `group`: the instances of a
    /// group share its events, each handled by one of them. Only with
    /// [`Capabilities::groups`].
    fn spawn_in_group<L: Listener<ScenarioEvent>>(
        &self,
        group: &'static str,
        listener: L,
        options: ListenerOptions,
    ) -> impl Future<Output = Self::Handle> + Send {
        let _ = (group, listener, options);
        unsupported::<Self, _>("spawn_in_group", Need::Groups)
    }

    /// Spawns `listener` to be handed every event the tier still holds,
    /// from the first, then what is published afterwards. Only with
    /// [`Capabilities::replay`].
    fn spawn_replaying<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> impl Future<Output = Self::Handle> + Send {
        let _ = (listener, options);
        unsupported::<Self, _>("spawn_replaying", Need::Replay)
    }
}

/// What an optional method of [`Tier`] does on a tier that lacks it.
fn unsupported<T: Tier, O>(method: &str, need: Need) -> std::future::Ready<O> {
    panic!(
        "`Tier::{method}` called on the {} tier, which does not declare `{need}`: check `supports::<T>(scenario, Need::{need:?})` first",
        T::NAME
    )
}

/// A listener a tier spawned.
pub(crate) trait Running: Send + Sync + 'static {
    /// A snapshot of its counters; final once [`finished`](Running::finished)
    /// returns.
    fn counts(&self) -> Counts;

    /// Stops it: it starts no event after this.
    fn abort(&self);

    /// Waits until its task has ended.
    fn finished(&self) -> impl Future<Output = ()> + Send;
}

/// A listener's counters, in terms every tier has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Events handed to the listener.
    pub(crate) delivered: u64,
    /// Events its handler finished successfully.
    pub(crate) handled: u64,
    /// Failed attempts.
    pub(crate) failed: u64,
    /// Failed attempts that were tried again.
    pub(crate) retried: u64,
    /// Events given up, recorded as dead letters.
    pub(crate) dead_lettered: u64,
    /// Events its lag policy dropped (0 on a tier without lag policies).
    pub(crate) dropped: u64,
}

impl From<ListenerMetrics> for Counts {
    fn from(metrics: ListenerMetrics) -> Self {
        Self {
            delivered: metrics.delivered,
            handled: metrics.handled,
            failed: metrics.failed,
            retried: metrics.retried,
            dead_lettered: metrics.dead_lettered,
            dropped: metrics.dropped,
        }
    }
}

/// What [`Tier::shutdown`] left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Stopped {
    /// Every listener finished what it had been given before the deadline.
    pub(crate) drained: bool,
    /// Per listener name, the events it had been given and did not finish.
    pub(crate) undelivered: BTreeMap<String, u64>,
    /// Events left by listeners the tier no longer names (stopped before
    /// the shutdown).
    pub(crate) unattributed: u64,
}

impl Stopped {
    /// Events left undelivered by the listener named `name`.
    pub(crate) fn undelivered_by(&self, name: &str) -> u64 {
        self.undelivered.get(name).copied().unwrap_or(0)
    }

    /// Events left undelivered, over all listeners.
    pub(crate) fn undelivered(&self) -> u64 {
        self.unattributed + self.undelivered.values().sum::<u64>()
    }
}

/// A dead letter, in terms every tier has: an event that no longer decodes
/// has no envelope, and may not even have an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Letter {
    /// The event's id, when it could be read.
    pub(crate) id: Option<Uuid>,
    /// The listener that gave up.
    pub(crate) listener: String,
    /// Why: the last attempt's error, or the decode error.
    pub(crate) error: String,
    /// How many attempts were made.
    pub(crate) attempts: u32,
}

/// What a tier can do beyond the scenarios every tier runs. Built with
/// [`Capabilities::none`] and one method per capability, so that adding one
/// changes no tier's declaration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    persistent: bool,
    groups: bool,
    replay: bool,
    crash_recovery: bool,
    priority: bool,
    lag_policies: bool,
    decodes: bool,
    quiesce: bool,
}

impl Capabilities {
    /// Only what every tier does.
    pub(crate) const fn none() -> Self {
        Self {
            persistent: false,
            groups: false,
            replay: false,
            crash_recovery: false,
            priority: false,
            lag_policies: false,
            decodes: false,
            quiesce: false,
        }
    }

    /// Events outlive the listener: one that stops and starts again under
    /// the same name resumes where it stopped.
    pub(crate) const fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// Consumer groups: instances of a listener in many processes share its
    /// events: [`Tier::spawn_in_group`].
    pub(crate) const fn groups(mut self) -> Self {
        self.groups = true;
        self
    }

    /// A listener can start from an earlier position:
    /// [`Tier::spawn_replaying`].
    pub(crate) const fn replay(mut self) -> Self {
        self.replay = true;
        self
    }

    /// Nothing is lost when a process is killed mid-way. No scenario yet:
    /// those need a harness that kills a child process at chosen points.
    pub(crate) const fn crash_recovery(mut self) -> Self {
        self.crash_recovery = true;
        self
    }

    /// Priority lanes: a high-priority event overtakes queued normal ones.
    pub(crate) const fn priority(mut self) -> Self {
        self.priority = true;
        self
    }

    /// Bounded queues with a lag policy (`capacity`, `lag_policy`).
    pub(crate) const fn lag_policies(mut self) -> Self {
        self.lag_policies = true;
        self
    }

    /// Events cross a codec, so undecodable bytes are possible:
    /// [`Tier::publish_raw`].
    pub(crate) const fn decodes(mut self) -> Self {
        self.decodes = true;
        self
    }

    /// The tier can say "every listener idle": [`Tier::quiesce`].
    pub(crate) const fn quiesce(mut self) -> Self {
        self.quiesce = true;
        self
    }

    /// Whether the tier has `need`.
    pub(crate) const fn has(&self, need: Need) -> bool {
        match need {
            Need::Persistent => self.persistent,
            Need::Groups => self.groups,
            Need::Replay => self.replay,
            Need::CrashRecovery => self.crash_recovery,
            Need::Priority => self.priority,
            Need::LagPolicies => self.lag_policies,
            Need::Decodes => self.decodes,
            Need::Quiesce => self.quiesce,
        }
    }
}

/// One capability, as a scenario asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Persistent,
    Groups,
    Replay,
    CrashRecovery,
    Priority,
    LagPolicies,
    Decodes,
    Quiesce,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Persistent => "persistent",
            Self::Groups => "groups",
            Self::Replay => "replay",
            Self::CrashRecovery => "crash_recovery",
            Self::Priority => "priority",
            Self::LagPolicies => "lag_policies",
            Self::Decodes => "decodes",
            Self::Quiesce => "quiesce",
        })
    }
}

/// Whether tier `T` can run `scenario`, which needs `need`; prints why not
/// when it cannot.
pub(crate) fn supports<T: Tier>(scenario: &str, need: Need) -> bool {
    let has = T::CAPABILITIES.has(need);
    if !has {
        println!(
            "skipped: scenario `{scenario}` needs `{need}`, which the {} tier lacks",
            T::NAME
        );
    }
    has
}

/// `future`'s output, or a panic naming `what` after [`DEADLINE`].
pub(crate) async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not happen within {DEADLINE:?}"),
    }
}

/// Yields until `condition` holds, or panics naming `what` after
/// [`DEADLINE`].
pub(crate) async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Waits until the tier has settled into `condition`: through its quiesce
/// when it has one (so that a false condition fails at once rather than at
/// the deadline), then by polling.
pub(crate) async fn settle<T: Tier>(tier: &T, what: &str, condition: impl FnMut() -> bool) {
    if T::CAPABILITIES.has(Need::Quiesce) {
        within("the tier to quiesce", tier.quiesce()).await;
    }
    until(what, condition).await;
}

/// Options for a listener that must not lose an event to a bounded queue:
/// room for every event a scenario publishes. Other tiers ignore the
/// capacity.
pub(crate) fn roomy() -> ListenerOptions {
    ListenerOptions::new().capacity(1 << 20)
}

/// Defines one `#[tokio::test]` per scenario, for tier `$tier`, grouped in
/// modules as the scenarios are: `scenarios!(MemoryTier);`. Attributes
/// after the tier go on every test:
/// `scenarios!(PgTier, #[ignore = "needs PostgreSQL"]);`.
macro_rules! scenarios {
    ($tier:ty $(, #[$attr:meta])* $(,)?) => {
        $crate::scenarios::scenarios!(@tests $tier; [$(#[$attr])*];
            delivery {
                publish_subscribe_delivers_every_event_once_with_its_payload,
                concurrent_subscribe_each_listener_receives_every_later_event_in_order,
                a_listener_with_concurrency_one_sees_events_in_publish_order,
            }
            retries {
                a_failing_handler_is_resent_with_the_attempt_count_and_the_same_id,
                an_unacked_event_blocks_the_next_one_with_concurrency_one,
                after_a_dead_letter_the_listener_handles_the_next_events,
            }
            closing {
                concurrent_close_accounts_for_every_event_published_before_shutdown,
                events_published_after_shutdown_are_refused_and_never_handled,
                an_aborted_listener_handles_nothing_after_it_stopped,
                graceful_shutdown_drains_every_queued_event_exactly_once,
            }
            handlers {
                a_derive_handler_sees_the_emitted_id_and_attempt_one,
                a_batch_listener_gets_every_event_once_in_bounded_ordered_batches,
            }
            decoding {
                an_undecodable_event_becomes_a_dead_letter_and_the_listener_goes_on,
            }
            tier_semantics {
                a_high_priority_event_overtakes_queued_normal_ones,
                a_full_drop_oldest_listener_accounts_for_every_event,
                a_persistent_listener_resumes_after_a_restart,
                a_group_shares_its_events_each_once_across_instances,
                a_replaying_listener_starts_from_the_first_event,
            }
        );
    };
    (@tests $tier:ty; $attrs:tt; $($group:ident { $($name:ident),* $(,)? })*) => {
        $(
            $crate::scenarios::scenarios!(@group $tier; $attrs; $group { $($name),* });
        )*
    };
    (@group $tier:ty; $attrs:tt; $group:ident { $($name:ident),* }) => {
        mod $group {
            #[allow(unused_imports)]
            use super::*;

            $(
                $crate::scenarios::scenarios!(@test $tier; $attrs; $group; $name);
            )*
        }
    };
    (@test $tier:ty; [$(#[$attr:meta])*]; $group:ident; $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            $crate::scenarios::$group::$name::<$tier>(stringify!($name)).await;
        }
    };
}

pub(crate) use scenarios;
