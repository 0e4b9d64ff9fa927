//! The option keywords drbd.conf accepts in each section (DRBD 9.2's, as `drbdsetup help
//! net-options` etc. list them), how their values are checked, and which ones Tandem uses.
//! Values are checked like drbdadm checks them so a file Tandem accepts is one drbdadm accepts.

use super::tree::{Statement, Word};
use super::{ConfigError, Location};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Global,
    Net,
    Disk,
    Options,
    Startup,
    Handlers,
}

impl Section {
    pub(crate) fn from_keyword(keyword: &str) -> Option<Section> {
        match keyword {
            "net" => Some(Section::Net),
            "disk" => Some(Section::Disk),
            "options" => Some(Section::Options),
            "startup" => Some(Section::Startup),
            "handlers" => Some(Section::Handlers),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Section::Global => "global",
            Section::Net => "net",
            Section::Disk => "disk",
            Section::Options => "options",
            Section::Startup => "startup",
            Section::Handlers => "handlers",
        }
    }
}

/// The unit a bare number is in; suffixes k/M/G (binary) and s (512-byte sectors) scale
/// relative to it, as drbdsetup does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    One,
    KiB,
    Sectors,
}

impl Unit {
    fn bytes(self) -> u64 {
        match self {
            Unit::One => 1,
            Unit::KiB => 1024,
            Unit::Sectors => 512,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Choice(&'static [&'static str]),
    Number {
        min: u64,
        max: u64,
        unit: Unit,
    },
    /// A number or one of the words (quorum: off | majority | all | 1..32).
    ChoiceOrNumber(&'static [&'static str], u64, u64),
    /// after-sb-0pri: the choices plus `discard-node-NAME`.
    AfterSb0Pri,
    Text,
    /// yes | no; bare means yes.
    Bool,
    /// No value at all.
    Flag,
    /// One or more words (become-primary-on).
    Words,
}

struct Keyword {
    name: &'static str,
    kind: Kind,
    /// Tandem's engine reads this option; every other accepted option draws a warning.
    used: bool,
}

const fn keyword(name: &'static str, kind: Kind, used: bool) -> Keyword {
    Keyword { name, kind, used }
}

const YES_NO: Kind = Kind::Bool;
const fn number(min: u64, max: u64) -> Kind {
    Kind::Number { min, max, unit: Unit::One }
}

pub(crate) const AFTER_SB_0PRI: &[&str] = &[
    "disconnect",
    "discard-younger-primary",
    "discard-older-primary",
    "discard-zero-changes",
    "discard-least-changes",
    "discard-local",
    "discard-remote",
];
pub(crate) const AFTER_SB_1PRI: &[&str] =
    &["disconnect", "consensus", "discard-secondary", "call-pri-lost-after-sb", "violently-as0p"];
pub(crate) const AFTER_SB_2PRI: &[&str] =
    &["disconnect", "call-pri-lost-after-sb", "violently-as0p"];

const NET: &[Keyword] = &[
    keyword("protocol", Kind::Choice(&["A", "B", "C"]), true),
    keyword("transport", Kind::Text, false),
    keyword("timeout", number(1, 600), false),
    keyword("max-epoch-size", number(1, 20000), false),
    keyword("connect-int", number(1, 120), false),
    keyword("ping-int", number(1, 120), false),
    keyword("sndbuf-size", number(0, 10_485_760), false),
    keyword("rcvbuf-size", number(0, 10_485_760), false),
    keyword("ko-count", number(0, 200), false),
    keyword("allow-two-primaries", YES_NO, false),
    keyword("cram-hmac-alg", Kind::Text, true),
    keyword("shared-secret", Kind::Text, true),
    keyword("after-sb-0pri", Kind::AfterSb0Pri, true),
    keyword("after-sb-1pri", Kind::Choice(AFTER_SB_1PRI), true),
    keyword("after-sb-2pri", Kind::Choice(AFTER_SB_2PRI), true),
    keyword("always-asbp", YES_NO, false),
    keyword(
        "rr-conflict",
        Kind::Choice(&[
            "disconnect",
            "call-pri-lost",
            "violently",
            "retry-connect",
            "auto-discard",
        ]),
        false,
    ),
    keyword("ping-timeout", number(1, 300), false),
    keyword("data-integrity-alg", Kind::Text, false),
    keyword("tcp-cork", YES_NO, false),
    keyword("on-congestion", Kind::Choice(&["block", "pull-ahead", "disconnect"]), true),
    keyword("congestion-fill", Kind::Number { min: 0, max: 20_971_520, unit: Unit::Sectors }, true),
    keyword("congestion-extents", number(67, 65534), true),
    keyword("csums-alg", Kind::Text, true),
    keyword("csums-after-crash-only", YES_NO, false),
    keyword("verify-alg", Kind::Text, true),
    keyword("use-rle", YES_NO, false),
    keyword("socket-check-timeout", number(0, 300), false),
    keyword(
        "fencing",
        Kind::Choice(&["dont-care", "resource-only", "resource-and-stonith"]),
        false,
    ),
    keyword("max-buffers", number(32, 131_072), false),
    keyword("allow-remote-read", YES_NO, false),
    keyword("discard-my-data", Kind::Flag, false),
    keyword("tentative", YES_NO, false),
];

