//! The memory tier: per-listener queues in the process, fed by
//! [`EventBus::emit`], with priority lanes, fairness, lag policies, the
//! bus-wide sequence and [`EventBus::quiesce`].

pub(crate) mod bus;
pub(crate) mod dead_letters;
pub(crate) mod listeners;
pub(crate) mod queue;
pub(crate) mod runtime;
pub(crate) mod shared;
pub(crate) mod source;
pub(crate) mod subscription;
