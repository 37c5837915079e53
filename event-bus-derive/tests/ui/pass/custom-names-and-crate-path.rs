//! Every enum-level option: the generated items' names and the path of a
//! re-exported `event_bus`.
#![deny(warnings)]

mod reexport {
    pub use event_bus as bus;
}

use reexport::bus::{DomainEvent, EventBus, EventKind, HandlerError, listener};

#[derive(DomainEvent)]
#[event(kind = "Topic", handler = "Handles", emitter = "Emits", crate = "reexport::bus")]
enum Signal {
    Started,
    Stopped { code: i32 },
}

struct Printer;

#[listener(name = "printer", crate = "reexport::bus")]
impl Handles for Printer {
    async fn on_stopped(&self, code: &i32) -> Result<(), HandlerError> {
        let _ = code;
        Ok(())
    }
}

fn main() {
    assert_eq!(Topic::Started.name(), "started");
    let bus = EventBus::<Signal>::new();
    Emits::emit_started(&bus);
    bus.emit_stopped(1);
    let _ = Printer;
}
