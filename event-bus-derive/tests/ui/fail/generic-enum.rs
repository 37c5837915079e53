use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent<T> {
    Created(T),
}

fn main() {}
