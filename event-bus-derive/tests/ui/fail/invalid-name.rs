use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(name = "User Created")]
    UserCreated,
    #[event(name = "post..published")]
    PostPublished,
    #[event(name = "")]
    CacheFlushed,
}

fn main() {}
