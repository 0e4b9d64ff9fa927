//! The tandemadm <-> tandemd control protocol: JSON lines over a Unix socket.
//!
//! The client sends one [`Request`] line; the daemon answers with any number of
//! [`Reply::Line`] (stdout) and [`Reply::Error`] (stderr) lines and ends with one
//! [`Reply::Done`] carrying the exit code. Streams (`events2` without `--now`, waits) simply send
//! lines until they end. Encoding and decoding are pure functions, tested here; the socket
//! handling lives in the binaries.

use crate::constants::CONTROL_REQUEST_BYTES_MAX;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Exit codes, drbdadm's and drbdsetup's where they have one.
pub mod exit {
    pub const SUCCESS: i32 = 0;
    /// drbdadm's E_USAGE: bad command line.
    pub const USAGE: i32 = 3;
    /// drbdsetup's timeout code for wait-connect / wait-sync.
    pub const TIMEOUT: i32 = 5;
    /// drbdadm's E_CONFIG_INVALID: unknown resource, broken resource file, missing metadata.
    pub const CONFIG_INVALID: i32 = 10;
    /// drbdsetup's "state change failed" (refused promotion, demotion, connect ...).
    pub const STATE_CHANGE_FAILED: i32 = 11;
    /// drbdadm's E_EXEC_ERROR: tandemd unreachable, or the engine cannot do the verb yet.
    pub const EXEC_ERROR: i32 = 20;
}

/// drbdadm's verbs, spelled as on its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verb {
    CreateMd,
    Up,
    Down,
    Attach,
    Detach,
    Connect,
    Disconnect,
    Primary,
    Secondary,
    Adjust,
    Invalidate,
    InvalidateRemote,
    PauseSync,
    ResumeSync,
    NewCurrentUuid,
    Outdate,
    WaitConnect,
    WaitSync,
    Role,
    Cstate,
    Dstate,
    ShowGi,
    Dump,
    Status,
    Events2,
    Verify,
    Resize,
}

impl Verb {
    pub const ALL: &'static [Verb] = &[
        Verb::CreateMd,
        Verb::Up,
        Verb::Down,
        Verb::Attach,
        Verb::Detach,
        Verb::Connect,
        Verb::Disconnect,
        Verb::Primary,
        Verb::Secondary,
        Verb::Adjust,
        Verb::Invalidate,
        Verb::InvalidateRemote,
        Verb::PauseSync,
        Verb::ResumeSync,
        Verb::NewCurrentUuid,
        Verb::Outdate,
        Verb::WaitConnect,
        Verb::WaitSync,
        Verb::Role,
        Verb::Cstate,
        Verb::Dstate,
        Verb::ShowGi,
        Verb::Dump,
        Verb::Status,
        Verb::Events2,
        Verb::Verify,
        Verb::Resize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::CreateMd => "create-md",
            Verb::Up => "up",
            Verb::Down => "down",
            Verb::Attach => "attach",
            Verb::Detach => "detach",
            Verb::Connect => "connect",
            Verb::Disconnect => "disconnect",
            Verb::Primary => "primary",
            Verb::Secondary => "secondary",
            Verb::Adjust => "adjust",
            Verb::Invalidate => "invalidate",
            Verb::InvalidateRemote => "invalidate-remote",
            Verb::PauseSync => "pause-sync",
            Verb::ResumeSync => "resume-sync",
            Verb::NewCurrentUuid => "new-current-uuid",
            Verb::Outdate => "outdate",
            Verb::WaitConnect => "wait-connect",
            Verb::WaitSync => "wait-sync",
            Verb::Role => "role",
            Verb::Cstate => "cstate",
            Verb::Dstate => "dstate",
            Verb::ShowGi => "show-gi",
            Verb::Dump => "dump",
            Verb::Status => "status",
            Verb::Events2 => "events2",
            Verb::Verify => "verify",
            Verb::Resize => "resize",
        }
    }

    pub fn from_word(word: &str) -> Option<Verb> {
        Verb::ALL.iter().copied().find(|v| v.as_str() == word)
    }

    /// The options this verb accepts (long form, without the dashes).
    fn accepts(self, option: &str) -> bool {
        matches!(
            (self, option),
            (Verb::Connect, "discard-my-data")
                | (Verb::Primary, "force")
                | (Verb::CreateMd, "force")
                | (Verb::NewCurrentUuid, "clear-bitmap")
                | (Verb::Status, "verbose" | "statistics")
                | (Verb::Events2, "now" | "statistics")
                | (Verb::WaitConnect | Verb::WaitSync, "timeout")
                | (Verb::Verify, "start")
                | (Verb::Resize, "size")
        )
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub discard_my_data: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub clear_bitmap: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub verbose: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub statistics: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub now: bool,
    /// wait-connect / wait-sync: give up after this many seconds (0 or absent: wait forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// verify: the first sector to verify (DRBD's `--start`, rounded down to 4 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_sector: Option<u64>,
    /// resize: grow this node's backing file first so the device holds this many bytes
    /// (`--size`, with a K/M/G/T suffix as drbdadm's; never shrinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// One tandemadm command. `resource` is a resource name or `all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub verb: Verb,
    pub resource: String,
    #[serde(default)]
    pub options: Options,
}

