use event_bus::{DomainEvent, HandlerError, listener};

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated(u64),
    PostPublished(u64),
}

struct Mailer;

#[listener]
impl AppEventHandler for Mailer {
    async fn on_user_craeted(&self, id: &u64) -> Result<(), HandlerError> {
        println!("{id}");
        Ok(())
    }
}

fn main() {}
