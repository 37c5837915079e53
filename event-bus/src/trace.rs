//! [`TraceParent`]: the W3C Trace Context `traceparent` header, carried with
//! an event so that a trace crosses the process boundary with it.

use std::fmt;
use std::str::FromStr;

use crate::error::ParseTraceParentError;

/// A W3C [Trace Context] `traceparent`: the trace an event belongs to and
/// the span that emitted it.
///
/// The header is `{version}-{trace-id}-{parent-id}-{trace-flags}` in
/// lowercase hex: `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
/// Parsing follows the specification:
///
/// - version `00` is exactly 55 characters; version `ff` is invalid;
/// - a later version is read by the version-`00` rules, ignoring whatever
///   follows the flags after a `-`, and only its *sampled* flag is kept, since
///   the meaning of its other flags is not known; it is written back as
///   version `00`, the one format this type writes;
/// - every field is lowercase hex of its exact length, and neither id may be
///   all zeros.
///
/// The bus does not read or make trace contexts: an
/// [`Envelope`](crate::Envelope) carries one when its
/// [`Metadata`](crate::Metadata) was given one, so a tier that decodes events
/// from elsewhere keeps the trace they were emitted in.
///
/// [Trace Context]: https://www.w3.org/TR/trace-context/
///
/// # Examples
///
/// ```
/// use event_bus::TraceParent;
///
/// let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let parent: TraceParent = header.parse()?;
/// assert_eq!(parent.trace_id()[..2], [0x4b, 0xf9]);
/// assert_eq!(parent.parent_id(), [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
/// assert!(parent.sampled());
/// assert_eq!(parent.to_string(), header);
///
/// assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01"
///     .parse::<TraceParent>()
///     .is_err());
/// # Ok::<(), event_bus::error::ParseTraceParentError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// The bit of the flags that says the caller may have recorded the trace.
const SAMPLED: u8 = 0x01;

/// The length of a version-`00` header, and the least of any version.
const LEN: usize = 55;