const DISK: &[Keyword] = &[
    keyword("on-io-error", Kind::Choice(&["pass_on", "call-local-io-error", "detach"]), true),
    keyword("disk-barrier", YES_NO, false),
    keyword("disk-flushes", YES_NO, false),
    keyword("disk-drain", YES_NO, false),
    keyword("md-flushes", YES_NO, false),
    keyword("resync-after", Kind::Text, false),
    keyword("al-extents", number(67, 65534), true),
    keyword("al-updates", YES_NO, false),
    keyword("discard-zeroes-if-aligned", YES_NO, false),
    keyword("disable-write-same", YES_NO, false),
    keyword("disk-timeout", number(0, 6000), false),
    keyword(
        "read-balancing",
        Kind::Choice(&[
            "prefer-local",
            "prefer-remote",
            "round-robin",
            "least-pending",
            "when-congested-remote",
            "32K-striping",
            "64K-striping",
            "128K-striping",
            "256K-striping",
            "512K-striping",
            "1M-striping",
        ]),
        false,
    ),
    keyword("rs-discard-granularity", number(0, 1_048_576), false),
    keyword("size", Kind::Number { min: 0, max: 2_199_023_255_552, unit: Unit::Sectors }, false),
    keyword("resync-rate", Kind::Number { min: 1, max: 8_388_608, unit: Unit::KiB }, true),
    keyword("c-plan-ahead", number(0, 300), true),
    keyword("c-delay-target", number(1, 100), false),
    keyword("c-fill-target", Kind::Number { min: 0, max: 1_048_576, unit: Unit::Sectors }, true),
    keyword("c-max-rate", Kind::Number { min: 0, max: 4_194_304, unit: Unit::KiB }, true),
    keyword("c-min-rate", Kind::Number { min: 0, max: 4_194_304, unit: Unit::KiB }, true),
    keyword("bitmap", YES_NO, false),
];

const QUORUM_WORDS: &[&str] = &["off", "majority", "all"];

const OPTIONS: &[Keyword] = &[
    keyword("cpu-mask", Kind::Text, false),
    keyword("on-no-data-accessible", Kind::Choice(&["io-error", "suspend-io"]), false),
    keyword("auto-promote", YES_NO, false),
    keyword(
        "peer-ack-window",
        Kind::Number { min: 2048, max: 204_800, unit: Unit::Sectors },
        false,
    ),
    keyword("peer-ack-delay", number(1, 10000), false),
    keyword("twopc-timeout", number(50, 600), false),
    keyword("twopc-retry-timeout", number(1, 50), false),
    keyword("auto-promote-timeout", number(0, 600), false),
    keyword("max-io-depth", number(4, 4_294_967_295), false),
    keyword("quorum", Kind::ChoiceOrNumber(QUORUM_WORDS, 1, 32), true),
    keyword("on-no-quorum", Kind::Choice(&["io-error", "suspend-io"]), true),
    keyword("quorum-minimum-redundancy", Kind::ChoiceOrNumber(QUORUM_WORDS, 1, 32), false),
    keyword(
        "on-suspended-primary-outdated",
        Kind::Choice(&["disconnect", "force-secondary"]),
        false,
    ),
];

