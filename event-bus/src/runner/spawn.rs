//! A tier's listener task: the run spawned inside a panic catch, its end
//! recorded in the listener's status, and a flag its handle waits on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ListenerCore, panicked};
use crate::metrics::ListenerStatus;

/// Spawns `run`, the run of `core`'s listener: it ends `Drained` when the
/// run returns, `Crashed` (logged) when the runtime panics. The receiver
/// turns `true` once the task has ended, however: return, panic or abort.
pub(crate) fn spawn_run<F>(
    core: Arc<ListenerCore>,
    run: F,
) -> (JoinHandle<()>, watch::Receiver<bool>)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done) = watch::channel(false);
    let task = tokio::spawn(async move {
        let _done = Done(done_tx);
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(()) => core.end(ListenerStatus::Drained),
            Err(payload) => {
                tracing::error!(
                    listener = %core.name,
                    error = %panicked(&*payload),
                    "the listener's runtime panicked; the listener stopped (what it held is delivered again)",
                );
                core.end(ListenerStatus::Crashed);
            }
        }
    });
    (task, done)
}

/// Marks a listener's task ended when dropped: on return, panic or abort.
struct Done(watch::Sender<bool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}
