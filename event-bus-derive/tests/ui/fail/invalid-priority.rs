use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(priority = "urgent")]
    UserDeleted,
    #[event(priority = 1)]
    PostDeleted,
    #[event(priority = "high", priority = "low")]
    PostFlagged,
}

fn main() {}