const STARTUP: &[Keyword] = &[
    keyword("wfc-timeout", number(0, u64::MAX), false),
    keyword("degr-wfc-timeout", number(0, u64::MAX), false),
    keyword("outdated-wfc-timeout", number(0, u64::MAX), false),
    keyword("wait-after-sb", Kind::Flag, false),
    keyword("become-primary-on", Kind::Words, false),
    keyword("stacked-timeouts", Kind::Flag, false),
];

const HANDLERS: &[Keyword] = &[
    keyword("pri-on-incon-degr", Kind::Text, false),
    keyword("pri-lost-after-sb", Kind::Text, false),
    keyword("pri-lost", Kind::Text, false),
    keyword("initial-split-brain", Kind::Text, false),
    keyword("split-brain", Kind::Text, false),
    keyword("outdate-peer", Kind::Text, false),
    keyword("fence-peer", Kind::Text, false),
    keyword("unfence-peer", Kind::Text, false),
    keyword("local-io-error", Kind::Text, false),
    keyword("before-resync-target", Kind::Text, false),
    keyword("after-resync-target", Kind::Text, false),
    keyword("before-resync-source", Kind::Text, false),
    keyword("out-of-sync", Kind::Text, false),
    keyword("quorum-lost", Kind::Text, false),
    keyword("disconnected", Kind::Text, false),
];

const GLOBAL: &[Keyword] = &[
    keyword("usage-count", Kind::Choice(&["yes", "no", "ask"]), false),
    keyword("minor-count", number(1, 1_048_576), false),
    keyword("dialog-refresh", number(0, u64::MAX), false),
    keyword("disable-ip-verification", Kind::Flag, false),
    keyword("cmd-timeout-short", number(0, u64::MAX), false),
    keyword("cmd-timeout-medium", number(0, u64::MAX), false),
    keyword("cmd-timeout-long", number(0, u64::MAX), false),
    keyword("udev-always-use-vnr", Kind::Flag, false),
];

fn table(section: Section) -> &'static [Keyword] {
    match section {
        Section::Global => GLOBAL,
        Section::Net => NET,
        Section::Disk => DISK,
        Section::Options => OPTIONS,
        Section::Startup => STARTUP,
        Section::Handlers => HANDLERS,
    }
}

/// A checked option: its keyword, its value as written (bare booleans become "yes"), where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckedOption {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) location: Location,
    pub(crate) used: bool,
}

