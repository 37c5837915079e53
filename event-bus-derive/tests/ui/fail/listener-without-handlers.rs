use event_bus::{DomainEvent, listener};

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated(u64),
}

struct Idle;

#[listener]
impl AppEventHandler for Idle {}

fn main() {}
