//! The event model: [`Event`], its fieldless [`EventKind`], and [`KindSet`].
//!
//! `#[derive(DomainEvent)]` implements these traits for an application's event
//! enum; they can also be written by hand, as the examples below do.

use std::fmt;
use std::hash::Hash;
use std::iter::FusedIterator;
use std::marker::PhantomData;

/// A domain event that can travel on an [`EventBus`](crate::EventBus).
///
/// Every event has a [kind](EventKind): a fieldless, `Copy` value naming its
/// variant. The bus routes on kinds, never on payloads, so deciding who wants
/// an event costs a table lookup.
///
/// # Examples
///
/// A hand-written implementation (the derive writes the same):
///
/// ```
/// use event_bus::{Event, EventKind};
///
/// #[derive(Debug)]
/// enum AppEvent {
///     UserCreated { id: u64 },
///     UserDeleted { id: u64 },
/// }
///
/// #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// enum AppEventKind {
///     UserCreated,
///     UserDeleted,
/// }
///
/// impl EventKind for AppEventKind {
///     const ALL: &'static [Self] = &[Self::UserCreated, Self::UserDeleted];
///
///     fn index(self) -> usize {
///         self as usize
///     }
///
///     fn name(self) -> &'static str {
///         match self {
///             Self::UserCreated => "user.created",
///             Self::UserDeleted => "user.deleted",
///         }
///     }
/// }
///
/// impl Event for AppEvent {
///     type Kind = AppEventKind;
///
///     fn kind(&self) -> AppEventKind {
///         match self {
///             Self::UserCreated { .. } => AppEventKind::UserCreated,
///             Self::UserDeleted { .. } => AppEventKind::UserDeleted,
///         }
///     }
/// }
///
/// let event = AppEvent::UserDeleted { id: 7 };
/// assert_eq!(event.kind(), AppEventKind::UserDeleted);
/// assert_eq!(event.name(), "user.deleted");
/// ```
pub trait Event: Send + Sync + 'static {
    /// The fieldless kind enum of this event type.
    type Kind: EventKind;

    /// The kind of this event.
    fn kind(&self) -> Self::Kind;

    /// The event's name, such as `"user.created"`.
    fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// The fieldless kind of an [`Event`]: one value per variant.
///
/// Kinds are densely indexed: `index()` of the `i`-th element of [`ALL`] is
/// `i`. The bus relies on this to route in constant time.
///
/// [`ALL`]: EventKind::ALL
pub trait EventKind: Copy + Eq + Hash + fmt::Debug + Send + Sync + 'static {
    /// Every kind, in index order.
    const ALL: &'static [Self];

    /// The kind's dense index: its position in [`ALL`](Self::ALL).
    ///
    /// [`EventBus::builder().build()`](crate::Builder::build) checks this
    /// once and panics, saying which kind is wrong, when it does not hold.
    fn index(self) -> usize;

    /// The event name of this kind, such as `"user.created"`.
    fn name(self) -> &'static str;

    /// The kind at `index`, or `None` when `index` is out of range.
    fn from_index(index: usize) -> Option<Self> {
        Self::ALL.get(index).copied()
    }

    /// The kind whose [`name`](EventKind::name) or one of whose
    /// [`aliases`](EventKind::aliases) is `name`: how a codec finds the kind
    /// of a stored event, under the name it was stored with.
    ///
    /// The default scans [`ALL`](Self::ALL); the derive writes a `match`.
    ///
    /// # Examples
    ///
    /// ```
    /// use event_bus::{DomainEvent, EventKind};
    ///
    /// #[derive(DomainEvent)]
    /// enum AppEvent {
    ///     #[event(alias = "user.registered")]
    ///     UserCreated,
    ///     UserDeleted,
    /// }
    ///
    /// assert_eq!(AppEventKind::from_name("user.deleted"), Some(AppEventKind::UserDeleted));
    /// assert_eq!(AppEventKind::from_name("user.registered"), Some(AppEventKind::UserCreated));
    /// assert_eq!(AppEventKind::from_name("user.renamed"), None);
    /// ```
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|kind| kind.name() == name || kind.aliases().contains(&name))
    }

    /// The names this kind was known by before, which
    /// [`from_name`](EventKind::from_name) also accepts: events stored
    /// under an old name still decode after a rename. Defaults to none; the
    /// derive sets them from `#[event(alias = "...")]` on the variant.
    ///
    /// No alias is another kind's name or alias (the derive checks).
    fn aliases(self) -> &'static [&'static str] {
        &[]
    }

    /// The priority events of this kind are emitted with, unless the emit
    /// overrides it. Defaults to [`Priority::Normal`]; the derive sets it
    /// from `#[event(priority = "high")]` or `"low"` on the variant.
    fn priority(self) -> Priority {
        Priority::Normal
    }
}

