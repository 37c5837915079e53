//! The JSON codec: every variant shape keeps its event and metadata through
//! a round trip, the type tag is the event's name, stored events survive a
//! reordered, renamed and extended enum, and undecodable bytes say what they
//! were. Run with `cargo test -p event-bus --all-features`.
#![cfg(all(feature = "serde", feature = "derive"))]

use std::time::{Duration, SystemTime};

use event_bus::codec::{Codec, JsonCodec};
use event_bus::error::{DecodeError, EncodeError};
use event_bus::{DomainEvent, Envelope, EventKind, Metadata, Priority, TraceParent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserEventData {
    id: u64,
    username: String,
}

/// One variant of each shape serde and the derive support.
#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shapes {
    CacheFlushed,
    UserCreated(UserEventData),
    PostPublished(u64),
    UserRenamed {
        id: u64,
        from: String,
        to: String,
    },
    #[event(priority = "high")]
    Maybe(Option<String>),
}

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const ID: &str = "0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73";

fn metadata() -> Metadata {
    Metadata::new(Uuid::parse_str(ID).unwrap())
        .with_sequence(42)
        .with_priority(Priority::Low)
        .with_emitted_at(SystemTime::UNIX_EPOCH + Duration::new(1_720_600_212, 345_678_901))
        .with_traceparent(TRACE.parse::<TraceParent>().unwrap())
}

fn encode<E: event_bus::Event + Serialize>(envelope: &Envelope<E>) -> Value {
    serde_json::from_slice(&JsonCodec.encode(envelope).unwrap()).unwrap()
}

fn decode<E: event_bus::Event + serde::de::DeserializeOwned>(
    json: Value,
) -> Result<Envelope<E>, DecodeError> {
    JsonCodec.decode(&serde_json::to_vec(&json).unwrap())
}

fn every_shape() -> Vec<Shapes> {
    vec![
        Shapes::CacheFlushed,
        Shapes::UserCreated(UserEventData {
            id: 7,
            username: "ada".into(),
        }),
        Shapes::PostPublished(3),
        Shapes::UserRenamed {
            id: 7,
            from: "ada".into(),
            to: "countess".into(),
        },
        Shapes::Maybe(None),
        Shapes::Maybe(Some("x".into())),
    ]
}

#[test]
fn every_shape_round_trips_with_its_metadata() {
    for event in every_shape() {
        let envelope = Envelope::from_parts(event.clone(), metadata());
        let bytes = JsonCodec.encode(&envelope).unwrap();
        let decoded: Envelope<Shapes> = JsonCodec.decode(&bytes).unwrap();
        assert_eq!(decoded.event(), &event);
        assert_eq!(decoded.metadata(), &metadata(), "{event:?}");
        assert_eq!(decoded.emitted_at(), metadata().emitted_at()); // to the nanosecond
        assert_eq!(decoded.traceparent().unwrap().to_string(), TRACE);
        // Through the trait too, and the same bytes again.
        let again = Codec::<Shapes>::decode(&JsonCodec, &bytes).unwrap();
        assert_eq!(Codec::encode(&JsonCodec, &again).unwrap(), bytes);
    }
}

/// A tuple variant, which the derive does not take: `Event` by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Moves {
    Stayed,
    Moved(u64, u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum MovesKind {
    Stayed,
    Moved,
}

impl EventKind for MovesKind {
    const ALL: &'static [Self] = &[Self::Stayed, Self::Moved];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::Stayed => "stayed",
            Self::Moved => "moved",
        }
    }
}

impl event_bus::Event for Moves {
    type Kind = MovesKind;

    fn kind(&self) -> MovesKind {
        match self {
            Self::Stayed => MovesKind::Stayed,
            Self::Moved(..) => MovesKind::Moved,
        }
    }
}

#[test]
fn a_tuple_variant_round_trips_as_an_array() {
    let envelope = Envelope::from_parts(Moves::Moved(3, 4), metadata());
    assert_eq!(encode(&envelope)["data"], json!([3, 4]));
    let decoded: Envelope<Moves> = JsonCodec
        .decode(&JsonCodec.encode(&envelope).unwrap())
        .unwrap();
    assert_eq!(decoded.event(), &Moves::Moved(3, 4));
    assert_eq!(decoded.metadata(), &metadata());
    let short = decode::<Moves>(json!({
        "id": ID, "type": "moved", "time": "2024-07-10T08:30:12Z", "data": [3],
    }))
    .unwrap_err();
    assert!(matches!(short, DecodeError::Payload { .. }), "{short:?}");
}

