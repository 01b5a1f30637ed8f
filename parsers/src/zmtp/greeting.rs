//! The 64-byte ZMTP 3 greeting, parsed incrementally.
//!
//! libzmq sends it in stages (10-byte signature, then the major version byte once it
//! has the peer's signature, then the rest once it has the peer's major), so a
//! proxy must act on a partial greeting: [`parse_greeting_prefix`] validates every
//! prefix and says which stage is complete.

use nom::bytes::streaming::take;
use nom::number::streaming::{be_u64, be_u8};
use nom::{IResult, Parser};

use super::ZmtpError;

/// Length of a ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
/// Length of the signature (0xFF, 8 padding bytes, 0x7F): stage one of the greeting.
pub const SIGNATURE_LEN: usize = 10;
/// End of stage two: the signature and the major version byte.
pub const MAJOR_END: usize = 11;
const MECHANISM_OFFSET: usize = 12;
const MECHANISM_LEN: usize = 20;
const AS_SERVER_OFFSET: usize = 32;
const FILLER_LEN: usize = 31;

/// A security mechanism name as the greeting carries it: 20 bytes, NUL padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mechanism(pub [u8; MECHANISM_LEN]);

impl Mechanism {
    /// The NULL mechanism, the only one ps-lite uses.
    pub const NULL: Mechanism = Mechanism(*b"NULL\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");

    /// The name without its padding.
    pub fn name(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(MECHANISM_LEN);
        &self.0[..end]
    }
}

impl std::fmt::Debug for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mechanism({})", String::from_utf8_lossy(self.name()))
    }
}

/// A complete ZMTP 3 greeting. Every byte is kept so that encoding reproduces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Signature padding, bytes 1-8. libzmq writes `identity length + 1` there for
    /// ZMTP 1.0 peers; ps-lite DEALERs with identity `ps9` send 4.
    pub signature_padding: u64,
    /// Major version (3).
    pub major: u8,
    /// Minor version (0 for libzmq 4.2.2, 1 for newer).
    pub minor: u8,
    /// Security mechanism (NULL for ps-lite).
    pub mechanism: Mechanism,
    /// As-server flag (only meaningful for PLAIN/CURVE).
    pub as_server: bool,
    /// Filler, zero in practice; kept so that odd peers re-encode exactly.
    pub filler: [u8; FILLER_LEN],
}

impl Greeting {
    /// A ZMTP 3.0 NULL greeting as libzmq 4.2.2 sends it for a socket whose
    /// identity is `identity_len` bytes long.
    pub fn null(identity_len: usize) -> Greeting {
        Greeting {
            signature_padding: identity_len as u64 + 1,
            major: 3,
            minor: 0,
            mechanism: Mechanism::NULL,
            as_server: false,
            filler: [0; FILLER_LEN],
        }
    }

    /// The 64 wire bytes. Stages are `[..SIGNATURE_LEN]`, `[SIGNATURE_LEN..MAJOR_END]`
    /// and `[MAJOR_END..]`.
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut out = [0u8; GREETING_LEN];
        out[0] = 0xFF;
        out[1..9].copy_from_slice(&self.signature_padding.to_be_bytes());
        out[9] = 0x7F;
        out[10] = self.major;
        out[11] = self.minor;
        out[MECHANISM_OFFSET..MECHANISM_OFFSET + MECHANISM_LEN].copy_from_slice(&self.mechanism.0);
        out[AS_SERVER_OFFSET] = u8::from(self.as_server);
        out[AS_SERVER_OFFSET + 1..].copy_from_slice(&self.filler);
        out
    }
}

/// How much of a greeting a prefix holds, once every byte of it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetingProgress {
    /// Fewer than [`SIGNATURE_LEN`] bytes, all valid so far.
    Partial,
    /// The signature is complete: send our major version byte.
    Signature,
    /// The major version is known and supported: send the rest of our greeting.
    Major(u8),
    /// The whole greeting.
    Complete(Greeting),
}

/// Validates a greeting prefix of any length (bytes past 64 are ignored) and
/// reports the last complete stage. Fails as soon as a byte is wrong, so a peer
/// that is not ZMTP is recognised from its first byte.
pub fn parse_greeting_prefix(input: &[u8]) -> Result<GreetingProgress, ZmtpError> {
    let input = &input[..input.len().min(GREETING_LEN)];
    if let Some(&b) = input.first() {
        if b != 0xFF {
            return Err(ZmtpError::BadSignature {
                offset: 0,
                found: b,
            });
        }
    }
    if let Some(&b) = input.get(9) {
        if b != 0x7F {
            return Err(ZmtpError::BadSignature {
                offset: 9,
                found: b,
            });
        }
    }
    if let Some(&major) = input.get(10) {
        if major < 3 {
            let minor = input.get(11).copied().unwrap_or(0);
            return Err(ZmtpError::UnsupportedVersion { major, minor });
        }
    }
    let mech_end = input.len().min(MECHANISM_OFFSET + MECHANISM_LEN);
    if input.len() > MECHANISM_OFFSET {
        check_mechanism(
            &input[MECHANISM_OFFSET..mech_end],
            mech_end == MECHANISM_OFFSET + MECHANISM_LEN,
        )?;
    }
    if let Some(&b) = input.get(AS_SERVER_OFFSET) {
        if b > 1 {
            return Err(ZmtpError::BadAsServer(b));
        }
    }
    Ok(match input.len() {
        GREETING_LEN => match parse_greeting(input) {
            Ok((_, g)) => GreetingProgress::Complete(g),
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => return Err(e),
            Err(nom::Err::Incomplete(_)) => unreachable!("64 bytes are a whole greeting"),
        },
        n if n >= MAJOR_END => GreetingProgress::Major(input[10]),
        n if n >= SIGNATURE_LEN => GreetingProgress::Signature,
        _ => GreetingProgress::Partial,
    })
}

