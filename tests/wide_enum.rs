//! An enum of more than 64 variants: kinds, interest sets and routing past
//! the first word of the kind bit set.

mod support;

use std::sync::{Arc, Mutex};

use event_bus::{DomainEvent, EventBus, EventKind, HandlerError, KindSet, Listener, listener};
use support::within;

#[derive(Debug, Clone, Copy, PartialEq, DomainEvent)]
enum Wide {
    V00,
    V01,
    V02,
    V03,
    V04,
    V05,
    V06,
    V07,
    V08,
    V09,
    V10,
    V11,
    V12,
    V13,
    V14,
    V15,
    V16,
    V17,
    V18,
    V19,
    V20,
    V21,
    V22,
    V23,
    V24,
    V25,
    V26,
    V27,
    V28,
    V29,
    V30,
    V31,
    V32,
    V33,
    V34,
    V35,
    V36,
    V37,
    V38,
    V39,
    V40,
    V41,
    V42,
    V43,
    V44,
    V45,
    V46,
    V47,
    V48,
    V49,
    V50,
    V51,
    V52,
    V53,
    V54,
    V55,
    V56,
    V57,
    V58,
    V59,
    V60,
    V61,
    V62,
    V63,
    V64,
    V65,
    V66,
    V67,
    V68,
    V69,
}

#[derive(Clone, Default)]
struct Edges(Arc<Mutex<Vec<&'static str>>>);

#[listener]
impl WideHandler for Edges {
    async fn on_v03(&self) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push("v03");
        Ok(())
    }

    async fn on_v65(&self) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push("v65");
        Ok(())
    }

    async fn on_v69(&self) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push("v69");
        Ok(())
    }
}

#[test]
fn seventy_kinds_with_dense_indices_and_names() {
    assert_eq!(WideKind::ALL.len(), 70);
    assert_eq!(WideKind::V69.index(), 69);
    assert_eq!(WideKind::V69.name(), "v69");
    assert_eq!(WideKind::from_index(64), Some(WideKind::V64));
    assert_eq!(KindSet::<WideKind>::all().len(), 70);
}

#[tokio::test]
async fn listener_interests_and_routing_reach_past_64_kinds() {
    let edges = Edges::default();
    assert_eq!(
        Listener::<Wide>::interests(&edges),
        KindSet::from([WideKind::V03, WideKind::V65, WideKind::V69])
    );

    let bus = EventBus::new();
    let handle = bus.spawn(edges.clone());
    for kind in WideKind::ALL {
        bus.emit(wide(*kind));
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(*edges.0.lock().unwrap(), ["v03", "v65", "v69"]);
    assert_eq!(handle.metrics().delivered, 3);
    assert_eq!(bus.metrics().emitted, 70);
}

/// The unit event of `kind`, through the emit helpers' enum.
fn wide(kind: WideKind) -> Wide {
    const ALL: [Wide; 70] = [
        Wide::V00,
        Wide::V01,
        Wide::V02,
        Wide::V03,
        Wide::V04,
        Wide::V05,
        Wide::V06,
        Wide::V07,
        Wide::V08,
        Wide::V09,
        Wide::V10,
        Wide::V11,
        Wide::V12,
        Wide::V13,
        Wide::V14,
        Wide::V15,
        Wide::V16,
        Wide::V17,
        Wide::V18,
        Wide::V19,
        Wide::V20,
        Wide::V21,
        Wide::V22,
        Wide::V23,
        Wide::V24,
        Wide::V25,
        Wide::V26,
        Wide::V27,
        Wide::V28,
        Wide::V29,
        Wide::V30,
        Wide::V31,
        Wide::V32,
        Wide::V33,
        Wide::V34,
        Wide::V35,
        Wide::V36,
        Wide::V37,
        Wide::V38,
        Wide::V39,
        Wide::V40,
        Wide::V41,
        Wide::V42,
        Wide::V43,
        Wide::V44,
        Wide::V45,
        Wide::V46,
        Wide::V47,
        Wide::V48,
        Wide::V49,
        Wide::V50,
        Wide::V51,
        Wide::V52,
        Wide::V53,
        Wide::V54,
        Wide::V55,
        Wide::V56,
        Wide::V57,
        Wide::V58,
        Wide::V59,
        Wide::V60,
        Wide::V61,
        Wide::V62,
        Wide::V63,
        Wide::V64,
        Wide::V65,
        Wide::V66,
        Wide::V67,
        Wide::V68,
        Wide::V69,
    ];
    ALL[kind.index()]
}
