//! DRBD's state names, spelled as `drbdadm status` and `events2` spell them.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown {kind} {text:?}")]
pub struct UnknownState {
    kind: &'static str,
    text: String,
}

macro_rules! drbd_words {
    ($name:ident, $kind:literal, [$($variant:ident),+ $(,)?]) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $($name::$variant => stringify!($variant)),+ })
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $(stringify!($variant) => Ok($name::$variant),)+
                    _ => Err(UnknownState { kind: $kind, text: text.to_owned() }),
                }
            }
        }
    };
}

drbd_words!(Role, "role", [Primary, Secondary, Unknown]);
// Ordered so that "better" data compares greater, as DRBD's enum drbd_disk_state is.
drbd_words!(
    DiskState,
    "disk state",
    [
        Diskless,
        Attaching,
        Detaching,
        Failed,
        Negotiating,
        Inconsistent,
        Outdated,
        DUnknown,
        Consistent,
        UpToDate
    ]
);
drbd_words!(
    ReplicationState,
    "replication state",
    [
        Off,
        Established,
        StartingSyncS,
        StartingSyncT,
        WFBitMapS,
        WFBitMapT,
        SyncSource,
        SyncTarget,
        PausedSyncS,
        PausedSyncT,
        VerifyS,
        VerifyT,
        Ahead,
        Behind
    ]
);
drbd_words!(
    ConnectionState,
    "connection state",
    [
        StandAlone,
        Disconnecting,
        Unconnected,
        Timeout,
        BrokenPipe,
        NetworkFailure,
        ProtocolError,
        TearDown,
        Connecting,
        Connected
    ]
);

impl DiskState {
    /// The disk holds data that was consistent at some point (it may be old).
    pub fn has_data(self) -> bool {
        matches!(self, Self::Outdated | Self::Consistent | Self::UpToDate)
    }

    pub fn to_wire(self) -> u8 {
        u8::try_from(Self::ALL.iter().position(|s| *s == self).expect("listed")).expect("small")
    }

    pub fn from_wire(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }
}

impl Role {
    pub fn to_wire(self) -> u8 {
        u8::try_from(Self::ALL.iter().position(|s| *s == self).expect("listed")).expect("small")
    }

    pub fn from_wire(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_drbd() {
        for state in DiskState::ALL {
            assert_eq!(state.to_string().parse::<DiskState>(), Ok(*state));
            assert_eq!(DiskState::from_wire(state.to_wire()), Some(*state));
        }
        for state in ReplicationState::ALL {
            assert_eq!(state.to_string().parse::<ReplicationState>(), Ok(*state));
        }
        for state in ConnectionState::ALL {
            assert_eq!(state.to_string().parse::<ConnectionState>(), Ok(*state));
        }
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!(ReplicationState::PausedSyncS.to_string(), "PausedSyncS");
        assert_eq!(ConnectionState::StandAlone.to_string(), "StandAlone");
        assert!("Uptodate".parse::<DiskState>().is_err());
        assert!(DiskState::UpToDate > DiskState::Outdated);
        assert!(DiskState::Consistent.has_data() && !DiskState::Inconsistent.has_data());
    }
}
