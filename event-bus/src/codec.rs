//! Events to and from bytes, for the tiers that carry them out of the
//! process: a [`Codec`], and [`JsonCodec`], JSON through serde.
//!
//! Only with the `serde` feature; the in-memory bus compiles no serde.
//!
//! # The wire format
//!
//! [`JsonCodec`] writes one JSON object per event, its fields named after
//! [CloudEvents](https://cloudevents.io)' (a CloudEvents reader sees
//! familiar fields; `specversion` and `source` are not written):
//!
//! ```json
//! {
//!   "id": "0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73",
//!   "type": "user.created",
//!   "time": "2024-07-10T08:30:12.345678901Z",
//!   "priority": "normal",
//!   "sequence": 42,
//!   "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
//!   "data": { "id": 7, "username": "ada" }
//! }
//! ```
//!
//! - `type` is the event's [name](crate::EventKind::name) (`user.created`),
//!   never the variant's position or its Rust name, so variants can be
//!   reordered, added and (with `#[event(alias = "old.name")]`) renamed
//!   without breaking stored events.
//! - `time` is the [emit time](crate::Metadata::emitted_at) in RFC 3339, in
//!   UTC, to the nanosecond: what CloudEvents uses, readable in a database
//!   row, and exact. Any RFC 3339 offset is read.
//! - `traceparent` is left out when the event has none.
//! - `data` is the variant's content as serde writes it: `null` for a unit
//!   variant, the payload of a newtype variant, an array for a tuple
//!   variant, an object for a struct variant.
//!
//! Reading, `priority` defaults to the kind's and `sequence` to 0 when
//! absent, `data` to `null`, and unknown fields are ignored. A decoded
//! event keeps its id, sequence, priority, time and trace exactly.
//!
//! # What the event type needs
//!
//! Any `E: Event + Serialize + DeserializeOwned` whose serde impls are the
//! derived ones of an *externally tagged* enum, serde's default: derive
//! `Serialize` and `Deserialize` beside `DomainEvent`, as usual. The variant
//! is read by the kind the `type` names, and handed to serde by its index,
//! so:
//!
//! - serde's variant indices must be the kinds' indices: both follow the
//!   declaration order, so this holds unless a variant is
//!   `#[serde(skip)]`ped or `skip_deserializing`; decoding checks it and fails
//!   with [`DecodeError::Payload`] saying so;
//! - `#[serde(tag = "…")]`, `#[serde(untagged)]` and `content` are not
//!   supported (encoding fails with [`EncodeError::NotExternallyTagged`]);
//! - `#[serde(rename = "…")]` on a variant is harmless and has no effect on
//!   the wire: the tag is the event's name; `#[serde(other)]` has nothing to
//!   catch, since an unknown name is [`DecodeError::UnknownType`];
//! - everything inside a variant (field renames, defaults, `Option` fields
//!   added later) is serde's, as usual.
//!
//! # Examples
//!
//! ```
//! use event_bus::codec::JsonCodec;
//! use event_bus::{DomainEvent, Envelope};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, DomainEvent, Serialize, Deserialize)]
//! enum AppEvent {
//!     UserCreated { id: u64, username: String },
//!     CacheFlushed,
//! }
//!
//! let emitted = Envelope::new(AppEvent::UserCreated { id: 7, username: "ada".into() });
//! let bytes = JsonCodec.encode(&emitted)?;
//!
//! let json: serde_json::Value = serde_json::from_slice(&bytes)?;
//! assert_eq!(json["type"], "user.created");
//! assert_eq!(json["data"]["username"], "ada");
//!
//! let decoded: Envelope<AppEvent> = JsonCodec.decode(&bytes)?;
//! assert_eq!(decoded.event(), emitted.event());
//! assert_eq!(decoded.metadata(), emitted.metadata());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::de::value::U64Deserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, EnumAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::envelope::{Envelope, Metadata};
use crate::error::{DecodeError, EncodeError};
use crate::event::{Event, EventKind, Priority};
use crate::trace::TraceParent;

/// Turns envelopes into bytes and back: what a tier that stores or carries
/// events is generic over.
///
/// A codec writes an event's [`Metadata`] with it, so that
/// [`decode`](Codec::decode) gives back the event with the identity it was
/// emitted with, and tags it with the event's
/// [name](crate::EventKind::name), so that reordering the enum breaks
/// nothing.
///
/// # Examples
///
/// ```
/// use event_bus::codec::{Codec, JsonCodec};
/// use event_bus::{DomainEvent, Envelope};
///
/// #[derive(Debug, DomainEvent, serde::Serialize, serde::Deserialize)]
/// enum AppEvent {
///     PostPublished(u64),
/// }
///
/// // A tier takes any codec.
/// fn round_trip<C: Codec<AppEvent>>(codec: &C, envelope: &Envelope<AppEvent>) -> Envelope<AppEvent> {
///     let bytes = codec.encode(envelope).expect("encodes");
///     codec.decode(&bytes).expect("decodes")
/// }
///
/// let emitted = Envelope::new(AppEvent::PostPublished(3));
/// assert_eq!(round_trip(&JsonCodec, &emitted).id(), emitted.id());
/// ```
pub trait Codec<E: Event> {
    /// The bytes of `envelope`: its event and metadata.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when the event's serialization fails; every event of
    /// that kind will.
    fn encode(&self, envelope: &Envelope<E>) -> Result<Vec<u8>, EncodeError>;

