use event_bus::{DomainEvent, HandlerError, listener};

#[derive(DomainEvent)]
enum AppEvent {
    UserCreated(u64),
}

struct Mailer;

#[listener(nme = "mailer")]
impl AppEventHandler for Mailer {
    async fn on_user_created(&self, _: &u64) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {}