impl TraceParent {
    /// A trace context from its parts, or `None` when either id is all
    /// zeros, which the specification makes invalid.
    ///
    /// `flags` is the trace-flags byte: bit 0 is *sampled*.
    ///
    /// # Examples
    ///
    /// ```
    /// use event_bus::TraceParent;
    ///
    /// let parent = TraceParent::new([1; 16], [2; 8], 0x01).unwrap();
    /// assert_eq!(
    ///     parent.to_string(),
    ///     "00-01010101010101010101010101010101-0202020202020202-01",
    /// );
    /// assert_eq!(TraceParent::new([0; 16], [2; 8], 0x01), None);
    /// ```
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> Option<Self> {
        let valid = trace_id != [0; 16] && parent_id != [0; 8];
        valid.then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The id of the whole trace: 16 bytes, never all zeros.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The id of the span the event was emitted in (the header's
    /// `parent-id`): 8 bytes, never all zeros.
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The trace-flags byte. Test bits with a mask: flags are a bit field.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the caller may have recorded the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

impl FromStr for TraceParent {
    type Err = ParseTraceParentError;

    /// Parses a `traceparent` header value, by the rules listed on
    /// [`TraceParent`].
    ///
    /// # Errors
    ///
    /// [`ParseTraceParentError`] says which rule the header breaks.
    fn from_str(header: &str) -> Result<Self, Self::Err> {
        let bytes = header.as_bytes();
        if bytes.len() < LEN {
            return Err(ParseTraceParentError::Length);
        }
        let version = hex_field::<1>(&bytes[0..2], "version")?[0];
        if version == 0xff {
            return Err(ParseTraceParentError::Version);
        }
        let future = version != 0;
        // Version 00 ends at the flags; a later one may go on after a dash.
        if bytes.len() > LEN && (!future || bytes[LEN] != b'-') {
            return Err(if future {
                ParseTraceParentError::Format
            } else {
                ParseTraceParentError::Length
            });
        }
        if [bytes[2], bytes[35], bytes[52]] != [b'-'; 3] {
            return Err(ParseTraceParentError::Format);
        }
        let trace_id = hex_field::<16>(&bytes[3..35], "trace-id")?;
        let parent_id = hex_field::<8>(&bytes[36..52], "parent-id")?;
        let flags = hex_field::<1>(&bytes[53..55], "trace-flags")?[0];
        if trace_id == [0; 16] {
            return Err(ParseTraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(ParseTraceParentError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: if future { flags & SAMPLED } else { flags },
        })
    }
}

/// The `N` bytes that `hex`, `2 * N` lowercase hex digits, spells.
fn hex_field<const N: usize>(
    hex: &[u8],
    field: &'static str,
) -> Result<[u8; N], ParseTraceParentError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ParseTraceParentError::Hex { field }),
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(out)
}

impl fmt::Display for TraceParent {
    /// Writes the header value, always as version `00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for byte in self.trace_id {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("-")?;
        for byte in self.parent_id {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The examples of the specification's `traceparent` section.
    const SAMPLED_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    fn parse(header: &str) -> Result<TraceParent, ParseTraceParentError> {
        header.parse()
    }

    #[test]
    fn reads_the_specification_examples() {
        let sampled = parse(SAMPLED_EXAMPLE).unwrap();
        assert_eq!(
            sampled.trace_id(),
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            sampled.parent_id(),
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(sampled.flags(), 0x01);
        assert!(sampled.sampled());

        let unsampled = parse(UNSAMPLED_EXAMPLE).unwrap();
        assert_eq!(unsampled.trace_id(), sampled.trace_id());
        assert!(!unsampled.sampled());
    }

    #[test]
    fn writes_back_what_it_read() {
        for header in [SAMPLED_EXAMPLE, UNSAMPLED_EXAMPLE] {
            assert_eq!(parse(header).unwrap().to_string(), header);
        }
    }

    #[test]
    fn keeps_unknown_flags_of_version_00() {
        let parent = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
        assert_eq!(parent.flags(), 0x03);
        assert!(parent.sampled());
        assert!(parent.to_string().ends_with("-03"));
    }

    #[test]
    fn rejects_wrong_lengths() {
        assert_eq!(parse(""), Err(ParseTraceParentError::Length));
        assert_eq!(
            parse(&SAMPLED_EXAMPLE[..54]),
            Err(ParseTraceParentError::Length)
        );
        // Version 00 has nothing after the flags, not even a dash.
        for tail in ["0", "-", "-00"] {
            assert_eq!(
                parse(&format!("{SAMPLED_EXAMPLE}{tail}")),
                Err(ParseTraceParentError::Length),
                "{tail:?}"
            );
        }
    }

    #[test]
    fn rejects_fields_of_the_wrong_length() {
        // Same total length, dashes moved: a 31-digit trace id and a 17-digit parent id.
        assert_eq!(
            parse("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01"),
            Err(ParseTraceParentError::Format)
        );
        assert_eq!(
            parse("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01"),
            Err(ParseTraceParentError::Format)
        );
    }

    #[test]
    fn rejects_uppercase_and_non_hex() {
        let cases = [
            (
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "trace-id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                "parent-id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
                "trace-flags",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "trace-id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
                "trace-flags",
            ),
        ];
        for (header, field) in cases {
            assert_eq!(
                parse(header),
                Err(ParseTraceParentError::Hex { field }),
                "{header}"
            );
        }
    }

    #[test]
    fn rejects_all_zero_ids() {
        assert_eq!(
            parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(ParseTraceParentError::ZeroTraceId)
        );
        assert_eq!(
            parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(ParseTraceParentError::ZeroParentId)
        );
        assert_eq!(TraceParent::new([0; 16], [1; 8], 0), None);
        assert_eq!(TraceParent::new([1; 16], [0; 8], 0), None);
    }

    #[test]
    fn rejects_version_ff() {
        assert_eq!(
            parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Err(ParseTraceParentError::Version)
        );
    }

    #[test]
    fn reads_a_later_version_by_the_rules_of_00() {
        let exact = parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let longer =
            parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next")
                .unwrap();
        assert_eq!(exact, longer);
        assert_eq!(exact.to_string(), SAMPLED_EXAMPLE);
        // Only the sampled flag has a meaning known across versions.
        let flagged = parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").unwrap();
        assert_eq!(flagged.flags(), 0x01);
        // After the flags, a later version has the end or a dash.
        assert_eq!(
            parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            Err(ParseTraceParentError::Format)
        );
        // Its ids are checked as strictly.
        assert_eq!(
            parse("01-00000000000000000000000000000000-00f067aa0ba902b7-01-x"),
            Err(ParseTraceParentError::ZeroTraceId)
        );
    }

    #[test]
    fn errors_read_as_short_lowercase_sentences() {
        assert_eq!(
            ParseTraceParentError::Hex { field: "trace-id" }.to_string(),
            "traceparent trace-id is not lowercase hex"
        );
        assert_eq!(
            ParseTraceParentError::Version.to_string(),
            "traceparent version ff is invalid"
        );
    }
}
