//! Peer authentication at connection set-up: DRBD's `cram-hmac-alg` / `shared-secret`, as a
//! pure challenge-response exchange (the driver moves the bytes; the random challenge is
//! passed in).
//!
//! Both ends run the same three steps, in both directions at once, before any frame of the
//! peer protocol is exchanged:
//! 1. each sends a `Challenge` message: the algorithm it is configured with (none or
//!    HMAC-SHA256) and 32 random bytes;
//! 2. each answers the peer's challenge with HMAC-SHA256(secret, domain tag, challenge, the
//!    responder's node id, the challenger's node id) and checks the peer's answer to its own
//!    challenge (in constant time);
//! 3. each sends a one-byte verdict, so that both ends can log why a connection was refused.
//!
//! Binding both node ids into the MAC keeps a peer without the secret from reflecting our
//! own challenge back at us and replaying our answer as its own; a peer echoing our challenge
//! is refused outright. A node configured without a secret still takes part (algorithm
//! "none"), so that a secret on one side only is a clear refusal, not a garbled stream.

use crate::NodeId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// Random bytes per challenge (SHA-256's output size, as DRBD uses for its challenges).
pub const CHALLENGE_BYTES: usize = 32;
/// Magic, algorithm, three reserved bytes, the challenge.
pub const CHALLENGE_MESSAGE_BYTES: usize = 8 + CHALLENGE_BYTES;
/// An HMAC-SHA256 tag (all zero under algorithm "none").
pub const RESPONSE_MESSAGE_BYTES: usize = 32;
/// Magic and the verdict byte.
pub const VERDICT_MESSAGE_BYTES: usize = 8;
/// Longest shared secret accepted (DRBD's SHARED_SECRET_MAX is 64).
pub const SHARED_SECRET_BYTES_MAX: usize = 64;

const CHALLENGE_MAGIC: [u8; 4] = *b"TDNA";
const VERDICT_MAGIC: [u8; 4] = *b"TDNV";
const DOMAIN_TAG: &[u8] = b"tandem peer auth v1";

const _: () = assert!(RESPONSE_MESSAGE_BYTES == 32, "an HMAC-SHA256 tag");
const _: () = assert!(CHALLENGE_MESSAGE_BYTES > CHALLENGE_BYTES);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthAlgorithm {
    None,
    HmacSha256,
}

impl AuthAlgorithm {
    fn to_wire(self) -> u8 {
        match self {
            Self::None => 0,
            Self::HmacSha256 => 1,
        }
    }

    fn from_wire(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::None),
            1 => Some(Self::HmacSha256),
            _ => None,
        }
    }

    /// The name drbd.conf uses for `cram-hmac-alg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::HmacSha256 => "sha256",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("authentication algorithms differ: ours is {ours}, the peer's is {theirs}")]
    AlgorithmMismatch { ours: &'static str, theirs: &'static str },
    #[error("peer's authentication response is wrong (shared-secret differs)")]
    WrongResponse,
    #[error("peer refused our authentication response (shared-secret differs)")]
    RefusedByPeer,
    #[error("peer echoed our own challenge")]
    ReflectedChallenge,
    #[error("malformed authentication message ({0})")]
    Malformed(&'static str),
    #[error("authentication message out of order")]
    OutOfOrder,
}

/// What the exchange waits for next (named after the expected message, as rustls does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ExpectChallenge,
    ExpectResponse,
    ExpectVerdict,
    Done,
}

/// One side of the exchange.
pub struct Authenticator {
    algorithm: AuthAlgorithm,
    mac: Option<Hmac<Sha256>>,
    my_id: NodeId,
    peer_id: NodeId,
    my_challenge: [u8; CHALLENGE_BYTES],
    state: State,
}

impl std::fmt::Debug for Authenticator {
    // The keyed MAC state must not end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .field("my_id", &self.my_id)
            .field("peer_id", &self.peer_id)
            .field("state", &self.state)
            .finish()
    }
}

impl Authenticator {
    /// `secret: None` is "no cram-hmac-alg". The secret's length is checked by the caller's
    /// configuration (`check_secret`).
    pub fn new(
        secret: Option<&[u8]>,
        my_id: NodeId,
        peer_id: NodeId,
        random_challenge: [u8; CHALLENGE_BYTES],
    ) -> Self {
        let mac = secret.map(|s| {
            assert!(check_secret(s).is_ok(), "secret length is checked at configuration");
            Hmac::<Sha256>::new_from_slice(s).expect("HMAC takes keys of any length")
        });
        let algorithm = if mac.is_some() { AuthAlgorithm::HmacSha256 } else { AuthAlgorithm::None };
        Self {
            algorithm,
            mac,
            my_id,
            peer_id,
            my_challenge: random_challenge,
            state: State::ExpectChallenge,
        }
    }

