//! The exactly-once matrix, shared by the plain and the traced runs.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Act, Letters, Mode, Script, Scripted, What, id_of};
use event_bus::runner::{self, RunReport};
use event_bus::{
    Batch, BatchError, BatchFailure, BatchListener, ListenerOptions, ListenerStatus, RetryPolicy,
};

const MAX_ATTEMPTS: u32 = 3;
const N: u64 = 40;

pub fn act(id: u64, attempt: u32) -> Act {
    if id % 7 == 0 {
        return Act::Fail;
    }
    match (id % 5, attempt) {
        (0, 1) => return Act::Panic,
        (1, 1 | 2) => return Act::PanicOnMake,
        (2, 1) => return Act::PanicOnDrop,
        (3, 1) => return Act::PanicOnPollAndDrop,
        _ => {}
    }
    if id % 3 == 0 && attempt == 1 {
        return Act::Fail;
    }
    if id % 4 == 0 {
        return Act::Sleep(Duration::from_millis(10 * (id % 3)));
    }
    Act::Ok
}

fn succeeds(act: Act) -> bool {
    matches!(act, Act::Ok | Act::Sleep(_))
}

fn panics(act: Act) -> bool {
    matches!(
        act,
        Act::Panic | Act::PanicOnMake | Act::PanicOnDrop | Act::PanicOnPollAndDrop
    )
}

fn policy() -> RetryPolicy {
    RetryPolicy::exponential(MAX_ATTEMPTS).initial_backoff(Duration::from_millis(10))
}

async fn run_with_deadline<F: std::future::Future<Output = RunReport>>(run: F) -> RunReport {
    tokio::time::timeout(Duration::from_secs(3600), run)
        .await
        .expect("the run ends")
}

fn check_identities(report: &RunReport, n: u64) {
    assert_eq!(report.status, ListenerStatus::Drained, "{report:?}");
    assert_eq!(
        report.failed,
        report.retried + report.dead_lettered,
        "{report:?}"
    );
    assert_eq!(report.handled + report.dead_lettered, n, "{report:?}");
}

pub async fn one_by_one(mode: Mode, concurrency: usize) -> Vec<Option<&'static str>> {
    let ids: Vec<u64> = (1..=N).collect();
    let script = Script::of(ids.clone(), mode, None);
    let listener = Scripted::new(act);
    let letters = Arc::new(Letters::default());
    let options = ListenerOptions::new()
        .retry(policy())
        .concurrency(concurrency);
    let report = run_with_deadline(runner::run(
        listener.clone(),
        script.clone(),
        letters.clone(),
        options,
    ))
    .await;
    let (acked, terminated) = script.check_exactly_once(&ids);
    check_identities(&report, N);

    // What each event should have come to, and through which attempts.
    let mut expected_panicked = 0;
    let mut expected_retried = 0;
    for &id in &ids {
        let mut ends_ok = false;
        let mut tried = Vec::new();
        for attempt in 1..=MAX_ATTEMPTS {
            tried.push((id, attempt));
            let act = act(id, attempt);
            expected_panicked += u64::from(panics(act));
            if succeeds(act) {
                ends_ok = true;
                break;
            }
            if attempt < MAX_ATTEMPTS {
                expected_retried += 1;
            }
        }
        let seen: Vec<(u64, u32)> = listener
            .seen()
            .into_iter()
            .filter(|(i, _)| *i == id)
            .collect();
        assert_eq!(seen, tried, "attempts of {id}");
        assert_eq!(acked.contains(&id), ends_ok, "outcome of {id}");
        assert_eq!(terminated.contains(&id), !ends_ok, "outcome of {id}");
    }
    assert_eq!(report.panicked, expected_panicked, "{report:?}");
    assert_eq!(report.retried, expected_retried, "{report:?}");
    assert_eq!(
        letters.letters.lock().unwrap().len() as u64,
        report.dead_lettered
    );
    // Every handler future made was dropped exactly once.
    assert_eq!(
        listener.drops.load(Ordering::SeqCst),
        listener.made.load(Ordering::SeqCst)
    );
    if mode == Mode::Redelivered {
        // The source ended before redeliveries came back and was polled again.
        let log = script.log();
        let last_end = log.iter().rposition(|(_, w)| *w == What::Ended).unwrap();
        assert_eq!(last_end, log.len() - 1, "ended last");
    }
    listener.spans.lock().unwrap().clone()
}

/// A batch listener: the events whose act is `Fail` are named; a panicking
/// act of any event fails the whole batch the way it says.
#[derive(Clone, Default)]
pub struct BatchScripted {
    pub spans: Arc<Mutex<Vec<Option<&'static str>>>>,
    /// Each call's attempts, and whether it panicked.
    calls: Arc<Mutex<Vec<(super::Attempts, bool)>>>,
}

impl BatchListener<super::Ev> for BatchScripted {
    fn name(&self) -> &str {
        "batch-scripted"
    }

    fn handle_batch(
        &self,
        batch: &Batch<super::Ev>,
    ) -> impl std::future::Future<Output = Result<(), BatchError>> + Send {
        let events: Vec<(u64, u32)> = batch
            .iter()
            .zip(batch.attempts())
            .map(|(e, a)| (id_of(e), *a))
            .collect();
        let span = super::current_span_name();
        self.spans.lock().unwrap().push(span);
        let acts: Vec<Act> = events.iter().map(|&(id, a)| act(id, a)).collect();
        let panicking = acts.iter().copied().find(|a| panics(*a));
        self.calls
            .lock()
            .unwrap()
            .push((events.clone(), panicking.is_some()));
        if panicking == Some(Act::PanicOnMake) {
            panic!("batch panic in make");
        }
        let failed: Vec<usize> = acts
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == Act::Fail)
            .map(|(i, _)| i)
            .collect();
        async move {
            tokio::task::yield_now().await;
            if let Some(p) = panicking {
                if p != Act::PanicOnMake {
                    panic!("batch panic in poll");
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(BatchError::events(failed, "scripted failure"))
            }
        }
    }
}

pub async fn batches(
    mode: Mode,
    concurrency: usize,
    failure: BatchFailure,
    max_batch: usize,
) -> Vec<Option<&'static str>> {
    let ids: Vec<u64> = (1..=N).collect();
    let script = Script::of(ids.clone(), mode, None);
    let listener = BatchScripted::default();
    let letters = Arc::new(Letters::default());
    let options = ListenerOptions::new()
        .retry(policy())
        .concurrency(concurrency)
        .max_batch(max_batch)
        .batch_failure(failure);
    let report = run_with_deadline(runner::run(
        listener.clone(),
        script.clone(),
        letters.clone(),
        options,
    ))
    .await;
    script.check_exactly_once(&ids);
    check_identities(&report, N);
    // Every event that always fails is a dead letter, after its last attempt.
    let letters = letters.letters.lock().unwrap().clone();
    let by_id: BTreeMap<u64, u32> = letters.iter().map(|(id, _, a)| (*id, *a)).collect();
    for id in ids.iter().filter(|id| *id % 7 == 0) {
        assert_eq!(
            by_id.get(id),
            Some(&MAX_ATTEMPTS),
            "dead letter of {id}: {letters:?}"
        );
    }
    let calls = listener.calls.lock().unwrap().clone();
    let expected_panicked: u64 = calls
        .iter()
        .filter(|(_, p)| *p)
        .map(|(events, _)| match failure {
            BatchFailure::Independent => events.len() as u64,
            _ => 1,
        })
        .sum();
    assert_eq!(report.panicked, expected_panicked, "{report:?} {calls:?}");
    listener.spans.lock().unwrap().clone()
}
