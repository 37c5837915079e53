//! Procedural macros for [`event-bus`](https://docs.rs/event-bus).
//!
//! Use them through `event_bus`, which re-exports them; this crate is not
//! meant to be a direct dependency.
