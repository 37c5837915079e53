//! The synchronization primitives of the crate's hand-written protocols.
//!
//! Normally std's mutex and atomics and tokio's `Notify`. Under
//! `RUSTFLAGS="--cfg loom"` they are loom's, and `Notify` is a small model
//! with tokio's semantics for the part the crate uses, so the loom tests in
//! `src/loom_tests.rs` explore every interleaving of the real queue and
//! quiesce code.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use tokio::sync::Notify;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom_notify::Notify;

use std::sync::PoisonError;

/// The full fence between the two accesses of each side of a Dekker pair:
/// a waiter counts itself, then checks the condition; a notifier changes
/// the condition, then reads the count. With a sequentially consistent
/// fence on both sides, at least one sees the other, so a waiter is never
/// left asleep. (The accesses themselves may be relaxed; the fences carry
/// the order, which is also what loom can check.)
pub(crate) fn dekker_fence() {
    fence(Ordering::SeqCst);
}

/// Locks a mutex, ignoring poisoning: no code that can panic runs while the
/// crate's locks are held, and a poisoned lock still guards consistent data.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits until `condition` holds, checking it again whenever `notify`
/// notifies its waiters. The wake-up is armed before each check, so a
/// notification between a check and the wait is never missed.
pub(crate) async fn wait_until(notify: &Notify, mut condition: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if condition() {
            return;
        }
        notified.await;
    }
}

/// A model of `tokio::sync::Notify` for loom, covering what the crate uses:
/// `notified()` (whose future completes after any `notify_waiters` call made
/// after its creation, as tokio's does), `enable`, and `notify_waiters`.
#[cfg(loom)]
mod loom_notify {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use loom::sync::Mutex;

    #[derive(Debug, Default)]
    pub(crate) struct Notify {
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        calls: u64,
        wakers: Vec<Waker>,
    }

    impl Notify {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        pub(crate) fn notified(&self) -> Notified<'_> {
            let calls = self.state.lock().unwrap().calls;
            Notified {
                notify: self,
                calls,
            }
        }

        pub(crate) fn notify_waiters(&self) {
            let wakers = {
                let mut state = self.state.lock().unwrap();
                state.calls += 1;
                std::mem::take(&mut state.wakers)
            };
            for waker in wakers {
                waker.wake();
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Notified<'a> {
        notify: &'a Notify,
        calls: u64,
    }

    impl Notified<'_> {
        /// tokio's `enable` registers for `notify_one`; `notify_waiters`
        /// is seen from creation on, which the model already does.
        pub(crate) fn enable(self: Pin<&mut Self>) -> bool {
            false
        }
    }

    impl Future for Notified<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut state = self.notify.state.lock().unwrap();
            if state.calls != self.calls {
                return Poll::Ready(());
            }
            state.wakers.push(cx.waker().clone());
            Poll::Pending
        }
    }
}
