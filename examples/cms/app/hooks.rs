//! Points where the CMS can be held mid-way until a test lets it go on, so
//! that a state too brief to catch otherwise (the index being rebuilt,
//! searches in progress) is checked without timing luck. Nothing is ever
//! held unless a test puts a [`Gate`] in [`Config::hooks`](super::Config).

use std::sync::Arc;

use tokio::sync::watch;

/// Where the CMS waits, if a gate is set there; none by default.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    /// The replay that fills an index opened empty waits here at each
    /// batch until the gate opens, before it writes the index: searches
    /// answer from the database meanwhile.
    pub(crate) rebuild: Option<Gate>,
    /// Each search of the index waits here on the blocking pool, holding
    /// its slot of the few that may run at once.
    pub(crate) search: Option<Gate>,
}

/// A gate, closed until [`open`](Self::open)ed, that counts who reached it.
/// Clones share one gate.
#[derive(Debug, Clone)]
pub(crate) struct Gate(Arc<watch::Sender<Passage>>);

#[derive(Debug, Default)]
struct Passage {
    arrived: usize,
    open: bool,
}

impl Gate {
    /// A closed gate.
    #[allow(dead_code)] // made by the tests only
    pub(crate) fn closed() -> Self {
        Self(Arc::new(watch::Sender::new(Passage::default())))
    }

    /// Waits until the gate is open.
    pub(crate) async fn pass(&self) {
        self.0.send_modify(|p| p.arrived += 1);
        // The sender lives as long as `self`.
        let _ = self.0.subscribe().wait_for(|p| p.open).await;
    }

    /// [`pass`](Self::pass) on a thread of the blocking pool.
    ///
    /// # Panics
    ///
    /// Off a thread of a tokio runtime's blocking pool.
    pub(crate) fn pass_blocking(&self) {
        tokio::runtime::Handle::current().block_on(self.pass());
    }

    /// Waits until `n` have reached the gate, passed or not.
    #[allow(dead_code)] // for the tests
    pub(crate) async fn arrivals(&self, n: usize) {
        let _ = self.0.subscribe().wait_for(|p| p.arrived >= n).await;
    }

    /// How many have reached the gate, passed or not.
    #[allow(dead_code)] // for the tests
    pub(crate) fn arrived(&self) -> usize {
        self.0.borrow().arrived
    }

    /// Lets through whoever waits and whoever comes later.
    #[allow(dead_code)] // for the tests
    pub(crate) fn open(&self) {
        self.0.send_modify(|p| p.open = true);
    }
}