#[test]
fn an_emitted_envelope_round_trips_as_the_bus_made_it() {
    let emitted = Envelope::new(Shapes::Maybe(None));
    let decoded: Envelope<Shapes> = JsonCodec
        .decode(&JsonCodec.encode(&emitted).unwrap())
        .unwrap();
    assert_eq!(decoded.metadata(), emitted.metadata());
    assert_eq!(decoded.priority(), Priority::High); // the kind's
    assert_eq!(decoded.traceparent(), None);
}

#[test]
fn the_wire_holds_the_name_as_type_and_the_content_as_data() {
    let renamed = Shapes::UserRenamed {
        id: 7,
        from: "ada".into(),
        to: "countess".into(),
    };
    assert_eq!(
        encode(&Envelope::from_parts(renamed, metadata())),
        json!({
            "id": ID,
            "type": "user.renamed",
            "time": "2024-07-10T08:30:12.345678901Z",
            "priority": "low",
            "sequence": 42,
            "traceparent": TRACE,
            "data": {"id": 7, "from": "ada", "to": "countess"},
        })
    );
    let data = |event: Shapes| encode(&Envelope::new(event))["data"].clone();
    assert_eq!(data(Shapes::CacheFlushed), Value::Null);
    assert_eq!(data(Shapes::PostPublished(3)), json!(3));
    assert_eq!(
        data(Shapes::UserCreated(UserEventData {
            id: 1,
            username: "bob".into()
        })),
        json!({"id": 1, "username": "bob"})
    );

    let plain = encode(&Envelope::new(Shapes::CacheFlushed));
    assert_eq!(plain["type"], "cache.flushed");
    assert!(plain.get("traceparent").is_none(), "left out when none");
}

/// The enum as it was when events were stored.
mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
    pub(crate) enum AppEvent {
        UserRegistered { id: u64, email: String },
        PostPublished(u64),
        CacheFlushed,
    }
}

/// The enum later: reordered, `UserRegistered` renamed to `UserCreated`,
/// and new variants before and between the old ones.
mod v2 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
    pub(crate) enum AppEvent {
        PostDeleted(u64),
        CacheFlushed,
        #[event(name = "user.created", alias = "user.registered")]
        UserCreated {
            id: u64,
            email: String,
            #[serde(default)]
            verified: bool,
        },
        PostArchived {
            id: u64,
        },
        PostPublished(u64),
    }
}

#[test]
fn stored_events_read_back_with_a_reordered_renamed_extended_enum() {
    let stored: Vec<(Vec<u8>, Uuid)> = [
        v1::AppEvent::UserRegistered {
            id: 1,
            email: "ada@example.com".into(),
        },
        v1::AppEvent::PostPublished(10),
        v1::AppEvent::CacheFlushed,
    ]
    .into_iter()
    .map(|event| {
        let envelope = Envelope::new(event);
        (JsonCodec.encode(&envelope).unwrap(), envelope.id())
    })
    .collect();

    let read: Vec<Envelope<v2::AppEvent>> = stored
        .iter()
        .map(|(bytes, _)| JsonCodec.decode(bytes).unwrap())
        .collect();
    let events: Vec<&v2::AppEvent> = read.iter().map(Envelope::event).collect();
    assert_eq!(
        events,
        [
            &v2::AppEvent::UserCreated {
                id: 1,
                email: "ada@example.com".into(),
                verified: false,
            },
            &v2::AppEvent::PostPublished(10),
            &v2::AppEvent::CacheFlushed,
        ]
    );
    let ids: Vec<Uuid> = read.iter().map(Envelope::id).collect();
    let stored_ids: Vec<Uuid> = stored.iter().map(|&(_, id)| id).collect();
    assert_eq!(ids, stored_ids);
    // Written again, the renamed event takes its new name.
    assert_eq!(encode(&read[0])["type"], "user.created");
    assert_eq!(
        v2::AppEventKind::from_name("user.registered"),
        Some(v2::AppEventKind::UserCreated)
    );

    // The other way, an old reader does not know the new kinds, and says so.
    let newer = JsonCodec
        .encode(&Envelope::new(v2::AppEvent::PostArchived { id: 4 }))
        .unwrap();
    let error = JsonCodec.decode::<v1::AppEvent>(&newer).unwrap_err();
    assert!(matches!(error, DecodeError::UnknownType { ref name, .. } if name == "post.archived"));
}

#[test]
fn an_unknown_type_is_reported_with_its_name_and_id() {
    let error = decode::<Shapes>(json!({
        "id": ID, "type": "user.banned", "time": "2024-07-10T08:30:12Z", "data": 1,
    }))
    .unwrap_err();
    assert!(
        matches!(error, DecodeError::UnknownType { .. }),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "unknown event type `user.banned`");
    assert_eq!(error.name(), Some("user.banned"));
    assert_eq!(error.id(), Some(Uuid::parse_str(ID).unwrap()));
}