/// Scales a number with an optional k/M/G/s suffix into `unit`, like drbdsetup.
pub(crate) fn scaled(text: &str, unit: Unit) -> Option<u64> {
    let split = text.find(|character: char| !character.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let suffix_bytes: u64 = match suffix {
        "" => return Some(number),
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "s" | "S" => 512,
        _ => return None,
    };
    Some(number.checked_mul(suffix_bytes)? / unit.bytes())
}

pub(crate) fn unit_of(name: &str) -> Unit {
    DISK.iter()
        .chain(NET)
        .chain(OPTIONS)
        .find(|keyword| keyword.name == name)
        .and_then(|keyword| match keyword.kind {
            Kind::Number { unit, .. } => Some(unit),
            _ => None,
        })
        .unwrap_or(Unit::One)
}

fn value_error(location: &Location, value: &str, name: &str, problem: &str) -> ConfigError {
    ConfigError::new(
        location.clone(),
        format!("Parse error: while parsing value ('{value}') for {name}. {problem}"),
    )
}

/// Checks one option statement of `section`.
pub(crate) fn check(section: Section, statement: &Statement) -> Result<CheckedOption, ConfigError> {
    let name = statement.keyword();
    let location = statement.location.clone();
    if statement.block.is_some() {
        return Err(ConfigError::new(
            location,
            format!("Parse error: ';' expected after '{name}', but got '{{'"),
        ));
    }
    let Some(keyword) = table(section).iter().find(|keyword| keyword.name == name) else {
        let article = if matches!(section, Section::Options) { "an" } else { "a" };
        return Err(ConfigError::new(
            location,
            format!(
                "Parse error: '{article} {} option keyword' expected, but got '{name}'",
                section.name()
            ),
        ));
    };
    let arguments = statement.arguments();
    let single = |arguments: &[Word]| -> Result<String, ConfigError> {
        match arguments {
            [value] => Ok(value.text.clone()),
            [] => Err(ConfigError::new(
                location.clone(),
                format!("Parse error: a value expected for {name}, but got ';'"),
            )),
            [_, extra, ..] => Err(ConfigError::new(
                extra.location.clone(),
                format!(
                    "Parse error: ';' expected after the value of {name}, but got '{}'",
                    extra.text
                ),
            )),
        }
    };
    let value = match keyword.kind {
        Kind::Flag => {
            if let Some(extra) = arguments.first() {
                return Err(ConfigError::new(
                    extra.location.clone(),
                    format!("Parse error: ';' expected after {name}, but got '{}'", extra.text),
                ));
            }
            "yes".to_owned()
        }
        Kind::Bool => {
            if arguments.is_empty() {
                "yes".to_owned()
            } else {
                let value = single(arguments)?;
                if value != "yes" && value != "no" {
                    return Err(value_error(
                        &location,
                        &value,
                        name,
                        "Value is not valid. Allowed values are: yes | no",
                    ));
                }
                value
            }
        }
        Kind::Text => single(arguments)?,
        Kind::Words => {
            if arguments.is_empty() {
                return Err(ConfigError::new(
                    location,
                    format!("Parse error: a value expected for {name}, but got ';'"),
                ));
            }
            arguments.iter().map(|word| word.text.as_str()).collect::<Vec<_>>().join(" ")
        }
        Kind::Choice(choices) => {
            let value = single(arguments)?;
            if !choices.contains(&value.as_str()) {
                let allowed = choices.join(" | ");
                return Err(value_error(
                    &location,
                    &value,
                    name,
                    &format!("Value is not valid. Allowed values are: {allowed}"),
                ));
            }
            value
        }
        Kind::AfterSb0Pri => {
            let value = single(arguments)?;
            let node = value.strip_prefix("discard-node-").is_some_and(|node| !node.is_empty());
            if !node && !AFTER_SB_0PRI.contains(&value.as_str()) {
                let allowed = AFTER_SB_0PRI.join(" | ");
                return Err(value_error(
                    &location,
                    &value,
                    name,
                    &format!(
                        "Value is not valid. Allowed values are: {allowed} | discard-node-NODENAME"
                    ),
                ));
            }
            value
        }
        Kind::Number { min, max, unit } => {
            let value = single(arguments)?;
            check_number(&location, &value, name, min, max, unit)?;
            value
        }
        Kind::ChoiceOrNumber(choices, min, max) => {
            let value = single(arguments)?;
            if !choices.contains(&value.as_str()) {
                check_number(&location, &value, name, min, max, Unit::One)?;
            }
            value
        }
    };
    Ok(CheckedOption { name: name.to_owned(), value, location, used: keyword.used })
}

fn check_number(
    location: &Location,
    value: &str,
    name: &str,
    min: u64,
    max: u64,
    unit: Unit,
) -> Result<(), ConfigError> {
    let Some(number) = scaled(value, unit) else {
        return Err(value_error(location, value, name, "Value is not a number."));
    };
    if number < min {
        return Err(value_error(location, value, name, "Value is too small."));
    }
    if number > max {
        return Err(value_error(location, value, name, "Value is too big."));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling() {
        assert_eq!(scaled("100M", Unit::KiB), Some(102_400));
        assert_eq!(scaled("250", Unit::KiB), Some(250));
        assert_eq!(scaled("1M", Unit::Sectors), Some(2048));
        assert_eq!(scaled("10k", Unit::One), Some(10240));
        assert_eq!(scaled("512s", Unit::KiB), Some(256));
        assert_eq!(scaled("x", Unit::One), None);
        assert_eq!(scaled("1T", Unit::One), None);
        assert_eq!(scaled("99999999999999999999", Unit::One), None);
    }
}
