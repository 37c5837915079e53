use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated,
    #[event(name = "user.created")]
    UserRegistered,
}

fn main() {}
