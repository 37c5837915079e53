//! A consumer group across real OS processes: two child processes of this
//! test binary join one group on a nats-server of the test's own, and
//! between them handle each event once; and when one is SIGKILLed in the
//! middle of its handlers, the other handles what it left, the only events
//! handled twice being those the killed one was handed and may have
//! finished without the server hearing of it. The tests are ignored in a
//! plain `cargo test`:
//! `cargo test --test nats_processes -- --include-ignored`.
//!
//! The children run [`child_process_worker`], which does nothing unless
//! [`CHILD_URL`] is set in its environment, as only the parent sets it.

#[allow(dead_code)]
#[path = "nats_tier/server.rs"]
mod server;

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::nats::{Config, Distributed, JetStream, Start};
use event_bus::{DomainEvent, Envelope, HandlerError, Listener, ListenerOptions, Meta};
use serde::{Deserialize, Serialize};
use server::NatsServer;
use tokio::time::Instant;

/// The server a child connects to; a child without it does nothing.
const CHILD_URL: &str = "EVENT_BUS_CHILD_NATS_URL";
/// The file a child appends its lines to.
const CHILD_OUT: &str = "EVENT_BUS_CHILD_OUT";
/// How long a child's handler works on each event, in milliseconds.
const CHILD_WORK_MS: &str = "EVENT_BUS_CHILD_WORK_MS";
/// The child's `ack_wait`, in milliseconds.
const CHILD_ACK_WAIT_MS: &str = "EVENT_BUS_CHILD_ACK_WAIT_MS";
/// The child test's name, which the parent runs with `--exact`.
const CHILD_TEST: &str = "child_process_worker";

/// The stream's prefix and the group both children join.
const PREFIX: &str = "procs";
const GROUP: &str = "workers";
/// Each child's concurrency, and the group's `max_ack_pending`.
const CONCURRENCY: usize = 4;
/// The longest a child lives: it also ends when its stdin closes, that is
/// when the parent is gone.
const CHILD_LIFETIME: Duration = Duration::from_secs(180);
/// How long the parent waits for anything the children do.
const DEADLINE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
enum Work {
    Job(u64),
}

impl Work {
    fn value(&self) -> u64 {
        match *self {
            Self::Job(value) => value,
        }
    }
}

// ---------------------------------------------------------------- child --

/// The child's listener: appends `begin value attempt` to its file, works
/// `work` on the event, then appends `value attempt`, one write per line.
struct Recorder {
    out: Mutex<File>,
    work: Duration,
}

impl Recorder {
    fn line(&self, line: &str) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap();
        out.write_all(line.as_bytes())?;
        out.flush()
    }
}

impl Listener<Work> for Recorder {
    fn name(&self) -> &str {
        GROUP
    }

    async fn handle(&self, event: Arc<Envelope<Work>>, meta: Meta) -> Result<(), HandlerError> {
        let (value, attempt) = (event.value(), meta.attempt());
        if !self.work.is_zero() {
            self.line(&format!("begin {value} {attempt}\n"))?;
            // The handler's own work, during which the test kills a child.
            tokio::time::sleep(self.work).await;
        }
        self.line(&format!("{value} {attempt}\n"))?;
        Ok(())
    }
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .map(|ms| Duration::from_millis(ms.parse().expect("milliseconds")))
}