#[test]
fn a_mistyped_payload_is_reported_with_its_name_and_serdes_message() {
    let error = decode::<Shapes>(json!({
        "id": ID, "type": "post.published", "time": "2024-07-10T08:30:12Z", "data": "three",
    }))
    .unwrap_err();
    let DecodeError::Payload {
        ref name,
        id,
        ref message,
    } = error
    else {
        panic!("{error:?}")
    };
    assert_eq!(name, "post.published");
    assert_eq!(id, Some(Uuid::parse_str(ID).unwrap()));
    assert!(message.contains("expected u64"), "{message}");
    assert_eq!(
        error.to_string(),
        format!("payload of `post.published` does not fit: {message}")
    );

    // A struct variant missing a field, a unit variant with data.
    for (kind, data) in [
        ("user.renamed", json!({"id": 1, "from": "a"})),
        ("cache.flushed", json!({"id": 1})),
        ("user.created", Value::Null),
    ] {
        let error = decode::<Shapes>(json!({
            "id": ID, "type": kind, "time": "2024-07-10T08:30:12Z", "data": data,
        }))
        .unwrap_err();
        assert!(matches!(error, DecodeError::Payload { .. }), "{error:?}");
        assert_eq!(error.name(), Some(kind));
    }
}

#[test]
fn a_broken_envelope_says_as_much_of_the_event_as_it_can() {
    let at = |json: Value| decode::<Shapes>(json).unwrap_err();

    let not_json = JsonCodec.decode::<Shapes>(b"{\"id\": ").unwrap_err();
    assert!(matches!(not_json, DecodeError::Malformed { .. }));
    assert_eq!(not_json.to_string(), "malformed event");
    assert_eq!((not_json.name(), not_json.id()), (None, None));
    assert!(matches!(at(json!([1, 2])), DecodeError::Malformed { .. }));

    let no_type = at(json!({"id": ID, "time": "2024-07-10T08:30:12Z"}));
    assert!(
        matches!(no_type, DecodeError::Envelope { .. }),
        "{no_type:?}"
    );
    assert_eq!(
        no_type.to_string(),
        "malformed event envelope: `type` is missing or not a string"
    );
    assert_eq!(no_type.id(), Some(Uuid::parse_str(ID).unwrap()));

    let bad_id =
        at(json!({"id": "seven", "type": "cache.flushed", "time": "2024-07-10T08:30:12Z"}));
    assert!(matches!(bad_id, DecodeError::Id { ref value, .. } if value == "seven"));
    assert_eq!(bad_id.to_string(), "invalid event id `seven`");
    assert_eq!((bad_id.name(), bad_id.id()), (Some("cache.flushed"), None));

    let bad_time = at(json!({"id": ID, "type": "cache.flushed", "time": "yesterday"}));
    assert!(matches!(bad_time, DecodeError::Time { .. }));
    assert_eq!(bad_time.to_string(), "invalid event time `yesterday`");
    assert_eq!(bad_time.name(), Some("cache.flushed"));

    let bad_trace = at(json!({
        "id": ID, "type": "cache.flushed", "time": "2024-07-10T08:30:12Z",
        "traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    }));
    assert!(matches!(bad_trace, DecodeError::TraceParent { .. }));
    assert_eq!(
        std::error::Error::source(&bad_trace).unwrap().to_string(),
        "traceparent trace-id is all zeros"
    );
    assert_eq!(bad_trace.id(), Some(Uuid::parse_str(ID).unwrap()));

    for (field, value) in [
        ("sequence", json!(-1)),
        ("priority", json!("urgent")),
        ("priority", json!(1)),
        ("traceparent", json!(7)),
    ] {
        let mut envelope =
            json!({"id": ID, "type": "cache.flushed", "time": "2024-07-10T08:30:12Z"});
        envelope[field] = value;
        let error = at(envelope);
        assert!(matches!(error, DecodeError::Envelope { .. }), "{error:?}");
        assert!(error.to_string().contains(field), "{error}");
        assert_eq!(error.name(), Some("cache.flushed"));
    }
}

#[test]
fn a_minimal_envelope_takes_the_defaults() {
    let decoded: Envelope<Shapes> = decode(json!({
        "id": ID, "type": "maybe", "time": "2024-07-10T10:30:12.5+02:00",
        "specversion": "1.0", "source": "/cms",
    }))
    .unwrap();
    assert_eq!(decoded.event(), &Shapes::Maybe(None)); // `data` absent: null
    assert_eq!(decoded.priority(), Priority::High); // the kind's
    assert_eq!(decoded.sequence(), 0);
    assert_eq!(
        decoded.emitted_at(),
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_720_600_212_500)
    );
}

/// serde skips a variant, so its variant indices are not the kinds'.
#[derive(Debug, DomainEvent, Serialize, Deserialize)]
enum Skipping {
    #[serde(skip)]
    Internal,
    Public(u64),
}

#[test]
fn a_variant_skipped_by_serde_is_caught_not_misread() {
    let bytes = JsonCodec
        .encode(&Envelope::new(Skipping::Public(1)))
        .unwrap();
    let error = JsonCodec.decode::<Skipping>(&bytes).unwrap_err();
    assert!(matches!(error, DecodeError::Payload { .. }), "{error:?}");
    assert!(error.to_string().contains("skipped by serde"), "{error}");

    let error = JsonCodec
        .encode(&Envelope::new(Skipping::Internal))
        .unwrap_err();
    assert!(matches!(
        error,
        EncodeError::Serialize {
            name: "internal",
            ..
        }
    ));
    assert_eq!(
        error.to_string(),
        "event `internal` could not be serialized"
    );
}

/// An internally tagged enum cannot be told from its payload.
#[derive(Debug, DomainEvent, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum Tagged {
    Ping { n: u64 },
}

#[test]
fn an_enum_that_is_not_externally_tagged_is_refused() {
    let error = JsonCodec
        .encode(&Envelope::new(Tagged::Ping { n: 1 }))
        .unwrap_err();
    assert!(matches!(
        error,
        EncodeError::NotExternallyTagged { name: "ping" }
    ));
    assert_eq!(error.name(), "ping");
}

#[test]
fn a_time_rfc_3339_cannot_write_is_an_encode_error() {
    let far = Metadata::new(Uuid::nil())
        .with_emitted_at(SystemTime::UNIX_EPOCH + Duration::from_secs(400 * 365 * 86_400 * 25));
    let error = JsonCodec
        .encode(&Envelope::from_parts(Shapes::CacheFlushed, far))
        .unwrap_err();
    assert!(matches!(
        error,
        EncodeError::Time {
            name: "cache.flushed"
        }
    ));
    assert_eq!(EventKind::name(ShapesKind::CacheFlushed), error.name());
}

/// Internally tagged unit variants, and untagged enums, start no variant
/// either: their bytes would never decode.
#[derive(Debug, DomainEvent, Serialize, Deserialize)]
#[serde(tag = "t")]
enum TaggedUnit {
    Flushed,
}

#[derive(Debug, DomainEvent, Serialize, Deserialize)]
#[serde(untagged)]
enum Untagged {
    Named(String),
    Counted(u64),
}

#[test]
fn internally_tagged_units_and_untagged_enums_are_refused_too() {
    let tagged = JsonCodec.encode(&Envelope::new(TaggedUnit::Flushed));
    assert!(
        matches!(
            tagged,
            Err(EncodeError::NotExternallyTagged { name: "flushed" })
        ),
        "{tagged:?}"
    );
    for event in [Untagged::Named("ada".into()), Untagged::Counted(7)] {
        let encoded = JsonCodec.encode(&Envelope::new(event));
        assert!(
            matches!(encoded, Err(EncodeError::NotExternallyTagged { .. })),
            "{encoded:?}"
        );
    }
}

/// serde lists a variant's aliases among its variants.
#[derive(Debug, PartialEq, DomainEvent, Serialize, Deserialize)]
enum SerdeAliased {
    #[serde(alias = "UserRegistered")]
    UserCreated(u64),
    PostPublished(u64),
}

#[test]
fn a_serde_alias_on_a_variant_does_not_stop_decoding() {
    for event in [SerdeAliased::UserCreated(1), SerdeAliased::PostPublished(3)] {
        let envelope = Envelope::new(event);
        let bytes = JsonCodec.encode(&envelope).unwrap();
        let decoded: Envelope<SerdeAliased> = JsonCodec.decode(&bytes).unwrap();
        assert_eq!(decoded.event(), envelope.event());
    }
}

#[test]
fn a_time_the_encoder_could_not_write_back_does_not_decode() {
    for time in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00+01:00"] {
        let bytes = format!(
            r#"{{"id":"0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73","type":"cache.flushed","time":"{time}"}}"#
        );
        let decoded = JsonCodec.decode::<Shapes>(bytes.as_bytes());
        assert!(
            matches!(decoded, Err(DecodeError::Time { .. })),
            "{time}: {decoded:?}"
        );
    }
    // The years' ends themselves still read.
    let bytes = br#"{"id":"0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73","type":"cache.flushed","time":"9999-12-31T23:59:59Z"}"#;
    let decoded = JsonCodec.decode::<Shapes>(bytes).unwrap();
    assert!(JsonCodec.encode(&decoded).is_ok());
}