    /// The envelope `bytes` hold, with the metadata they were written with.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when `bytes` are not an event of `E`, with as much of
    /// the event's identity as could be read.
    fn decode(&self, bytes: &[u8]) -> Result<Envelope<E>, DecodeError>;
}

/// The JSON codec, through `serde_json`: see the [module's
/// documentation](self) for the format and what the event type needs.
///
/// # Examples
///
/// An event of an unknown type still says what it was:
///
/// ```
/// use event_bus::codec::JsonCodec;
/// use event_bus::error::DecodeError;
/// use event_bus::{DomainEvent, Envelope};
///
/// #[derive(Debug, DomainEvent, serde::Serialize, serde::Deserialize)]
/// enum AppEvent {
///     UserCreated(u64),
/// }
///
/// let bytes = br#"{"id": "0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73", "type": "user.banned",
///                 "time": "2024-07-10T08:30:12Z", "data": 7}"#;
/// let error = JsonCodec.decode::<AppEvent>(bytes).unwrap_err();
/// assert!(matches!(error, DecodeError::UnknownType { .. }));
/// assert_eq!(error.to_string(), "unknown event type `user.banned`");
/// assert_eq!(error.name(), Some("user.banned"));
/// assert_eq!(error.id().unwrap().to_string(), "0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct JsonCodec;

impl JsonCodec {
    /// The JSON of `envelope`: its metadata and its event's content, tagged
    /// with the event's name.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when the event's `Serialize` impl fails or does not
    /// write an externally tagged enum, or when its emit time is outside
    /// the years RFC 3339 can write.
    pub fn encode<E: Event + Serialize>(
        &self,
        envelope: &Envelope<E>,
    ) -> Result<Vec<u8>, EncodeError> {
        let name = envelope.name();
        if !probe::is_externally_tagged(envelope.event()) {
            return Err(EncodeError::NotExternallyTagged { name });
        }
        let data = match serde_json::to_value(envelope.event()) {
            // A unit variant is its name, any other `{"Variant": content}`.
            Ok(Value::String(_)) => Value::Null,
            Ok(Value::Object(tagged)) if tagged.len() == 1 => tagged
                .into_iter()
                .next()
                .map_or(Value::Null, |(_, data)| data),
            Ok(_) => return Err(EncodeError::NotExternallyTagged { name }),
            Err(error) => {
                return Err(EncodeError::Serialize {
                    name,
                    source: error.into(),
                });
            }
        };
        let metadata = envelope.metadata();
        let time = rfc3339(metadata.emitted_at()).ok_or(EncodeError::Time { name })?;
        let wire = WireOut {
            id: metadata.id(),
            kind: name,
            time,
            priority: metadata.priority().name(),
            sequence: metadata.sequence(),
            traceparent: metadata.traceparent(),
            data,
        };
        serde_json::to_vec(&wire).map_err(|error| EncodeError::Serialize {
            name,
            source: error.into(),
        })
    }

