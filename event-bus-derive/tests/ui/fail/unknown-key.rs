use event_bus::DomainEvent;

#[derive(DomainEvent)]
#[event(handlr = "Handler")]
enum AppEvent {
    #[event(nmae = "user.created")]
    UserCreated,
    #[event(name = "post.published", skip_emit, urgent = true)]
    PostPublished,
}

fn main() {}