/// How urgently subscribers are served an event.
///
/// Every subscription and listener queue has one lane per priority. It hands
/// out the oldest event of the highest non-empty lane, so a high-priority
/// event overtakes every normal and low one still queued, while events of one
/// priority keep their emit order. A fairness bound keeps a steady stream of
/// higher-priority events from starving the rest: see the crate's
/// [Priority](crate#priority) section.
///
/// # Examples
///
/// ```
/// use event_bus::Priority;
///
/// assert!(Priority::High > Priority::Normal);
/// assert_eq!(Priority::default(), Priority::Normal);
/// assert_eq!(Priority::ALL, [Priority::High, Priority::Normal, Priority::Low]);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Priority {
    /// Served only when nothing of higher priority is queued (or by the
    /// fairness bound).
    Low,
    /// The default.
    #[default]
    Normal,
    /// Served before every normal and low event still queued.
    High,
}

impl Priority {
    /// Every priority, in the order queues serve them: highest first.
    pub const ALL: [Self; 3] = [Self::High, Self::Normal, Self::Low];

    /// The number of lanes a queue has: one per priority.
    pub(crate) const LANES: usize = Self::ALL.len();

    /// The priority's lowercase name, as `#[event(priority = "...")]` spells
    /// it.
    pub fn name(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    /// The index of the queue lane of this priority: 0 is served first.
    #[inline]
    pub(crate) fn lane(self) -> usize {
        match self {
            Self::High => 0,
            Self::Normal => 1,
            Self::Low => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const WORD: usize = u64::BITS as usize;

/// A set of event kinds: what a subscriber or listener is interested in.
///
/// A bit set sized for the kind enum, so it works for enums of any size.
/// Build one from a kind, an array of kinds, an iterator, or [`KindSet::all`].
///
/// # Examples
///
/// ```
/// # use event_bus::{EventKind, KindSet};
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum Kind { A, B, C }
/// # impl EventKind for Kind {
/// #     const ALL: &'static [Self] = &[Kind::A, Kind::B, Kind::C];
/// #     fn index(self) -> usize { self as usize }
/// #     fn name(self) -> &'static str { "x" }
/// # }
/// let set = KindSet::from([Kind::A, Kind::C]);
/// assert!(set.contains(Kind::A));
/// assert!(!set.contains(Kind::B));
/// assert_eq!(set.iter().collect::<Vec<_>>(), [Kind::A, Kind::C]);
///
/// let everything = KindSet::<Kind>::all();
/// assert_eq!(everything.len(), 3);
/// assert_eq!(everything.difference(&set), KindSet::from(Kind::B));
/// ```
pub struct KindSet<K> {
    words: Box<[u64]>,
    _kind: PhantomData<fn() -> K>,
}

impl<K: EventKind> KindSet<K> {
    fn words_needed() -> usize {
        K::ALL.len().div_ceil(WORD)
    }

    /// The empty set.
    pub fn empty() -> Self {
        Self {
            words: vec![0; Self::words_needed()].into_boxed_slice(),
            _kind: PhantomData,
        }
    }

    /// The set of every kind.
    pub fn all() -> Self {
        let mut set = Self::empty();
        for &kind in K::ALL {
            set.insert(kind);
        }
        set
    }

    /// Adds `kind`; returns whether it was newly added.
    pub fn insert(&mut self, kind: K) -> bool {
        let (word, bit) = Self::position(kind);
        let added = self.words[word] & bit == 0;
        self.words[word] |= bit;
        added
    }

    /// Removes `kind`; returns whether it was present.
    pub fn remove(&mut self, kind: K) -> bool {
        let (word, bit) = Self::position(kind);
        let present = self.words[word] & bit != 0;
        self.words[word] &= !bit;
        present
    }

    /// Adds `kind` and returns the set, for chaining.
    #[must_use]
    pub fn with(mut self, kind: K) -> Self {
        self.insert(kind);
        self
    }

    /// Whether `kind` is in the set.
    pub fn contains(&self, kind: K) -> bool {
        let (word, bit) = Self::position(kind);
        self.words[word] & bit != 0
    }

    /// The number of kinds in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set has no kinds.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The kinds in either set.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a | b)
    }

    /// The kinds in both sets.
    #[must_use]
    pub fn intersection(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & b)
    }

    /// The kinds in `self` but not in `other`.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & !b)
    }

    /// The kinds not in the set.
    #[must_use]
    pub fn complement(&self) -> Self {
        Self::all().difference(self)
    }

    /// The kinds in the set, in index order.
    pub fn iter(&self) -> KindSetIter<'_, K> {
        KindSetIter { set: self, next: 0 }
    }

