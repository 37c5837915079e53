use event_bus::listener;

struct Mailer;

#[listener]
impl Mailer {
    async fn on_user_created(&self) {}
}

#[listener]
fn not_an_impl() {}

fn main() {}
