//! Procedural macros for [`event-bus`](https://docs.rs/event-bus):
//! `#[derive(DomainEvent)]` and `#[listener]`.
//!
//! Use them through `event_bus`, which re-exports them and documents them
//! (`event_bus::DomainEvent`, `event_bus::listener`); this crate is not meant
//! to be a direct dependency.

mod ast;
mod attr;
mod case;
mod ctxt;
mod expand;
mod listener;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `Event` for an enum, with its kind enum, emit helpers, handler
/// trait and routing. Documented at `event_bus::DomainEvent`.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}

/// Makes an `impl AppEventHandler for T` block a `Listener`, subscribed to
/// the kinds of the `on_*` methods it defines. Documented at
/// `event_bus::listener`.
#[proc_macro_attribute]
pub fn listener(args: TokenStream, item: TokenStream) -> TokenStream {
    listener::expand(args.into(), item.into()).into()
}
