//! Microversions: parsing the request headers and negotiating against what we honour.
//!
//! Cinder reads `OpenStack-API-Version: volume 3.44` (and the legacy
//! `X-OpenStack-Volume-API-Version: 3.44`); `latest` means our maximum; no header means 3.0.

use std::fmt;

/// A `major.minor` API version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Microversion {
    pub major: u32,
    pub minor: u32,
}

impl Microversion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Microversion { major, minor }
    }
    /// True when the request asked for at least `major.minor`.
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        self >= Microversion::new(major, minor)
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Lowest version served.
pub const MIN: Microversion = Microversion::new(3, 0);
/// Highest version served. 3.67 makes the project id optional in URLs, which clients rely on.
/// Every response shape change up to here that clients read is implemented (see `api/views.rs`).
pub const MAX: Microversion = Microversion::new(3, 67);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("Invalid API version request string {0:?}.")]
    Malformed(String),
    #[error("Version {0} is not supported by the API. Minimum is {MIN} and maximum is {MAX}.")]
    OutOfRange(Microversion),
}

/// Parses `3.44` or `latest`.
pub fn parse_version(text: &str) -> Result<Microversion, VersionError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("latest") {
        return Ok(MAX);
    }
    let malformed = || VersionError::Malformed(text.to_string());
    let (major, minor) = text.split_once('.').ok_or_else(malformed)?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return Err(malformed());
    }
    let major = major.parse().map_err(|_| malformed())?;
    let minor = minor.parse().map_err(|_| malformed())?;
    Ok(Microversion::new(major, minor))
}

/// Chooses the request's version from the two headers' values (either may be absent).
/// `OpenStack-API-Version` may list several services separated by commas; only `volume`
/// (or the legacy `block-storage`) entries count.
pub fn negotiate(
    openstack_api_version: Option<&str>,
    legacy_header: Option<&str>,
) -> Result<Microversion, VersionError> {
    let mut requested = None;
    if let Some(value) = openstack_api_version {
        for item in value.split(',') {
            let mut words = item.split_whitespace();
            let service = words.next().unwrap_or("");
            if service.eq_ignore_ascii_case("volume")
                || service.eq_ignore_ascii_case("block-storage")
            {
                let version = words.next().ok_or_else(|| VersionError::Malformed(item.into()))?;
                if words.next().is_some() {
                    return Err(VersionError::Malformed(item.trim().into()));
                }
                requested = Some(parse_version(version)?);
            }
        }
    }
    if let (None, Some(value)) = (requested, legacy_header) {
        requested = Some(parse_version(value)?);
    }
    let version = requested.unwrap_or(MIN);
    if version < MIN || version > MAX {
        return Err(VersionError::OutOfRange(version));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_table() {
        let v = |a, b| Ok(Microversion::new(a, b));
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<Microversion, VersionError>);
        let cases: &[Case] = &[
            (None, None, v(3, 0)),
            (Some("volume 3.44"), None, v(3, 44)),
            (Some("volume latest"), None, Ok(MAX)),
            (Some("compute 2.1, volume 3.27"), None, v(3, 27)),
            (Some("compute 2.1"), None, v(3, 0)),
            (None, Some("3.50"), v(3, 50)),
            (Some("volume 3.10"), Some("3.50"), v(3, 10)),
            (Some("block-storage 3.5"), None, v(3, 5)),
            (Some("volume 3.67"), None, v(3, 67)),
            (Some("volume 3.68"), None, Err(VersionError::OutOfRange(Microversion::new(3, 68)))),
            (Some("volume 2.0"), None, Err(VersionError::OutOfRange(Microversion::new(2, 0)))),
            (Some("volume 4.0"), None, Err(VersionError::OutOfRange(Microversion::new(4, 0)))),
            (Some("volume 3"), None, Err(VersionError::Malformed("3".into()))),
            (Some("volume 3.x"), None, Err(VersionError::Malformed("3.x".into()))),
            (Some("volume -3.1"), None, Err(VersionError::Malformed("-3.1".into()))),
            (
                Some("volume 3.99999999999"),
                None,
                Err(VersionError::Malformed("3.99999999999".into())),
            ),
            (Some("volume"), None, Err(VersionError::Malformed("volume".into()))),
            (Some("volume 3.1 3.2"), None, Err(VersionError::Malformed("volume 3.1 3.2".into()))),
        ];
        for (header, legacy, expected) in cases {
            assert_eq!(&negotiate(*header, *legacy), expected, "{header:?} {legacy:?}");
        }
    }

    #[test]
    fn ordering_is_numeric_not_lexical() {
        assert!(Microversion::new(3, 10) > Microversion::new(3, 9));
        assert!(Microversion::new(3, 44).at_least(3, 27));
        assert!(!Microversion::new(3, 26).at_least(3, 27));
        assert_eq!(MAX.to_string(), "3.67");
    }
}