    pub fn algorithm(&self) -> AuthAlgorithm {
        self.algorithm
    }

    /// Step 1: what to send first.
    pub fn challenge_message(&self) -> [u8; CHALLENGE_MESSAGE_BYTES] {
        let mut out = [0u8; CHALLENGE_MESSAGE_BYTES];
        out[..4].copy_from_slice(&CHALLENGE_MAGIC);
        out[4] = self.algorithm.to_wire();
        out[8..].copy_from_slice(&self.my_challenge);
        out
    }

    /// Step 2: the peer's challenge arrived; returns our response to send.
    pub fn handle_challenge(
        &mut self,
        message: &[u8],
    ) -> Result<[u8; RESPONSE_MESSAGE_BYTES], AuthError> {
        if self.state != State::ExpectChallenge {
            return Err(AuthError::OutOfOrder);
        }
        if message.len() != CHALLENGE_MESSAGE_BYTES || message[..4] != CHALLENGE_MAGIC {
            return Err(AuthError::Malformed("challenge"));
        }
        let theirs =
            AuthAlgorithm::from_wire(message[4]).ok_or(AuthError::Malformed("algorithm"))?;
        if theirs != self.algorithm {
            return Err(AuthError::AlgorithmMismatch {
                ours: self.algorithm.as_str(),
                theirs: theirs.as_str(),
            });
        }
        let challenge = &message[8..];
        if self.algorithm == AuthAlgorithm::HmacSha256 && challenge == self.my_challenge {
            return Err(AuthError::ReflectedChallenge);
        }
        let mut response = [0u8; RESPONSE_MESSAGE_BYTES];
        if let Some(mac) = self.tag(challenge, self.my_id, self.peer_id) {
            response.copy_from_slice(&mac.finalize().into_bytes());
        }
        self.state = State::ExpectResponse;
        Ok(response)
    }

    /// Step 2, second half: the peer's answer to our challenge. On error, still send
    /// `verdict_message(false)` so that the peer can log why.
    pub fn handle_response(&mut self, message: &[u8]) -> Result<(), AuthError> {
        if self.state != State::ExpectResponse {
            return Err(AuthError::OutOfOrder);
        }
        if message.len() != RESPONSE_MESSAGE_BYTES {
            return Err(AuthError::Malformed("response"));
        }
        let challenge = self.my_challenge;
        if let Some(mac) = self.tag(&challenge, self.peer_id, self.my_id) {
            // Constant time: `verify_slice` compares without an early exit.
            mac.verify_slice(message).map_err(|_| AuthError::WrongResponse)?;
        }
        self.state = State::ExpectVerdict;
        Ok(())
    }

    /// Step 3: our verdict on the peer's response.
    pub fn verdict_message(accepted: bool) -> [u8; VERDICT_MESSAGE_BYTES] {
        let mut out = [0u8; VERDICT_MESSAGE_BYTES];
        out[..4].copy_from_slice(&VERDICT_MAGIC);
        out[4] = u8::from(accepted);
        out
    }

    /// Step 3, second half: the peer's verdict on our response. `Ok` means authenticated both
    /// ways: frames may flow.
    pub fn handle_verdict(&mut self, message: &[u8]) -> Result<(), AuthError> {
        if self.state != State::ExpectVerdict {
            return Err(AuthError::OutOfOrder);
        }
        if message.len() != VERDICT_MESSAGE_BYTES || message[..4] != VERDICT_MAGIC {
            return Err(AuthError::Malformed("verdict"));
        }
        match message[4] {
            1 => {
                self.state = State::Done;
                Ok(())
            }
            0 => Err(AuthError::RefusedByPeer),
            _ => Err(AuthError::Malformed("verdict")),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.state == State::Done
    }

    fn tag(&self, challenge: &[u8], responder: NodeId, challenger: NodeId) -> Option<Hmac<Sha256>> {
        let mut mac = self.mac.clone()?;
        mac.update(DOMAIN_TAG);
        mac.update(challenge);
        mac.update(&[responder.0, challenger.0]);
        Some(mac)
    }
}

/// A `shared-secret` must be non-empty and at most `SHARED_SECRET_BYTES_MAX` bytes.
pub fn check_secret(secret: &[u8]) -> Result<(), &'static str> {
    if secret.is_empty() {
        Err("shared-secret is empty")
    } else if secret.len() > SHARED_SECRET_BYTES_MAX {
        Err("shared-secret is longer than 64 bytes")
    } else {
        Ok(())
    }
}

