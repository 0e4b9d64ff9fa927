//! Text keys (RFC 7143 §6): `key=value` pairs separated by NUL bytes, and the values we
//! negotiate for a session.

use crate::constants::{
    BURST_BYTES_MAX, CONNECTIONS_PER_SESSION_MAX, FIRST_BURST_BYTES_MAX, OUTSTANDING_R2T_MAX,
    RECV_DATA_SEGMENT_BYTES_MAX,
};

/// Splits a text data segment into `(key, value)` pairs; pairs without `=` get an empty value
/// so they can be answered with `Reject` rather than dropped silently.
pub fn parse(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let text = String::from_utf8_lossy(item);
            match text.split_once('=') {
                Some((key, value)) => (key.to_string(), value.to_string()),
                None => (text.to_string(), String::new()),
            }
        })
        .collect()
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Parameters of a session after login, as RFC 7143 §13 negotiates them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub initiator_recv_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub default_time2wait_s: u32,
    pub default_time2retain_s: u32,
}

impl Default for SessionParams {
    /// RFC 7143 defaults, used for every key the initiator does not negotiate.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initiator_recv_data_segment_bytes: 8192,
            max_burst_bytes: 262_144,
            first_burst_bytes: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait_s: 2,
            default_time2retain_s: 20,
        }
    }
}

fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        value.parse().ok()
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "Yes" } else { "No" }
}

/// Outcome of negotiating one operational key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Answered (the answer is already appended).
    Answered,
    /// Not an operational key: the caller handles it.
    NotOperational,
}

/// Negotiates one operational key offered by the initiator, updating `params` and appending
/// our answer to `out`. Ranges follow RFC 7143 §13; out-of-range values are answered `Reject`.
pub fn negotiate_operational(
    params: &mut SessionParams,
    key: &str,
    value: &str,
    out: &mut Vec<u8>,
) -> KeyOutcome {
    let number = || parse_number(value);
    match key {
        "HeaderDigest" | "DataDigest" => {
            let chosen = value.split(',').find(|v| *v == "CRC32C" || *v == "None");
            match chosen {
                Some(v) => {
                    let on = v == "CRC32C";
                    if key == "HeaderDigest" {
                        params.header_digest = on;
                    } else {
                        params.data_digest = on;
                    }
                    push(out, key, v);
                }
                None => push(out, key, "Reject"),
            }
        }
        "MaxConnections" => match number() {
            Some(n) if (1..=65535).contains(&n) => {
                let chosen = n.min(u64::from(CONNECTIONS_PER_SESSION_MAX));
                params.max_connections = u32::try_from(chosen).unwrap_or(1);
                push(out, key, &chosen.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "InitialR2T" => match parse_bool(value) {
            // OR function: our own preference is No.
            Some(v) => {
                params.initial_r2t = v;
                push(out, key, yes_no(v));
            }
            None => push(out, key, "Reject"),
        },
        "ImmediateData" => match parse_bool(value) {
            // AND function: our own preference is Yes.
            Some(v) => {
                params.immediate_data = v;
                push(out, key, yes_no(v));
            }
            None => push(out, key, "Reject"),
        },
        "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
            // OR function with our Yes: the result is always Yes.
            Some(_) => push(out, key, "Yes"),
            None => push(out, key, "Reject"),
        },
        "MaxRecvDataSegmentLength" => match number() {
            Some(n) if (512..=16_777_215).contains(&n) => {
                params.initiator_recv_data_segment_bytes = u32::try_from(n).unwrap_or(8192);
                push(out, key, &RECV_DATA_SEGMENT_BYTES_MAX.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "MaxBurstLength" => match number() {
            Some(n) if (512..=16_777_215).contains(&n) => {
                let chosen = n.min(u64::from(BURST_BYTES_MAX));
                params.max_burst_bytes = u32::try_from(chosen).unwrap_or(262_144);
                push(out, key, &chosen.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "FirstBurstLength" => match number() {
            Some(n) if (512..=16_777_215).contains(&n) => {
                let chosen = n.min(u64::from(FIRST_BURST_BYTES_MAX));
                params.first_burst_bytes = u32::try_from(chosen).unwrap_or(65_536);
                push(out, key, &chosen.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "MaxOutstandingR2T" => match number() {
            Some(n) if (1..=65535).contains(&n) => {
                let chosen = n.min(u64::from(OUTSTANDING_R2T_MAX));
                params.max_outstanding_r2t = u32::try_from(chosen).unwrap_or(1);
                push(out, key, &chosen.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "ErrorRecoveryLevel" => match number() {
            Some(n) if n <= 2 => {
                params.error_recovery_level = 0;
                push(out, key, "0");
            }
            _ => push(out, key, "Reject"),
        },
        "DefaultTime2Wait" => match number() {
            Some(n) if n <= 3600 => {
                let chosen = n.max(2);
                params.default_time2wait_s = u32::try_from(chosen).unwrap_or(2);
                push(out, key, &chosen.to_string());
            }
            _ => push(out, key, "Reject"),
        },
        "DefaultTime2Retain" => match number() {
            Some(n) if n <= 3600 => {
                // ErrorRecoveryLevel 0 keeps no state after a connection dies.
                params.default_time2retain_s = 0;
                push(out, key, "0");
            }
            _ => push(out, key, "Reject"),
        },
        "IFMarker" | "OFMarker" => push(out, key, "No"),
        "OFMarkInt" | "IFMarkInt" => push(out, key, "Irrelevant"),
        _ => return KeyOutcome::NotOperational,
    }
    KeyOutcome::Answered
}

/// Clamps values that relate to each other once negotiation is over (RFC 7143 §13.14:
/// FirstBurstLength must not exceed MaxBurstLength).
pub fn finish(params: &mut SessionParams) {
    if params.first_burst_bytes > params.max_burst_bytes {
        params.first_burst_bytes = params.max_burst_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_keeps_keys_without_values() {
        let pairs = parse(b"A=1\0B=x=y\0C\0\0");
        assert_eq!(
            pairs,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into()), ("C".into(), String::new())]
        );
    }

    #[test]
    fn negotiation_follows_rfc_result_functions() {
        let cases: &[(&str, &str, &str)] = &[
            ("HeaderDigest", "CRC32C,None", "HeaderDigest=CRC32C"),
            ("DataDigest", "None,CRC32C", "DataDigest=None"),
            ("DataDigest", "MD5", "DataDigest=Reject"),
            ("MaxBurstLength", "16776192", "MaxBurstLength=16776192"),
            ("FirstBurstLength", "16776192", "FirstBurstLength=262144"),
            ("MaxOutstandingR2T", "100", "MaxOutstandingR2T=8"),
            ("MaxConnections", "4", "MaxConnections=1"),
            ("InitialR2T", "No", "InitialR2T=No"),
            ("ImmediateData", "Maybe", "ImmediateData=Reject"),
            ("ErrorRecoveryLevel", "2", "ErrorRecoveryLevel=0"),
            ("MaxRecvDataSegmentLength", "100", "MaxRecvDataSegmentLength=Reject"),
        ];
        for (key, value, expected) in cases {
            let mut params = SessionParams::default();
            let mut out = Vec::new();
            assert_eq!(
                negotiate_operational(&mut params, key, value, &mut out),
                KeyOutcome::Answered
            );
            assert_eq!(String::from_utf8(out).unwrap(), format!("{expected}\0"), "{key}={value}");
        }
    }
}
