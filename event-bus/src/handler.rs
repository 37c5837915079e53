//! [`Routes`] and [`BatchRoutes`]: how an event type hands each event, or
//! each run of one kind in a batch, to the method of a handler written for
//! it. `#[derive(DomainEvent)]` implements them; `#[listener]` turns a
//! handler into a [`Listener`](crate::Listener) or a
//! [`BatchListener`](crate::BatchListener) through them.

use std::future::Future;

use crate::batch::{Batch, BatchError};
use crate::error::HandlerError;
use crate::event::Event;
use crate::meta::Meta;

/// An event type that routes each of its events to the matching method of a
/// handler `H`.
///
/// `#[derive(DomainEvent)]` implements `Routes<H>` for every `H` that
/// implements the generated handler trait (`AppEventHandler` for
/// `AppEvent`): [`route`](Routes::route) is the generated exhaustive `match`
/// and [`kind_of`](Routes::kind_of) maps `on_user_created` to
/// `AppEventKind::UserCreated`. The `#[listener]` attribute on an
/// `impl AppEventHandler for MyListener` block then implements
/// [`Listener`](crate::Listener) for `MyListener`, with the kinds of the
/// methods that block defines as its interests.
///
/// Implementing it by hand is possible (the repository's tests compare the
/// derive's output with a hand-written equivalent) but rarely useful.
pub trait Routes<H: ?Sized>: Event {
    /// The kind whose events go to the handler method named `method`, such as
    /// `"on_user_created"`; `None` for a name that is not a handler method.
    fn kind_of(method: &str) -> Option<Self::Kind>;

    /// Calls `handler`'s method for the variant of `event`, with `meta`.
    fn route<'a>(
        handler: &'a H,
        event: &'a Self,
        meta: Meta,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

/// An event type that splits a batch of its events into runs of
/// consecutive events of one kind and hands each run's payloads, in batch
/// order, to the matching method of a batch handler `H`.
///
/// `#[derive(DomainEvent)]` implements `BatchRoutes<H>` for every `H` that
/// implements the generated batch handler trait (`AppEventBatchHandler` for
/// `AppEvent`). The `#[listener]` attribute on an
/// `impl AppEventBatchHandler for MyIndexer` block then implements
/// [`BatchListener`](crate::BatchListener) for `MyIndexer`, with the kinds
/// of the methods that block defines as its interests.
pub trait BatchRoutes<H: ?Sized>: Event + Sized {
    /// The kind whose events go to the batch handler method named `method`,
    /// such as `"on_post_published"`; `None` for a name that is not one.
    fn kind_of(method: &str) -> Option<Self::Kind>;

    /// Calls `handler`'s method of each maximal run of one kind in `batch`
    /// with that run's payloads, one run after the other in batch order,
    /// and maps the failures they report back to `batch`. Under
    /// [`BatchFailure::StopAtFirst`](crate::BatchFailure::StopAtFirst) it
    /// calls no run after the first that
    /// fails.
    fn route_batch<'a>(
        handler: &'a H,
        batch: &'a Batch<Self>,
    ) -> impl Future<Output = Result<(), BatchError>> + Send + 'a;
}