/// A worker process's body: a no-op in a normal run; in a child the parent
/// spawned, it joins the group, writes `ready`, and handles events until it
/// is killed, its stdin closes, or [`CHILD_LIFETIME`] has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_worker() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let out_path = std::env::var_os(CHILD_OUT).expect("the child's output file");
    let mut out = OpenOptions::new()
        .append(true)
        .create(true)
        .open(out_path)
        .expect("open the child's output file");
    let work = env_ms(CHILD_WORK_MS).unwrap_or_default();
    let mut distributed = Distributed::new()
        .group(GROUP)
        .start(Start::Beginning)
        .max_ack_pending(CONCURRENCY);
    if let Some(ack_wait) = env_ms(CHILD_ACK_WAIT_MS) {
        distributed = distributed.ack_wait(ack_wait);
    }
    let jetstream = JetStream::<Work>::connect(&url, Config::new(PREFIX))
        .await
        .expect("the child connects");
    let recorder = Recorder {
        out: Mutex::new(out.try_clone().expect("a second handle on the file")),
        work,
    };
    jetstream
        .spawn_with(
            recorder,
            ListenerOptions::new().concurrency(CONCURRENCY),
            distributed,
        )
        .await
        .expect("the child joins the group");
    out.write_all(b"ready\n").expect("write ready");
    out.flush().expect("flush ready");
    // The parent holds the other end of stdin: end when it is gone.
    let parent_gone = tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    });
    tokio::select! {
        _ = parent_gone => {}
        () = tokio::time::sleep(CHILD_LIFETIME) => {}
    }
    std::process::exit(0);
}

// --------------------------------------------------------------- parent --

/// The children of one test, killed (SIGKILL) and reaped when dropped, on
/// every path out of the test.
struct Children(Vec<Child>);

