use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    #[event(alias = "user.joined")]
    UserCreated,
    #[event(alias = "user.joined")]
    UserInvited,
    #[event(alias = "post.sent", alias = "post.sent")]
    PostPublished,
}

fn main() {}
