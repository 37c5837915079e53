//! A private enum whose helpers and handler methods are mostly unused: no
//! dead-code warning for code the user did not write.
#![deny(warnings)]

use event_bus::{DomainEvent, EventBus};

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated(u64),
    PostPublished { id: u64 },
    CacheFlushed,
}

fn main() {
    EventBus::<AppEvent>::new().emit_user_created(1);
}
