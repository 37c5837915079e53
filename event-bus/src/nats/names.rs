//! Names the tier gives things on the server: subjects, stream and
//! consumer names, headers.

/// The header that addresses a redriven event to one listener.
pub(crate) const REDRIVE: &str = "Event-Bus-Redrive";
/// Dead-letter headers: the listener that gave up, its attempts, the last
/// error, when, and where the event was.
pub(crate) const LISTENER: &str = "Event-Bus-Listener";
pub(crate) const ATTEMPTS: &str = "Event-Bus-Attempts";
pub(crate) const ERROR: &str = "Event-Bus-Error";
pub(crate) const FAILED_AT: &str = "Event-Bus-Failed-At";
pub(crate) const SUBJECT: &str = "Event-Bus-Subject";
pub(crate) const SEQUENCE: &str = "Event-Bus-Sequence";
pub(crate) const TRACEPARENT: &str = "traceparent";
/// On a dead letter whose event was too large to keep beside its headers:
/// the event's size. The event stays in the event stream, at its sequence.
pub(crate) const DROPPED: &str = "Event-Bus-Payload-Dropped";

/// The longest error text a dead letter's header keeps.
pub(crate) const MAX_HEADER: usize = 2048;

/// `name` as one subject token and a consumer name: letters, digits, `-`
/// and `_` kept, anything else (`.`, `*`, `>`, spaces, `:`) as `_`, and,
/// when anything was replaced, a hash of the original appended, so that two
/// names that differ only there stay apart.
pub(crate) fn token(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == name && !name.is_empty() {
        clean
    } else {
        format!("{clean}_{:08x}", fnv1a(name.as_bytes()))
    }
}

/// What a redrive names `listener` by when its name leaves the event too
/// little room under the server's `max_payload`: `#` and a 64-bit hash of
/// it, which the listener's pump takes as its name.
pub(crate) fn redrive_tag(listener: &str) -> String {
    let hash = listener
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("#{hash:016x}")
}

/// 32-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// A stream name from a subject prefix: upper case, `.` and other
/// characters a stream name cannot hold as `_`.
pub(crate) fn stream_of(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `text` as a header value: on one line, and at most [`MAX_HEADER`] bytes.
pub(crate) fn header_value(text: &str) -> String {
    header_value_within(text, MAX_HEADER)
}

/// `text` as a header value: on one line, and at most `max` bytes (cut at a
/// character's boundary).
pub(crate) fn header_value_within(text: &str, max: usize) -> String {
    let mut value: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if value.len() > max {
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_plain_names_and_keep_replaced_ones_apart() {
        assert_eq!(token("indexer"), "indexer");
        assert_ne!(token("a.b"), token("a_b"));
        assert!(token("a b>*").starts_with("a_b___"));
        assert!(!token("").is_empty());
    }

    #[test]
    fn header_values_are_one_bounded_line() {
        assert_eq!(header_value("a\r\nb"), "a  b");
        assert_eq!(header_value(&"é".repeat(2000)).len(), MAX_HEADER);
    }
}