/// What the daemon sends back, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// A line for stdout.
    Line { text: String },
    /// A line for stderr.
    Error { text: String },
    /// Resync progress (wait-sync): a redrawn bar on a terminal, a plain stderr line otherwise.
    Progress { text: String },
    /// The last reply: the process exit code.
    Done { exit_code: i32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Usage(String),
    #[error("request of {0} bytes is over the limit of {CONTROL_REQUEST_BYTES_MAX}")]
    TooLong(usize),
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// Parses tandemadm's words after the global options: `VERB [--OPTION]... RESOURCE|all`.
pub fn parse_command(words: &[String]) -> Result<Request, ControlError> {
    let usage = |message: String| ControlError::Usage(message);
    let Some((verb_word, rest)) = words.split_first() else {
        return Err(usage("no command given".into()));
    };
    let verb = Verb::from_word(verb_word).ok_or_else(|| {
        usage(format!(
            "unknown command '{verb_word}'; commands: {}",
            Verb::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(" ")
        ))
    })?;
    let mut options = Options::default();
    let mut resource = None;
    let mut rest = rest.iter();
    while let Some(word) = rest.next() {
        if let Some(option) = word.strip_prefix("--") {
            let (name, inline_value) = match option.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (option, None),
            };
            if !verb.accepts(name) {
                return Err(usage(format!("{verb}: unknown option '--{name}'")));
            }
            match name {
                "force" => options.force = true,
                "discard-my-data" => options.discard_my_data = true,
                "clear-bitmap" => options.clear_bitmap = true,
                "verbose" => options.verbose = true,
                "statistics" => options.statistics = true,
                "now" => options.now = true,
                "timeout" => {
                    let value = match inline_value {
                        Some(value) => value,
                        None => rest
                            .next()
                            .cloned()
                            .ok_or_else(|| usage(format!("{verb}: --timeout needs seconds")))?,
                    };
                    let seconds = value.parse::<u64>().map_err(|_| {
                        usage(format!("{verb}: --timeout wants whole seconds, got '{value}'"))
                    })?;
                    options.timeout_s = Some(seconds);
                }
                "start" => {
                    let value = match inline_value {
                        Some(value) => value,
                        None => rest
                            .next()
                            .cloned()
                            .ok_or_else(|| usage(format!("{verb}: --start needs a sector")))?,
                    };
                    let sector = value.parse::<u64>().map_err(|_| {
                        usage(format!("{verb}: --start wants a sector number, got '{value}'"))
                    })?;
                    options.start_sector = Some(sector);
                }
                "size" => {
                    let value = match inline_value {
                        Some(value) => value,
                        None => rest
                            .next()
                            .cloned()
                            .ok_or_else(|| usage(format!("{verb}: --size needs a size")))?,
                    };
                    options.size_bytes = Some(parse_size_bytes(&value).ok_or_else(|| {
                        usage(format!(
                            "{verb}: --size wants bytes with an optional K, M, G or T suffix \
                             (a multiple of 4 KiB), got '{value}'"
                        ))
                    })?);
                }
                _ => unreachable!("accepts() lists only the options handled here"),
            }
        } else if resource.is_none() {
            resource = Some(word.clone());
        } else {
            return Err(usage(format!("{verb}: one resource (or 'all') expected, got '{word}'")));
        }
    }
    // Like drbdadm, status/events2/dump/role default to every resource.
    let resource = match (resource, verb) {
        (Some(resource), _) => resource,
        (None, Verb::Status | Verb::Events2 | Verb::Dump) => "all".to_owned(),
        (None, _) => return Err(usage(format!("{verb}: a resource name (or 'all') is needed"))),
    };
    if resource.is_empty() || resource.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(usage(format!("{verb}: bad resource name {resource:?}")));
    }
    Ok(Request { verb, resource, options })
}

/// `128M`, `1G`, `4096` (bytes; K/M/G/T are powers of 1024 as in drbdadm's `--size`); a
/// positive multiple of 4 KiB.
pub fn parse_size_bytes(text: &str) -> Option<u64> {
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    let bytes = digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)?;
    (bytes > 0 && bytes.is_multiple_of(4096)).then_some(bytes)
}

fn encode<T: Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).expect("control messages always serialize");
    line.push('\n');
    line
}

fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, ControlError> {
    if line.len() > CONTROL_REQUEST_BYTES_MAX {
        return Err(ControlError::TooLong(line.len()));
    }
    serde_json::from_str(line.trim_end()).map_err(|e| ControlError::Malformed(e.to_string()))
}

pub fn encode_request(request: &Request) -> String {
    encode(request)
}

pub fn decode_request(line: &str) -> Result<Request, ControlError> {
    decode(line)
}