/// Runs the whole exchange between two in-memory ends (the simulator uses it; the driver
/// runs the same steps over a socket). Returns each side's result.
pub fn exchange(
    a: &mut Authenticator,
    b: &mut Authenticator,
) -> (Result<(), AuthError>, Result<(), AuthError>) {
    let (ca, cb) = (a.challenge_message(), b.challenge_message());
    let ra = a.handle_challenge(&cb);
    let rb = b.handle_challenge(&ca);
    let (ra, rb) = match (ra, rb) {
        (Ok(ra), Ok(rb)) => (ra, rb),
        (ra, rb) => return (ra.map(|_| ()), rb.map(|_| ())),
    };
    let va = a.handle_response(&rb);
    let vb = b.handle_response(&ra);
    let fa = a.handle_verdict(&Authenticator::verdict_message(vb.is_ok()));
    let fb = b.handle_verdict(&Authenticator::verdict_message(va.is_ok()));
    (va.and(fa), vb.and(fb))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(0);
    const B: NodeId = NodeId(1);

    fn pair(sa: Option<&[u8]>, sb: Option<&[u8]>) -> (Authenticator, Authenticator) {
        (Authenticator::new(sa, A, B, [0xa5; 32]), Authenticator::new(sb, B, A, [0x5a; 32]))
    }

    #[test]
    fn outcomes_by_configuration() {
        type Row<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, bool, bool);
        let rows: [Row; 5] = [
            (Some(b"s3cret"), Some(b"s3cret"), true, true),
            (None, None, true, true),
            (Some(b"s3cret"), Some(b"other"), false, false),
            (Some(b"s3cret"), None, false, false),
            (None, Some(b"s3cret"), false, false),
        ];
        for (sa, sb, ok_a, ok_b) in rows {
            let (mut a, mut b) = pair(sa, sb);
            let (ra, rb) = exchange(&mut a, &mut b);
            assert_eq!(ra.is_ok(), ok_a, "{sa:?} vs {sb:?}: {ra:?}");
            assert_eq!(rb.is_ok(), ok_b, "{sa:?} vs {sb:?}: {rb:?}");
            assert_eq!(a.is_authenticated(), ok_a);
        }
        let (mut a, mut b) = pair(Some(b"s3cret"), Some(b"other"));
        assert_eq!(exchange(&mut a, &mut b).0, Err(AuthError::WrongResponse));
        let (mut a, mut b) = pair(Some(b"s3cret"), None);
        let (ra, _) = exchange(&mut a, &mut b);
        assert_eq!(ra, Err(AuthError::AlgorithmMismatch { ours: "sha256", theirs: "none" }));
    }

    #[test]
    fn a_reflected_challenge_or_response_is_refused() {
        let (mut a, _) = pair(Some(b"k"), Some(b"k"));
        // An attacker echoes our own challenge to obtain our answer for it ...
        let own = a.challenge_message();
        assert_eq!(a.handle_challenge(&own), Err(AuthError::ReflectedChallenge));
        // ... and our answer to its challenge is not a valid answer to ours (node ids bound).
        let (mut a, _) = pair(Some(b"k"), Some(b"k"));
        let mut attacker_view = Authenticator::new(Some(b"k"), A, B, [0xa5; 32]);
        let mut probe = a.challenge_message();
        probe[8] ^= 1;
        let ours_for_probe = attacker_view.handle_challenge(&probe).unwrap();
        a.handle_challenge(&probe).unwrap();
        assert_eq!(a.handle_response(&ours_for_probe), Err(AuthError::WrongResponse));
    }

    #[test]
    fn garbage_and_order_errors_do_not_panic() {
        let (mut a, _) = pair(Some(b"k"), Some(b"k"));
        assert_eq!(a.handle_response(&[0; 32]), Err(AuthError::OutOfOrder));
        assert!(matches!(a.handle_challenge(&[1, 2, 3]), Err(AuthError::Malformed(_))));
        let mut bad = Authenticator::new(None, B, A, [0; 32]).challenge_message();
        bad[4] = 9;
        assert!(matches!(a.handle_challenge(&bad), Err(AuthError::Malformed(_))));
        assert!(check_secret(b"").is_err());
        assert!(check_secret(&[7; 65]).is_err());
        assert!(check_secret(&[7; 64]).is_ok());
    }
}
