//! The scenario suite on the distributed tier over NATS JetStream: a
//! nats-server of its own per scenario (`-js` on a free port of 127.0.0.1,
//! its own storage directory). The tests are ignored in a plain
//! `cargo test`; run them with
//! `cargo test --test scenarios_nats -- --include-ignored` where
//! `nats-server` (2.9 or later) is installed.

mod nats_tier;
mod scenarios;

use nats_tier::NatsTier;

scenarios::scenarios!(NatsTier, #[ignore = "needs nats-server"]);
