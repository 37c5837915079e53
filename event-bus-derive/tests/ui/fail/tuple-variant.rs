use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    UserRenamed(u64, String),
    UserCreated(u64),
}

fn main() {}