pub fn encode_reply(reply: &Reply) -> String {
    encode(reply)
}

pub fn decode_reply(line: &str) -> Result<Reply, ControlError> {
    decode(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands_parse_like_drbdadm() {
        let cases: &[(&str, Verb, &str, Options)] = &[
            ("up r0", Verb::Up, "r0", Options::default()),
            (
                "primary --force r0",
                Verb::Primary,
                "r0",
                Options { force: true, ..Default::default() },
            ),
            (
                "primary r0 --force",
                Verb::Primary,
                "r0",
                Options { force: true, ..Default::default() },
            ),
            ("verify r0", Verb::Verify, "r0", Options::default()),
            ("resize r0", Verb::Resize, "r0", Options::default()),
            (
                "resize --size 128M r0",
                Verb::Resize,
                "r0",
                Options { size_bytes: Some(128 << 20), ..Default::default() },
            ),
            (
                "resize --size=1G r0",
                Verb::Resize,
                "r0",
                Options { size_bytes: Some(1 << 30), ..Default::default() },
            ),
            (
                "verify --start 2048 r0",
                Verb::Verify,
                "r0",
                Options { start_sector: Some(2048), ..Default::default() },
            ),
            (
                "verify --start=8 r0",
                Verb::Verify,
                "r0",
                Options { start_sector: Some(8), ..Default::default() },
            ),
            (
                "connect --discard-my-data r0",
                Verb::Connect,
                "r0",
                Options { discard_my_data: true, ..Default::default() },
            ),
            (
                "new-current-uuid --clear-bitmap all",
                Verb::NewCurrentUuid,
                "all",
                Options { clear_bitmap: true, ..Default::default() },
            ),
            ("status", Verb::Status, "all", Options::default()),
            (
                "status --verbose --statistics r1",
                Verb::Status,
                "r1",
                Options { verbose: true, statistics: true, ..Default::default() },
            ),
            ("events2 --now", Verb::Events2, "all", Options { now: true, ..Default::default() }),
            (
                "wait-sync --timeout 30 r0",
                Verb::WaitSync,
                "r0",
                Options { timeout_s: Some(30), ..Default::default() },
            ),
            (
                "wait-connect --timeout=5 r0",
                Verb::WaitConnect,
                "r0",
                Options { timeout_s: Some(5), ..Default::default() },
            ),
        ];
        for (text, verb, resource, options) in cases {
            let request = parse_command(&words(text)).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(request.verb, *verb, "{text}");
            assert_eq!(request.resource, *resource, "{text}");
            assert_eq!(&request.options, options, "{text}");
        }
    }

    #[test]
    fn bad_commands_say_why() {
        let cases: &[(&str, &str)] = &[
            ("", "no command"),
            ("frobnicate r0", "unknown command 'frobnicate'"),
            ("up", "a resource name"),
            ("up r0 r1", "one resource"),
            ("secondary --force r0", "unknown option '--force'"),
            ("wait-sync --timeout r0", "whole seconds"),
            ("wait-sync --timeout", "needs seconds"),
            ("resize --size 1000 r0", "multiple of 4 KiB"),
            ("resize --size -5 r0", "K, M, G or T"),
            ("resize --size 99999999999999T r0", "K, M, G or T"),
        ];
        for (text, needle) in cases {
            let error = parse_command(&words(text)).expect_err(text).to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn every_verb_round_trips_by_name_and_json() {
        for verb in Verb::ALL {
            assert_eq!(Verb::from_word(verb.as_str()), Some(*verb));
            let request = Request {
                verb: *verb,
                resource: "r0".into(),
                options: Options { force: true, timeout_s: Some(3), ..Default::default() },
            };
            let line = encode_request(&request);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert!(line.contains(&format!("\"{}\"", verb.as_str())), "{line}");
            assert_eq!(decode_request(&line), Ok(request));
        }
    }

    #[test]
    fn replies_round_trip_and_garbage_is_an_error() {
        for reply in [
            Reply::Line { text: "r0 role:Primary".into() },
            Reply::Error { text: "multi\nline".into() },
            Reply::Progress { text: "r0: SyncTarget 50.00%".into() },
            Reply::Done { exit_code: exit::STATE_CHANGE_FAILED },
        ] {
            let line = encode_reply(&reply);
            assert_eq!(line.matches('\n').count(), 1, "one line per reply: {line}");
            assert_eq!(decode_reply(&line), Ok(reply));
        }
        assert_eq!(
            decode_request(r#"{"verb":"up","resource":"r0"}"#).map(|r| r.options),
            Ok(Options::default())
        );
        for garbage in ["", "{", "null", r#"{"verb":"explode","resource":"r0"}"#, "\u{0}"] {
            assert!(
                matches!(decode_request(garbage), Err(ControlError::Malformed(_))),
                "{garbage:?}"
            );
        }
        let long = "x".repeat(CONTROL_REQUEST_BYTES_MAX + 1);
        assert!(matches!(decode_request(&long), Err(ControlError::TooLong(_))));
    }
}
