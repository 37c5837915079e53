//! A hand-written `EventKind` must number its kinds densely, in the order of
//! `ALL`: the bus checks it when it is built, instead of panicking (or
//! misrouting) inside `emit`.

use event_bus::{Event, EventBus, EventKind};

/// `index()` leaves the range of `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sparse {
    First,
    Second,
}

impl EventKind for Sparse {
    const ALL: &'static [Self] = &[Self::First, Self::Second];

    fn index(self) -> usize {
        match self {
            Self::First => 0,
            Self::Second => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::First => "sparse.first",
            Self::Second => "sparse.second",
        }
    }
}

#[derive(Debug)]
struct SparseEvent(Sparse);

impl Event for SparseEvent {
    type Kind = Sparse;

    fn kind(&self) -> Sparse {
        self.0
    }
}

/// `index()` stays in range, in another order than `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Swapped {
    First,
    Second,
}

impl EventKind for Swapped {
    const ALL: &'static [Self] = &[Self::First, Self::Second];

    fn index(self) -> usize {
        match self {
            Self::First => 1,
            Self::Second => 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::First => "swapped.first",
            Self::Second => "swapped.second",
        }
    }
}

#[derive(Debug)]
struct SwappedEvent(Swapped);

impl Event for SwappedEvent {
    type Kind = Swapped;

    fn kind(&self) -> Swapped {
        self.0
    }
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
