use event_bus::{DomainEvent, EventBus};

#[derive(Debug, DomainEvent)]
enum AppEvent {
    UserCreated(u64),
}

struct Mailer;

fn main() {
    let bus = EventBus::<AppEvent>::new();
    bus.spawn(Mailer);
}
