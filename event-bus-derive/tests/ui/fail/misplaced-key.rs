use event_bus::DomainEvent;

#[derive(DomainEvent)]
#[event(name = "app")]
enum AppEvent {
    #[event(kind = "Kind")]
    UserCreated,
}

fn main() {}