    fn position(kind: K) -> (usize, u64) {
        let index = kind.index();
        (index / WORD, 1 << (index % WORD))
    }

    fn zip_with(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        Self {
            words: self
                .words
                .iter()
                .zip(other.words.iter())
                .map(|(&a, &b)| f(a, b))
                .collect(),
            _kind: PhantomData,
        }
    }
}

impl<K: EventKind> Default for KindSet<K> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<K> Clone for KindSet<K> {
    fn clone(&self) -> Self {
        Self {
            words: self.words.clone(),
            _kind: PhantomData,
        }
    }
}

impl<K> PartialEq for KindSet<K> {
    fn eq(&self, other: &Self) -> bool {
        self.words == other.words
    }
}

impl<K> Eq for KindSet<K> {}

impl<K: EventKind> fmt::Debug for KindSet<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<K: EventKind> From<K> for KindSet<K> {
    fn from(kind: K) -> Self {
        Self::empty().with(kind)
    }
}

impl<K: EventKind, const N: usize> From<[K; N]> for KindSet<K> {
    fn from(kinds: [K; N]) -> Self {
        kinds.into_iter().collect()
    }
}

impl<K: EventKind> From<&[K]> for KindSet<K> {
    fn from(kinds: &[K]) -> Self {
        kinds.iter().copied().collect()
    }
}

impl<K: EventKind> FromIterator<K> for KindSet<K> {
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> Self {
        let mut set = Self::empty();
        set.extend(iter);
        set
    }
}

impl<K: EventKind> Extend<K> for KindSet<K> {
    fn extend<I: IntoIterator<Item = K>>(&mut self, iter: I) {
        for kind in iter {
            self.insert(kind);
        }
    }
}

impl<'a, K: EventKind> IntoIterator for &'a KindSet<K> {
    type Item = K;
    type IntoIter = KindSetIter<'a, K>;

    fn into_iter(self) -> KindSetIter<'a, K> {
        self.iter()
    }
}

/// Iterator over the kinds of a [`KindSet`], in index order.
pub struct KindSetIter<'a, K> {
    set: &'a KindSet<K>,
    next: usize,
}

impl<K: EventKind> Iterator for KindSetIter<'_, K> {
    type Item = K;

    fn next(&mut self) -> Option<K> {
        while let Some(kind) = K::from_index(self.next) {
            self.next += 1;
            if self.set.contains(kind) {
                return Some(kind);
            }
        }
        None
    }
}

impl<K: EventKind> fmt::Debug for KindSetIter<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindSetIter")
            .field("set", self.set)
            .field("next", &self.next)
            .finish()
    }
}

impl<K: EventKind> FusedIterator for KindSetIter<'_, K> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Wide(u8);

    const WIDE: [Wide; 130] = {
        let mut all = [Wide(0); 130];
        let mut i = 0;
        while i < 130 {
            all[i] = Wide(i as u8);
            i += 1;
        }
        all
    };

    impl EventKind for Wide {
        const ALL: &'static [Self] = &WIDE;

        fn index(self) -> usize {
            self.0 as usize
        }

        fn name(self) -> &'static str {
            "wide"
        }
    }

    #[test]
    fn sets_span_more_than_one_word() {
        let set = KindSet::from([Wide(0), Wide(64), Wide(129)]);
        assert_eq!(set.len(), 3);
        assert!(set.contains(Wide(129)) && !set.contains(Wide(128)));
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [Wide(0), Wide(64), Wide(129)]
        );
        assert_eq!(set.complement().len(), 127);
        assert_eq!(KindSet::<Wide>::all().len(), 130);
    }

    #[test]
    fn insert_and_remove_report_changes() {
        let mut set = KindSet::empty();
        assert!(set.insert(Wide(70)));
        assert!(!set.insert(Wide(70)));
        assert!(set.remove(Wide(70)));
        assert!(!set.remove(Wide(70)));
        assert!(set.is_empty());
    }
}