    /// The envelope that the JSON `bytes` hold, with the id, sequence,
    /// priority, time and trace context they were written with.
    ///
    /// `type` is looked up with [`EventKind::from_name`], so an event stored
    /// under a name that is now an alias decodes as the renamed variant.
    ///
    /// # Errors
    ///
    /// [`DecodeError`], with the event's name and id where they could be
    /// read: [`Malformed`](DecodeError::Malformed) for bytes that are not a
    /// JSON object, [`Envelope`](DecodeError::Envelope) for a missing or
    /// mistyped field, [`UnknownType`](DecodeError::UnknownType),
    /// [`Payload`](DecodeError::Payload) when `data` does not fit the
    /// variant, and [`Id`](DecodeError::Id), [`Time`](DecodeError::Time) or
    /// [`TraceParent`](DecodeError::TraceParent) for an invalid one.
    pub fn decode<E: Event + DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> Result<Envelope<E>, DecodeError> {
        let wire: WireIn =
            serde_json::from_slice(bytes).map_err(|error| DecodeError::Malformed {
                source: error.into(),
            })?;
        // Read what identifies the event first, so every later error can
        // say which event it was.
        let name = match wire.kind {
            Some(Value::String(name)) => Some(name),
            _ => None,
        };
        let id = match &wire.id {
            Some(Value::String(id)) => Uuid::try_parse(id).ok(),
            _ => None,
        };
        let envelope_error = |reason: &str| DecodeError::Envelope {
            reason: reason.to_owned(),
            name: name.clone(),
            id,
        };
        let Some(name) = name.clone() else {
            return Err(envelope_error("`type` is missing or not a string"));
        };
        let id = match (&wire.id, id) {
            (_, Some(id)) => id,
            (Some(Value::String(value)), None) => {
                return Err(DecodeError::Id {
                    value: value.clone(),
                    name: Some(name),
                });
            }
            _ => return Err(envelope_error("`id` is missing or not a string")),
        };
        let Some(kind) = E::Kind::from_name(&name) else {
            return Err(DecodeError::UnknownType { name, id: Some(id) });
        };
        let emitted_at = match &wire.time {
            Some(Value::String(value)) => {
                parse_rfc3339(value).ok_or_else(|| DecodeError::Time {
                    value: value.clone(),
                    name: Some(name.clone()),
                    id: Some(id),
                })?
            }
            _ => return Err(envelope_error("`time` is missing or not a string")),
        };
        let priority = match &wire.priority {
            None => kind.priority(),
            Some(Value::String(value)) => Priority::ALL
                .into_iter()
                .find(|priority| priority.name() == value)
                .ok_or_else(|| {
                    envelope_error("`priority` is not one of \"high\", \"normal\" or \"low\"")
                })?,
            Some(_) => return Err(envelope_error("`priority` is not a string")),
        };
        let sequence = match &wire.sequence {
            None => 0,
            Some(value) => value
                .as_u64()
                .ok_or_else(|| envelope_error("`sequence` is not an unsigned 64-bit integer"))?,
        };
        let traceparent =
            match &wire.traceparent {
                None => None,
                Some(Value::String(value)) => {
                    Some(value.parse::<TraceParent>().map_err(|source| {
                        DecodeError::TraceParent {
                            source,
                            name: Some(name.clone()),
                            id: Some(id),
                        }
                    })?)
                }
                Some(_) => return Err(envelope_error("`traceparent` is not a string")),
            };
        let payload_error = |message: String| DecodeError::Payload {
            name: name.clone(),
            id: Some(id),
            message,
        };
        let content = ContentOf {
            index: kind.index() as u64,
            kinds: E::Kind::ALL.len(),
            data: wire.data,
        };
        let event = E::deserialize(content).map_err(|error| payload_error(error.to_string()))?;
        if event.kind() != kind {
            return Err(payload_error(format!(
                "it decoded as `{}`: serde's variant order is not the kinds' order",
                event.name()
            )));
        }
        let metadata = Metadata::new(id)
            .with_sequence(sequence)
            .with_priority(priority)
            .with_emitted_at(emitted_at)
            .with_traceparent(traceparent);
        Ok(Envelope::from_parts(event, metadata))
    }
}

impl<E: Event + Serialize + DeserializeOwned> Codec<E> for JsonCodec {
    fn encode(&self, envelope: &Envelope<E>) -> Result<Vec<u8>, EncodeError> {
        JsonCodec::encode(self, envelope)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Envelope<E>, DecodeError> {
        JsonCodec::decode(self, bytes)
    }
}

/// The envelope as it is written.
#[derive(Serialize)]
struct WireOut {
    #[serde(serialize_with = "display")]
    id: Uuid,
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    priority: &'static str,
    sequence: u64,
    #[serde(
        serialize_with = "display_some",
        skip_serializing_if = "Option::is_none"
    )]
    traceparent: Option<TraceParent>,
    data: Value,
}

/// The envelope as it is read: each field as whatever JSON it is, so that
/// one wrong field does not hide the event's name and id.
#[derive(Deserialize)]
struct WireIn {
    id: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    time: Option<Value>,
    priority: Option<Value>,
    sequence: Option<Value>,
    traceparent: Option<Value>,
    #[serde(default)]
    data: Value,
}

fn display<S: Serializer>(value: &impl fmt::Display, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn display_some<S: Serializer>(
    value: &Option<impl fmt::Display>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

/// `at` in RFC 3339, in UTC, to the nanosecond; `None` outside the years
/// 0000 to 9999.
fn rfc3339(at: SystemTime) -> Option<String> {
    let nanos = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).ok()?,
        Err(before) => -i128::try_from(before.duration().as_nanos()).ok()?,
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// The time an RFC 3339 string names; `None` when it is not one, when its
/// UTC year is outside 0000 to 9999 (which [`rfc3339`] could not write
/// back), or when `SystemTime` cannot hold it.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let utc = OffsetDateTime::from_unix_timestamp(at.unix_timestamp()).ok()?;
    if !(0..=9999).contains(&utc.year()) {
        return None;
    }
    let nanos = at.unix_timestamp_nanos();
    let since = |nanos: u128| {
        let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
        Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
    };
    if nanos >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(since(nanos.unsigned_abs())?)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(since(nanos.unsigned_abs())?)
    }
}

