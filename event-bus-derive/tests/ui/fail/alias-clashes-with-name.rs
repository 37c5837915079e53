use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated,
    #[event(alias = "user.created")]
    UserRegistered,
    #[event(name = "post.published", alias = "post.published")]
    PostPublished,
}

fn main() {}
