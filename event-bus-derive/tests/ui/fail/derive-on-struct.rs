use event_bus::DomainEvent;

#[derive(DomainEvent)]
struct UserCreated {
    id: u64,
}

fn main() {}
