use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(alias = "User Registered", alias = "user..joined")]
    UserCreated,
    #[event(alias = 7)]
    PostPublished,
}

fn main() {}
