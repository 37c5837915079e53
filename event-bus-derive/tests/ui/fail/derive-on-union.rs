use event_bus::DomainEvent;

#[derive(DomainEvent)]
union Raw {
    id: u64,
}

fn main() {}
