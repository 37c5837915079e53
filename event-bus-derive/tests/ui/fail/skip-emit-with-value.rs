use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(skip_emit = true)]
    UserCreated,
}

fn main() {}
