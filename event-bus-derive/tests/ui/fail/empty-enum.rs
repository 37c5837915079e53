use event_bus::DomainEvent;

#[derive(DomainEvent)]
enum AppEvent {}

fn main() {}