impl Children {
    fn kill(&mut self, index: usize) {
        let child = &mut self.0[index];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`) to a child.
    fn signal(&self, index: usize, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0[index].id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} child {index}");
    }

    /// Panics if a child ended by itself: it failed.
    fn assert_running(&mut self) {
        for (index, child) in self.0.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("child {index} ended by itself: {status}");
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for index in 0..self.0.len() {
            self.kill(index);
        }
    }
}

/// Starts a child of this test binary running [`CHILD_TEST`] against
/// `server`, writing to `out`.
fn spawn_child(server: &NatsServer, out: &Path, work_ms: u64, ack_wait_ms: Option<u64>) -> Child {
    let exe = std::env::current_exe().expect("the test binary");
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            CHILD_TEST,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, server.url())
        .env(CHILD_OUT, out)
        .env(CHILD_WORK_MS, work_ms.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(ms) = ack_wait_ms {
        command.env(CHILD_ACK_WAIT_MS, ms.to_string());
    }
    command.spawn().expect("spawn a child process")
}

/// What a child wrote: whether it was ready, and each `(value, attempt)`
/// it handled, in order. A last line not yet complete is left out.
#[derive(Debug, Default)]
struct Output {
    ready: bool,
    begun: Vec<(u64, u32)>,
    handled: Vec<(u64, u32)>,
}

impl Output {
    /// The events it began and did not finish: their handler had not
    /// returned, so they were not acked.
    fn unfinished(&self) -> Vec<u64> {
        let handled: HashSet<u64> = self.handled.iter().map(|&(value, _)| value).collect();
        self.begun
            .iter()
            .map(|&(value, _)| value)
            .filter(|value| !handled.contains(value))
            .collect()
    }
}

fn read_output(path: &Path) -> Output {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut output = Output::default();
    for line in complete.lines() {
        if line == "ready" {
            output.ready = true;
            continue;
        }
        let (list, line) = match line.strip_prefix("begin ") {
            Some(rest) => (&mut output.begun, rest),
            None => (&mut output.handled, line),
        };
        let (value, attempt) = line.split_once(' ').expect("`value attempt`");
        list.push((
            value.parse().expect("a value"),
            attempt.parse().expect("an attempt"),
        ));
    }
    output
}

/// Polls the children's files until `condition` holds of them, checking
/// that neither ended by itself; panics after [`DEADLINE`].
async fn until_outputs(
    what: &str,
    children: &mut Children,
    paths: &[PathBuf],
    mut condition: impl FnMut(&[Output]) -> bool,
) -> Vec<Output> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let outputs: Vec<Output> = paths.iter().map(|path| read_output(path)).collect();
        if condition(&outputs) {
            return outputs;
        }
        children.assert_running();
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {DEADLINE:?}: {:?}",
            outputs
                .iter()
                .map(|output| (output.ready, output.handled.len()))
                .collect::<Vec<_>>()
        );
        // A poll of the files, bounded by the deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn distinct(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .flat_map(|output| output.handled.iter().map(|&(value, _)| value))
        .collect::<HashSet<_>>()
        .len()
}

/// Starts a server and two children, waits until both are in the group,
/// and publishes events `0..events`.
async fn two_workers_and_events(
    dir: &Path,
    events: u64,
    work_ms: u64,
    ack_wait_ms: Option<u64>,
) -> (NatsServer, Children, Vec<PathBuf>) {
    let server = NatsServer::start();
    let jetstream = JetStream::<Work>::connect(&server.url(), Config::new(PREFIX))
        .await
        .expect("the parent connects");
    let paths: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|name| dir.join(format!("{name}.log")))
        .collect();
    let mut children = Children(Vec::new());
    for path in &paths {
        children
            .0
            .push(spawn_child(&server, path, work_ms, ack_wait_ms));
    }
    until_outputs(
        "both children to join the group",
        &mut children,
        &paths,
        |outputs| outputs.iter().all(|output| output.ready),
    )
    .await;
    let started = std::time::Instant::now();
    for value in 0..events {
        jetstream
            .publish(Work::Job(value))
            .await
            .expect("the stream stores the event");
    }
    eprintln!("published {events} events in {:?}", started.elapsed());
    jetstream.shutdown(Duration::from_secs(10)).await;
    (server, children, paths)
}

/// For each value, the attempts at which each child handled it.
fn by_value(outputs: &[Output]) -> BTreeMap<u64, Vec<Vec<u32>>> {
    let mut seen: BTreeMap<u64, Vec<Vec<u32>>> = BTreeMap::new();
    for (index, output) in outputs.iter().enumerate() {
        for &(value, attempt) in &output.handled {
            seen.entry(value)
                .or_insert_with(|| vec![Vec::new(); outputs.len()])[index]
                .push(attempt);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_group_shares_events_once_across_two_processes() {
    const EVENTS: u64 = 4_000;
    let dir = tempfile::tempdir().expect("a directory for the children's files");
    let started = std::time::Instant::now();
    let (_server, mut children, paths) = two_workers_and_events(dir.path(), EVENTS, 0, None).await;
    let outputs = until_outputs(
        "the two children to handle every event",
        &mut children,
        &paths,
        |outputs| distinct(outputs) == EVENTS as usize,
    )
    .await;
    children.kill(0);
    children.kill(1);
    // Read again once both are dead: anything written after the poll.
    let outputs_after: Vec<Output> = paths.iter().map(|path| read_output(path)).collect();
    eprintln!(
        "handled {EVENTS} events across two processes in {:?}: {} and {}",
        started.elapsed(),
        outputs_after[0].handled.len(),
        outputs_after[1].handled.len()
    );
    assert!(outputs_after[0].handled.len() >= outputs[0].handled.len());

    let seen = by_value(&outputs_after);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..EVENTS).collect::<Vec<_>>(),
        "every event handled"
    );
    let twice: Vec<_> = seen
        .iter()
        .filter(|(_, attempts)| attempts.iter().map(Vec::len).sum::<usize>() != 1)
        .collect();
    assert!(twice.is_empty(), "events handled more than once: {twice:?}");
    assert!(
        outputs_after
            .iter()
            .all(|output| output.handled.iter().all(|&(_, attempt)| attempt == 1)),
        "no event redelivered"
    );
    assert!(
        outputs_after
            .iter()
            .all(|output| !output.handled.is_empty()),
        "both processes share the group's work: {} and {}",
        outputs_after[0].handled.len(),
        outputs_after[1].handled.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server"]
async fn a_process_killed_mid_handler_leaves_its_events_to_the_other() {
    const EVENTS: u64 = 2_000;
    const WORK_MS: u64 = 5;
    const KILL_AFTER: usize = 100;
    let dir = tempfile::tempdir().expect("a directory for the children's files");
    let started = std::time::Instant::now();
    let (_server, mut children, paths) =
        two_workers_and_events(dir.path(), EVENTS, WORK_MS, Some(1_000)).await;
    // Kill whichever has handled some first, while a handler of it works:
    // stopped first (SIGSTOP), its file is what it was doing when killed;
    // between handlers, it goes on (SIGCONT) and is looked at again.
    let ripe =
        |output: &Output| output.handled.len() >= KILL_AFTER && !output.unfinished().is_empty();
    let mut tries = 0;
    let (killed, killed_output) = loop {
        let outputs = until_outputs("a child to handle some", &mut children, &paths, |outputs| {
            outputs.iter().any(ripe)
        })
        .await;
        let candidate = usize::from(!ripe(&outputs[0]));
        children.signal(candidate, "STOP");
        let output = read_output(&paths[candidate]);
        if ripe(&output) {
            children.kill(candidate);
            break (candidate, output);
        }
        children.signal(candidate, "CONT");
        tries += 1;
        assert!(tries < 100, "no child caught mid-handler in {tries} tries");
    };
    let survivor = 1 - killed;
    assert!(
        distinct(std::slice::from_ref(&killed_output)) < EVENTS as usize,
        "the child was killed before the group was done"
    );
    // Only the survivor is left to poll; the killed one's file is final.
    let mut survivor_children = Children(vec![children.0.remove(survivor)]);
    let survivor_path = paths[survivor].clone();
    let survivor_output = until_outputs(
        "the survivor to handle the rest",
        &mut survivor_children,
        std::slice::from_ref(&survivor_path),
        |outputs| {
            let union: HashSet<u64> = outputs[0]
                .handled
                .iter()
                .chain(&killed_output.handled)
                .map(|&(value, _)| value)
                .collect();
            union.len() == EVENTS as usize
        },
    )
    .await
    .remove(0);
    survivor_children.kill(0);
    let survivor_output = {
        let after = read_output(&survivor_path);
        assert!(after.handled.len() >= survivor_output.handled.len());
        after
    };
    eprintln!(
        "killed child {killed} after {} events, the survivor handled {}, in {:?}",
        killed_output.handled.len(),
        survivor_output.handled.len(),
        started.elapsed()
    );

    // What the killed child was in the middle of was never acked: the
    // server handed it to the survivor again once its ack_wait passed.
    let unfinished = killed_output.unfinished();
    eprintln!("the killed child was in the handler of {unfinished:?}");
    assert!(!unfinished.is_empty(), "the child was killed mid-handler");
    for value in &unfinished {
        let again = survivor_output.handled.iter().find(|&&(v, _)| v == *value);
        assert!(
            matches!(again, Some(&(_, attempt)) if attempt >= 2),
            "event {value}, unfinished by the killed child, redelivered to the survivor: {again:?}"
        );
    }
    let mut outputs = vec![Output::default(), Output::default()];
    outputs[killed] = killed_output;
    outputs[survivor] = survivor_output;
    let seen = by_value(&outputs);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..EVENTS).collect::<Vec<_>>(),
        "no event lost"
    );
    let mut duplicates = Vec::new();
    for (value, attempts) in &seen {
        assert!(
            attempts[killed].len() <= 1,
            "the killed child handled {value} twice: {attempts:?}"
        );
        assert!(
            attempts[survivor].len() <= 1,
            "the survivor handled {value} twice: {attempts:?}"
        );
        if attempts[killed].len() == 1 && attempts[survivor].len() == 1 {
            assert!(
                attempts[survivor][0] >= 2,
                "event {value} handled by both, the survivor's not a redelivery: {attempts:?}"
            );
            duplicates.push(*value);
        }
    }
    eprintln!("handled by both: {duplicates:?}");
    assert!(
        duplicates.len() <= CONCURRENCY,
        "more events handled by both than were out to the group at once: {duplicates:?}"
    );
}