/// A `Deserializer` that presents one variant, by index, with `data` as its
/// content: what serde's derived `Deserialize` of an externally tagged enum
/// reads the event from, once the kind is known from the `type` tag.
struct ContentOf {
    /// The variant's index: the kind's, which must be serde's.
    index: u64,
    /// How many kinds the event has, to check serde has as many variants.
    kinds: usize,
    data: Value,
}

impl<'de> Deserializer<'de> for ContentOf {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(
            "the codec reads events as externally tagged enums, serde's default; remove `#[serde(tag = \"…\")]` or `#[serde(untagged)]`",
        ))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        // serde lists a variant's aliases among its variants, so there may
        // be more; fewer means serde skips one, which shifts its indices.
        if variants.len() < self.kinds {
            return Err(de::Error::custom(format_args!(
                "serde reads {} variants and the event has {} kinds: a variant skipped by serde shifts serde's variant order",
                variants.len(),
                self.kinds
            )));
        }
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for ContentOf {
    type Error = serde_json::Error;
    type Variant = Content;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Content), Self::Error> {
        // serde_derive's variant identifier takes an index as `visit_u64`.
        let variant = seed.deserialize(U64Deserializer::<serde_json::Error>::new(self.index))?;
        Ok((variant, Content(self.data)))
    }
}

/// The content of the variant [`ContentOf`] presents: the envelope's `data`.
struct Content(Value);

impl<'de> VariantAccess<'de> for Content {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        match self.0 {
            Value::Null => Ok(()),
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"no data (null) for a unit variant",
            )),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct("", fields, visitor)
    }
}

/// How serde names what `value` is, for an error message.
fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => de::Unexpected::Unsigned(u),
            (_, Some(i), _) => de::Unexpected::Signed(i),
            (_, _, Some(f)) => de::Unexpected::Float(f),
            _ => de::Unexpected::Other("number"),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

/// Which shape a `Serialize` impl writes an enum in, read from the first
/// call it makes, which is all the probe lets it make.
mod probe {
    use std::fmt;

    use serde::Serialize;
    use serde::ser::{self, Impossible};

    /// Whether `value` serializes as an externally tagged enum variant,
    /// serde's default: its first call names the variant. An internally
    /// tagged enum starts a struct or a map, an untagged one writes its
    /// content as it is. An impl that fails before its first call (a
    /// skipped variant) passes, so that its own error is the one reported.
    pub(super) fn is_externally_tagged<T: Serialize + ?Sized>(value: &T) -> bool {
        !matches!(value.serialize(Probe), Err(Stop(Some(false))))
    }

    /// Ends the serialization at its first call: whether it was a
    /// variant's, or `None` when the impl failed on its own.
    #[derive(Debug)]
    pub(super) struct Stop(Option<bool>);

    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("probed")
        }
    }

    impl std::error::Error for Stop {}

    impl ser::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop(None)
        }
    }

    struct Probe;

    macro_rules! not_a_variant {
        ($($method:ident($($ty:ty),*)),* $(,)?) => {
            $(fn $method(self, $(_: $ty),*) -> Result<(), Stop> { Err(Stop(Some(false))) })*
        };
    }

    impl ser::Serializer for Probe {
        type Ok = ();
        type Error = Stop;
        type SerializeSeq = Impossible<(), Stop>;
        type SerializeTuple = Impossible<(), Stop>;
        type SerializeTupleStruct = Impossible<(), Stop>;
        type SerializeTupleVariant = Impossible<(), Stop>;
        type SerializeMap = Impossible<(), Stop>;
        type SerializeStruct = Impossible<(), Stop>;
        type SerializeStructVariant = Impossible<(), Stop>;

        not_a_variant! {
            serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
            serialize_i64(i64), serialize_u8(u8), serialize_u16(u16), serialize_u32(u32),
            serialize_u64(u64), serialize_f32(f32), serialize_f64(f64), serialize_char(char),
            serialize_str(&str), serialize_bytes(&[u8]), serialize_none(), serialize_unit(),
            serialize_unit_struct(&'static str),
        }

        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<(), Stop> {
            Err(Stop(Some(true)))
        }

        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<(), Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), Stop> {
            Err(Stop(Some(true)))
        }

        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, Stop> {
            Err(Stop(Some(true)))
        }

        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStruct, Stop> {
            Err(Stop(Some(false)))
        }

        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, Stop> {
            Err(Stop(Some(true)))
        }
    }
}