/// Checks a (possibly partial) mechanism field: a name of `A-Z0-9-_.+`, then NULs.
fn check_mechanism(field: &[u8], whole: bool) -> Result<(), ZmtpError> {
    let name_len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let (name, padding) = field.split_at(name_len);
    let name_ok = name
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"-_.+".contains(b));
    let empty_whole = whole && name.is_empty();
    if !name_ok || padding.iter().any(|&b| b != 0) || empty_whole || field.first() == Some(&0) {
        return Err(ZmtpError::BadMechanism);
    }
    Ok(())
}

/// Parses a whole greeting (streaming: fewer than 64 bytes is `Incomplete`).
pub fn parse_greeting(input: &[u8]) -> IResult<&[u8], Greeting, ZmtpError> {
    let start = input;
    let (input, (sig0, signature_padding, sig9, major, minor, mech, as_server, filler)) = (
        be_u8,
        be_u64,
        be_u8,
        be_u8,
        be_u8,
        take(MECHANISM_LEN),
        be_u8,
        take(FILLER_LEN),
    )
        .parse(input)?;
    let fail = |e| Err(nom::Err::Failure(e));
    if sig0 != 0xFF {
        return fail(ZmtpError::BadSignature {
            offset: 0,
            found: sig0,
        });
    }
    if sig9 != 0x7F {
        return fail(ZmtpError::BadSignature {
            offset: 9,
            found: sig9,
        });
    }
    if major < 3 {
        return fail(ZmtpError::UnsupportedVersion { major, minor });
    }
    if let Err(e) = check_mechanism(mech, true) {
        return fail(e);
    }
    if as_server > 1 {
        return fail(ZmtpError::BadAsServer(as_server));
    }
    debug_assert_eq!(start.len() - input.len(), GREETING_LEN);
    let mut mechanism = [0u8; MECHANISM_LEN];
    mechanism.copy_from_slice(mech);
    let mut fill = [0u8; FILLER_LEN];
    fill.copy_from_slice(filler);
    Ok((
        input,
        Greeting {
            signature_padding,
            major,
            minor,
            mechanism: Mechanism(mechanism),
            as_server: as_server == 1,
            filler: fill,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_of_a_libzmq_greeting_is_valid_and_staged() {
        let bytes = Greeting::null(3).encode();
        for n in 0..=GREETING_LEN {
            let progress = parse_greeting_prefix(&bytes[..n]).unwrap();
            let expected = match n {
                0..=9 => GreetingProgress::Partial,
                10 => GreetingProgress::Signature,
                11..=63 => GreetingProgress::Major(3),
                _ => GreetingProgress::Complete(Greeting::null(3)),
            };
            assert_eq!(progress, expected, "prefix of {n} bytes");
            if n < GREETING_LEN {
                assert!(matches!(
                    parse_greeting(&bytes[..n]),
                    Err(nom::Err::Incomplete(_))
                ));
            }
        }
    }

    #[test]
    fn non_zmtp_first_byte_is_refused_at_once() {
        assert_eq!(
            parse_greeting_prefix(b"G"),
            Err(ZmtpError::BadSignature {
                offset: 0,
                found: b'G'
            })
        );
    }

    #[test]
    fn zmtp2_peer_is_unsupported() {
        let mut bytes = Greeting::null(0).encode();
        bytes[10] = 1;
        assert_eq!(
            parse_greeting_prefix(&bytes[..11]),
            Err(ZmtpError::UnsupportedVersion { major: 1, minor: 0 })
        );
    }

    #[test]
    fn mechanism_must_be_a_padded_name() {
        let mut bytes = Greeting::null(0).encode();
        bytes[14] = 0; // "NU\0L"
        assert_eq!(parse_greeting_prefix(&bytes), Err(ZmtpError::BadMechanism));
        let mut bytes = Greeting::null(0).encode();
        bytes[12] = b'n';
        assert_eq!(
            parse_greeting_prefix(&bytes[..13]),
            Err(ZmtpError::BadMechanism)
        );
    }
}
