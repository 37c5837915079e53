use event_bus::{DomainEvent, EventBus};

#[derive(DomainEvent)]
enum AppEvent {
    #[event(skip_emit)]
    Internal,
}

fn main() {
    let bus = EventBus::<AppEvent>::new();
    bus.emit_internal();
}
