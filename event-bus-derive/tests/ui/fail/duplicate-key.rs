use event_bus::DomainEvent;

#[derive(DomainEvent)]
#[event(kind = "Kind", kind = "OtherKind")]
enum AppEvent {
    #[event(name = "user.created")]
    #[event(name = "user.made")]
    UserCreated,
}

fn main() {}
