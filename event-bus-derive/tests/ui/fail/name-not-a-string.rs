use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(name = user.created)]
    UserCreated,
}

fn main() {}
