//! A hand-written `EventKind` must number its kinds densely, in the order of
//! `ALL`: the bus checks it when it is built, instead of panicking (or
//! misrouting) inside `emit`.

use event_bus::{Event, EventBus, EventKind};

/// A hand-written two-kind `EventKind`, `$kind`, whose `index()` gives
/// `First` and `Second` the indices named, and an event `$event` that
/// carries one.
macro_rules! two_kinds {
    (
        $(#[$doc:meta])*
        $kind:ident, $event:ident, $prefix:literal, first: $first:expr, second: $second:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        enum $kind {
            First,
            Second,
        }

        impl EventKind for $kind {
            const ALL: &'static [Self] = &[Self::First, Self::Second];

            fn index(self) -> usize {
                match self {
                    Self::First => $first,
                    Self::Second => $second,
                }
            }

            fn name(self) -> &'static str {
                match self {
                    Self::First => concat!($prefix, ".first"),
                    Self::Second => concat!($prefix, ".second"),
                }
            }
        }

        #[derive(Debug)]
        struct $event($kind);

        impl Event for $event {
            type Kind = $kind;

            fn kind(&self) -> $kind {
                self.0
            }
        }
    };
}

two_kinds! {
    /// `index()` leaves the range of `ALL`.
    Sparse, SparseEvent, "sparse", first: 0, second: 5
}

two_kinds! {
    /// `index()` stays in range, in another order than `ALL`.
    Swapped, SwappedEvent, "swapped", first: 1, second: 0
}

#[test]
#[should_panic(expected = "EventKind::index")]
fn building_a_bus_refuses_an_index_outside_all() {
    let bus = EventBus::<SparseEvent>::builder().build();
    // What used to panic with index out of bounds, inside `emit`.
    let _subscription = bus.subscribe(Sparse::Second);
    bus.emit(SparseEvent(Sparse::Second));
}

#[test]
#[should_panic(expected = "EventKind::index")]
fn a_new_bus_refuses_an_index_outside_all() {
    let _bus = EventBus::<SparseEvent>::new();
}

#[test]
#[should_panic(expected = "EventKind::index")]
fn building_a_bus_refuses_indices_out_of_the_order_of_all() {
    let _bus = EventBus::<SwappedEvent>::builder().build();
}
