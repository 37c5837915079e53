//! [`Routes`]: how an event type hands each event to the method of a handler
//! written for it. `#[derive(DomainEvent)]` implements it; `#[listener]`
//! turns a handler into a [`Listener`](crate::Listener) through it.

use std::future::Future;

use crate::error::HandlerError;
use crate::event::Event;

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

    /// Calls `handler`'s method for the variant of `event`.
    fn route<'a>(
        handler: &'a H,
        event: &'a Self,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}
