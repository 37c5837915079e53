//! The distributed tier: events in a NATS JetStream stream, the same
//! listeners in many processes (feature `nats`). Needs nats-server 2.9 or
//! later, with JetStream enabled.
//!
//! A [`JetStream`] handle owns three streams: the event stream, where an
//! event of name `user.created` is published on `<prefix>.user.created`,
//! the dead-letter stream `<STREAM>_DLQ` on `<prefix>_dlq.<listener>`, and
//! the advisory stream `<STREAM>_ADV`, where the server's word that it gave
//! up delivering an event waits to become its dead letter.
//! The same `#[listener]` code as on the bus is spawned on the handle; each
//! listener pulls from a durable consumer of its own.
//!
//! # Guarantees
//!
//! - **Publishing waits for the stream**: [`JetStream::publish`] returns
//!   once the stream has stored the event, or an error. A publish is tried
//!   again over [`Config::publish_retry`] (a server restarting, a lost
//!   connection); the event's id is its `Nats-Msg-Id`, so a retried
//!   publish is stored once, and [`JetStream::new`] checks that the
//!   stream's duplicate window covers the retry span. Its trace context
//!   travels in the payload and in the `traceparent` header. Through
//!   [`Publish`](crate::Publish) (the derive's `emit_*` helpers), publishing
//!   never blocks; an event not stored is logged and counted
//!   ([`JetStream::unpublished`]), never dropped silently.
//! - **The outbox relay** (with a `sql` feature):
//!   [`JetStream::spawn_relay`] spawns a [`Relay`] on a durable store, a
//!   listener of the group `nats-relay` that publishes every event the
//!   application commits in the store's outbox into the stream, with its
//!   own id and trace context, in log order (from one process; relays in
//!   several interleave their batches, see [`Relay`]). The store's
//!   checkpoint marks what was published, so a commit and its publish need no distributed
//!   transaction: an event is published at least once after its commit,
//!   a server outage delays it (retried, each retry persisted), and a
//!   publish made again is stored once, as the relay checks at spawn that
//!   the stream's duplicate window covers its retries (not a relay down
//!   for longer than the window, which publishes its last batch again).
//! - **At least once, per group**: a group listener
//!   ([`Scope::Group`](crate::Scope::Group), the default) is a durable pull
//!   consumer named after the listener (or [`Distributed::group`]): every
//!   process that spawns it shares its events, each handled by one of
//!   them. An instance listener ([`Scope::Instance`](crate::Scope::Instance))
//!   has a consumer per process (`<name>@<instance>`), so every process
//!   handles every event. An event not acked within `ack_wait` (its process
//!   died) is delivered again; a handler that works longer extends it
//!   (`AckProgress`, every third of `ack_wait`), as the listener's pump
//!   does for what waits for the handler (behind a slow batch).
//! - **Bounded prefetch**: a consumer's `max_ack_pending` is what the
//!   listener handles at once (its concurrency, times `max_batch` for a
//!   batch listener): no more are out unfinished, so a restart has no
//!   more than that to hand out again. With a concurrency of 1, a listener
//!   handles its events in stream order, a retried one holding back the
//!   next. (Not quite for a batch listener under `StopAtFirst`: the rest of
//!   a failed event's batch waits behind it, but events the server hands
//!   out while it waits, when its batch had room for more, may come first.)
//! - **Retries are the server's**: a failed attempt is a `nak` with the
//!   listener's [`RetryPolicy`](crate::RetryPolicy) delay; the attempt a
//!   handler sees is the server's delivery count, so it holds across
//!   processes. After the last attempt the dead letter (the event's bytes
//!   and headers, the listener, the attempts, the last error) is written to
//!   the dead-letter stream, then the message is terminated (`AckTerm`): it
//!   is never delivered to that listener again. An event that does not
//!   decode is dead-lettered at once, with the reason. The consumer's
//!   `max_deliver` is the policy's attempts plus one, so an event whose
//!   last attempt was cut short still ends handled or dead-lettered.
//!   The server counts deliveries it sent, not attempts made: deliveries
//!   lost on their way (a connection that stalls without closing, a
//!   partition the client does not see) or cut short count too, and past
//!   `max_deliver` the server delivers the event no more. It says so in a
//!   max-deliveries advisory, which the advisory stream `<STREAM>_ADV`
//!   keeps until a process of the listener takes it (at most 30 days, or
//!   the event stream's `max_age`); that process writes the event's dead
//!   letter (its attempts are the deliveries, its error names
//!   `max_deliver`) an `ack_wait` after the advisory and once the event
//!   is no longer in a handler of its, unless it handled the event itself
//!   (a delivery that came late), and a shutdown
//!   writes those waiting for it before it returns (within its deadline).
//!   Every event a listener's consumer is handed ends handled or in the
//!   dead-letter stream; one handled late in another process of the group
//!   may end in both. (The letter is not counted in a
//!   [`RunReport`](crate::runner::RunReport): no handler of this process
//!   failed it.) Where another stream of the account already keeps these
//!   advisories (`$JS.EVENT.ADVISORY.>`, say), the tier starts without the
//!   advisory stream and logs a warning: such events are then not
//!   dead-lettered.
//! - **Dead letters** are listed ([`JetStream::dead_letters`]), redriven to
//!   their listener alone ([`JetStream::redrive`]: published again with an
//!   `Event-Bus-Redrive` header naming it, which other listeners ack
//!   unhandled) and discarded ([`JetStream::discard`]). A letter stays
//!   under the server's `max_payload`: its error is shortened to fit, and
//!   an event too large to keep beside its headers is kept by its size
//!   ([`DeadMessage::dropped`]) and read back from the event stream by a
//!   redrive.
//! - **Reconnects**: the client reconnects by itself; pulls are made
//!   again once it has. Acks lost meanwhile mean redeliveries, never loss.
//! - **Shutdown drains**: [`JetStream::shutdown`] refuses new publishes,
//!   stores those handed over, lets every listener pull until its consumer
//!   has nothing more for it, finish and ack what it holds, then stop.
//!
//! # Consumer layout
//!
//! One consumer per listener (per group, or per process for an instance
//! listener). nats-server 2.9 gives a consumer one filter subject, so a
//! listener interested in one kind filters on its subject, and any other
//! on `<prefix>.>`, its pump acking unhandled the events of other kinds.
//! One consumer per kind would keep a listener's order only within a kind,
//! multiply its `max_ack_pending`, and have a redrive find the right one.
//!
//! # Examples
//!
//! ```no_run
//! use event_bus::nats::{Config, Distributed, JetStream};
//! use event_bus::{DomainEvent, HandlerError, ListenerOptions, RetryPolicy, listener};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
//! enum Shop {
//!     OrderPaid { order: u64 },
//! }
//!
//! struct Receipts;
//!
//! #[listener]
//! impl ShopHandler for Receipts {
//!     async fn on_order_paid(&self, order: &u64) -> Result<(), HandlerError> {
//!         println!("receipt for order {order}");
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let shop = JetStream::<Shop>::connect("nats://127.0.0.1:4222", Config::new("shop")).await?;
//!
//! // Every process that spawns `Receipts` shares its events.
//! let options = ListenerOptions::new().retry(RetryPolicy::exponential(5));
//! let receipts = shop.spawn_with(Receipts, options, Distributed::new()).await?;
//!
//! // Returns once the stream has stored the event.
//! shop.publish(Shop::OrderPaid { order: 7 }).await?;
//!
//! shop.shutdown(std::time::Duration::from_secs(5)).await;
//! println!("{:?}", receipts.report());
//! # Ok(())
//! # }
//! ```

mod advisories;
mod dead_letters;
mod jetstream;
mod names;
mod relay;
mod source;

pub use self::dead_letters::DeadMessage;
pub use self::jetstream::{Config, Distributed, JetStream, JetStreamListener, Start};
pub use self::relay::Relay;
pub use self::source::JetStreamDelivery;
pub use crate::error::NatsError as Error;
