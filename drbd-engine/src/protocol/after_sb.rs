//! Automatic split-brain recovery: DRBD's `after-sb-0pri`, `after-sb-1pri` and
//! `after-sb-2pri` policies as one pure decision.
//!
//! The generation UUIDs only say *that* both nodes changed data while apart (`uuid::decide`
//! answers `SplitBrain`); these policies say *whose* changes survive. Both ends evaluate
//! `resolve` on the same exchanged facts (roles from the Hello, the changed-block counts of the
//! two bitmaps exchanged in the handshake, the "was primary when the peer was lost" flag in
//! each bitmap UUID) and so reach mirror-image answers without another round trip: one node is
//! the survivor (sync source), the other the victim (sync target, which loses its changes made
//! since the split), or both disconnect and stay StandAlone until an operator decides.
//!
//! The semantics follow drbd.conf(5) and the kernel's `drbd_asb_recover_{0,1,2}p`:
//! - 0pri (no primary now): `disconnect`; `discard-younger-primary` / `discard-older-primary`
//!   (the node that was not primary when the connection was lost is the younger primary; when
//!   that does not tell them apart, fall through to `discard-least-changes`, as DRBD does);
//!   `discard-zero-changes` (a node that changed nothing is the victim; if both changed,
//!   disconnect); `discard-least-changes`; `discard-local`; `discard-remote`.
//! - 1pri (one primary now): `disconnect`; `consensus` (apply the 0pri outcome only if it
//!   makes the secondary the victim); `discard-secondary`; `call-pri-lost-after-sb` (apply the
//!   0pri outcome; if it makes the primary the victim, the primary must give up: this engine
//!   cannot demote inside a handshake, so it disconnects and asks for the `pri-lost-after-sb`
//!   handler); `violently-as0p` (apply the 0pri outcome even to a primary: `resolve` says so,
//!   but the node never makes a primary a sync target, so such a split brain stands).
//! - 2pri (both primary): `disconnect`; `violently-as0p` and `call-pri-lost-after-sb` as above
//!   (one primary is always the victim, so the split brain stands, with the handler event for
//!   call-pri-lost-after-sb).
//!
//! Ties (equal change counts, no discriminating flag) go to the lower node id as survivor,
//! where DRBD uses its per-connection `RESOLVE_CONFLICTS` bit; both ends agree either way.

use crate::NodeId;
use crate::protocol::states::Role;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown {kind} policy {text:?}")]
pub struct UnknownPolicy {
    kind: &'static str,
    text: String,
}

macro_rules! policy_words {
    ($name:ident, $kind:literal, [$($variant:ident = $word:literal = $wire:literal),+ $(,)?]) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word drbd.conf uses.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            pub fn to_wire(self) -> u8 {
                match self { $($name::$variant => $wire),+ }
            }

            pub fn from_wire(value: u8) -> Option<Self> {
                match value { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownPolicy;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownPolicy { kind: $kind, text: text.to_owned() }),
                }
            }
        }
    };
}

policy_words!(
    AfterSb0Pri,
    "after-sb-0pri",
    [
        Disconnect = "disconnect" = 0,
        DiscardYoungerPrimary = "discard-younger-primary" = 1,
        DiscardOlderPrimary = "discard-older-primary" = 2,
        DiscardZeroChanges = "discard-zero-changes" = 3,
        DiscardLeastChanges = "discard-least-changes" = 4,
        DiscardLocal = "discard-local" = 5,
        DiscardRemote = "discard-remote" = 6,
    ]
);

policy_words!(
    AfterSb1Pri,
    "after-sb-1pri",
    [
        Disconnect = "disconnect" = 0,
        Consensus = "consensus" = 1,
        ViolentlyAs0p = "violently-as0p" = 2,
        DiscardSecondary = "discard-secondary" = 3,
        CallPriLostAfterSb = "call-pri-lost-after-sb" = 4,
    ]
);

policy_words!(
    AfterSb2Pri,
    "after-sb-2pri",
    [
        Disconnect = "disconnect" = 0,
        ViolentlyAs0p = "violently-as0p" = 1,
        CallPriLostAfterSb = "call-pri-lost-after-sb" = 2,
    ]
);

impl AfterSb0Pri {
    /// The same policy as the peer words it: "discard-local" there is "discard-remote" here.
    pub fn seen_from_peer(self) -> Self {
        match self {
            Self::DiscardLocal => Self::DiscardRemote,
            Self::DiscardRemote => Self::DiscardLocal,
            other => other,
        }
    }
}

/// The `net { after-sb-*pri }` settings of a resource. DRBD's default is `disconnect` for all
/// three: nothing is discarded unless the operator configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AfterSbPolicies {
    pub zero_primaries: AfterSb0Pri,
    pub one_primary: AfterSb1Pri,
    pub two_primaries: AfterSb2Pri,
}

impl Default for AfterSbPolicies {
    fn default() -> Self {
        Self {
            zero_primaries: AfterSb0Pri::Disconnect,
            one_primary: AfterSb1Pri::Disconnect,
            two_primaries: AfterSb2Pri::Disconnect,
        }
    }
}

impl AfterSbPolicies {
    /// The settings as the peer states them (local and remote swap places).
    pub fn seen_from_peer(self) -> Self {
        Self { zero_primaries: self.zero_primaries.seen_from_peer(), ..self }
    }

    /// Both ends must be configured alike (DRBD refuses the connection otherwise: "incompatible
    /// after-sb-0pri settings"), or they could both decide to be the survivor.
    pub fn compatible_with_peer(self, peer: AfterSbPolicies) -> bool {
        self == peer.seen_from_peer()
    }

    pub fn to_wire(self) -> [u8; 3] {
        [self.zero_primaries.to_wire(), self.one_primary.to_wire(), self.two_primaries.to_wire()]
    }

    pub fn from_wire(bytes: [u8; 3]) -> Option<Self> {
        Some(Self {
            zero_primaries: AfterSb0Pri::from_wire(bytes[0])?,
            one_primary: AfterSb1Pri::from_wire(bytes[1])?,
            two_primaries: AfterSb2Pri::from_wire(bytes[2])?,
        })
    }
}

/// What one side of a split brain knows about itself, as both sides see it after the
/// handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitBrainSide {
    pub node_id: NodeId,
    /// The role now (from the Hello).
    pub role: Role,
    /// Blocks this side changed since the split: the weight of its bitmap for the other side.
    pub changed_blocks: u64,
    /// This side was primary when it lost the other (the low bit of its bitmap UUID, as DRBD
    /// keeps it): the *older* primary. The other one was promoted later.
    pub primary_at_split: bool,
}

/// Who keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Keep both, connect nothing: StandAlone, split brain reported, operator decides.
    Disconnect,
    /// The local data survives: this node becomes the sync source.
    Survivor,
    /// The local changes since the split are discarded: this node becomes the sync target.
    Victim,
}

impl Resolution {
    pub fn mirrored(self) -> Self {
        match self {
            Self::Survivor => Self::Victim,
            Self::Victim => Self::Survivor,
            Self::Disconnect => Self::Disconnect,
        }
    }
}

/// The outcome of `resolve`, from the local node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub resolution: Resolution,
    /// The policy word that decided (for the log and the events).
    pub policy: &'static str,
    /// `call-pri-lost-after-sb`: this node is a primary whose data lost; run the
    /// `pri-lost-after-sb` handler.
    pub primary_lost: bool,
}

/// Decides a split brain between `local` and `remote` under `policies` (the local settings;
/// the peer's are checked compatible before). `resolve(p, a, b)` and
/// `resolve(p.seen_from_peer(), b, a)` always give mirrored resolutions.
pub fn resolve(
    policies: AfterSbPolicies,
    local: &SplitBrainSide,
    remote: &SplitBrainSide,
) -> Outcome {
    let primaries =
        usize::from(local.role == Role::Primary) + usize::from(remote.role == Role::Primary);
    let outcome = |resolution, policy| Outcome { resolution, policy, primary_lost: false };
    match primaries {
        0 => {
            let (resolution, policy) = zero_primaries(policies.zero_primaries, local, remote);
            outcome(resolution, policy)
        }
        1 => {
            let local_primary = local.role == Role::Primary;
            let as0p = || zero_primaries(policies.zero_primaries, local, remote).0;
            // The 0pri outcome expressed as "the primary loses".
            let primary_loses = |r: Resolution| {
                (local_primary && r == Resolution::Victim)
                    || (!local_primary && r == Resolution::Survivor)
            };
            match policies.one_primary {
                AfterSb1Pri::Disconnect => outcome(Resolution::Disconnect, "disconnect"),
                AfterSb1Pri::Consensus => {
                    let r = as0p();
                    if r == Resolution::Disconnect || primary_loses(r) {
                        outcome(Resolution::Disconnect, "consensus")
                    } else {
                        outcome(r, "consensus")
                    }
                }
                AfterSb1Pri::DiscardSecondary => {
                    let r = if local_primary { Resolution::Survivor } else { Resolution::Victim };
                    outcome(r, "discard-secondary")
                }
                AfterSb1Pri::ViolentlyAs0p => outcome(as0p(), "violently-as0p"),
                AfterSb1Pri::CallPriLostAfterSb => {
                    let r = as0p();
                    if primary_loses(r) {
                        Outcome {
                            resolution: Resolution::Disconnect,
                            policy: "call-pri-lost-after-sb",
                            primary_lost: local_primary,
                        }
                    } else {
                        outcome(r, "call-pri-lost-after-sb")
                    }
                }
            }
        }
        _ => match policies.two_primaries {
            AfterSb2Pri::Disconnect => outcome(Resolution::Disconnect, "disconnect"),
            AfterSb2Pri::ViolentlyAs0p => {
                outcome(zero_primaries(policies.zero_primaries, local, remote).0, "violently-as0p")
            }
            AfterSb2Pri::CallPriLostAfterSb => {
                let r = zero_primaries(policies.zero_primaries, local, remote).0;
                Outcome {
                    resolution: Resolution::Disconnect,
                    policy: "call-pri-lost-after-sb",
                    primary_lost: r == Resolution::Victim,
                }
            }
        },
    }
}

/// DRBD's `drbd_asb_recover_0p`, including its fall-throughs.
fn zero_primaries(
    policy: AfterSb0Pri,
    local: &SplitBrainSide,
    remote: &SplitBrainSide,
) -> (Resolution, &'static str) {
    use Resolution::*;
    let tie = || if local.node_id < remote.node_id { Survivor } else { Victim };
    let least_changes = || match local.changed_blocks.cmp(&remote.changed_blocks) {
        std::cmp::Ordering::Less => Victim,
        std::cmp::Ordering::Greater => Survivor,
        std::cmp::Ordering::Equal => tie(),
    };
    let older_flag = (local.primary_at_split, remote.primary_at_split);
    match policy {
        AfterSb0Pri::Disconnect => (Disconnect, "disconnect"),
        AfterSb0Pri::DiscardLocal => (Victim, "discard-local"),
        AfterSb0Pri::DiscardRemote => (Survivor, "discard-remote"),
        AfterSb0Pri::DiscardZeroChanges => {
            let r = match (local.changed_blocks, remote.changed_blocks) {
                (0, 0) => tie(),
                (0, _) => Victim,
                (_, 0) => Survivor,
                _ => Disconnect,
            };
            (r, "discard-zero-changes")
        }
        AfterSb0Pri::DiscardLeastChanges => (least_changes(), "discard-least-changes"),
        AfterSb0Pri::DiscardYoungerPrimary => match older_flag {
            (false, true) => (Victim, "discard-younger-primary"),
            (true, false) => (Survivor, "discard-younger-primary"),
            _ => (least_changes(), "discard-younger-primary (as discard-least-changes)"),
        },
        AfterSb0Pri::DiscardOlderPrimary => match older_flag {
            (false, true) => (Survivor, "discard-older-primary"),
            (true, false) => (Victim, "discard-older-primary"),
            _ => (least_changes(), "discard-older-primary (as discard-least-changes)"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Resolution::*;

    const P: Role = Role::Primary;
    const S: Role = Role::Secondary;

    struct Row {
        policies: (&'static str, &'static str, &'static str),
        /// (role, changed blocks, primary at split) of node 0 (local) and node 1 (remote).
        local: (Role, u64, bool),
        remote: (Role, u64, bool),
        expected: Resolution,
        primary_lost: bool,
    }

    fn row(
        policies: (&'static str, &'static str, &'static str),
        local: (Role, u64, bool),
        remote: (Role, u64, bool),
        expected: Resolution,
    ) -> Row {
        Row { policies, local, remote, expected, primary_lost: false }
    }

    fn side(id: u8, v: (Role, u64, bool)) -> SplitBrainSide {
        SplitBrainSide {
            node_id: NodeId(id),
            role: v.0,
            changed_blocks: v.1,
            primary_at_split: v.2,
        }
    }

    fn policies(words: (&str, &str, &str)) -> AfterSbPolicies {
        AfterSbPolicies {
            zero_primaries: words.0.parse().unwrap(),
            one_primary: words.1.parse().unwrap(),
            two_primaries: words.2.parse().unwrap(),
        }
    }

    #[test]
    fn policy_table() {
        let d = "disconnect";
        let rows = [
            // --- after-sb-0pri (both secondary now) ---
            row((d, d, d), (S, 5, true), (S, 0, false), Disconnect),
            row(("discard-zero-changes", d, d), (S, 5, true), (S, 0, false), Survivor),
            row(("discard-zero-changes", d, d), (S, 0, true), (S, 7, false), Victim),
            row(("discard-zero-changes", d, d), (S, 3, true), (S, 7, false), Disconnect),
            // Neither changed a block: the tie-break (lower node id survives) decides.
            row(("discard-zero-changes", d, d), (S, 0, false), (S, 0, false), Survivor),
            row(("discard-least-changes", d, d), (S, 3, false), (S, 7, false), Victim),
            row(("discard-least-changes", d, d), (S, 9, false), (S, 7, false), Survivor),
            row(("discard-least-changes", d, d), (S, 7, false), (S, 7, false), Survivor),
            // The node that was primary at the split is the older primary.
            row(("discard-younger-primary", d, d), (S, 1, true), (S, 50, false), Survivor),
            row(("discard-younger-primary", d, d), (S, 50, false), (S, 1, true), Victim),
            row(("discard-older-primary", d, d), (S, 1, true), (S, 50, false), Victim),
            row(("discard-older-primary", d, d), (S, 50, false), (S, 1, true), Survivor),
            // Undecided (both or neither primary at the split): discard-least-changes.
            row(("discard-younger-primary", d, d), (S, 2, true), (S, 3, true), Victim),
            row(("discard-older-primary", d, d), (S, 4, false), (S, 3, false), Survivor),
            row(("discard-local", d, d), (S, 100, true), (S, 0, false), Victim),
            row(("discard-remote", d, d), (S, 0, false), (S, 100, true), Survivor),
            // --- after-sb-1pri (one primary now) ---
            row(("discard-zero-changes", d, d), (P, 5, true), (S, 0, false), Disconnect),
            row((d, "discard-secondary", d), (P, 0, false), (S, 9, true), Survivor),
            row((d, "discard-secondary", d), (S, 9, true), (P, 0, false), Victim),
            // consensus: the 0pri outcome is applied only when the secondary loses.
            row(("discard-zero-changes", "consensus", d), (P, 5, true), (S, 0, false), Survivor),
            row(("discard-zero-changes", "consensus", d), (S, 0, false), (P, 5, true), Victim),
            row(("discard-zero-changes", "consensus", d), (P, 0, true), (S, 5, false), Disconnect),
            row(("discard-zero-changes", "consensus", d), (P, 3, true), (S, 5, false), Disconnect),
            row((d, "consensus", d), (P, 3, true), (S, 0, false), Disconnect),
            // violently-as0p: the 0pri outcome, even against the primary.
            row(
                ("discard-least-changes", "violently-as0p", d),
                (P, 1, true),
                (S, 5, false),
                Victim,
            ),
            row(
                ("discard-least-changes", "violently-as0p", d),
                (P, 9, true),
                (S, 5, false),
                Survivor,
            ),
            // call-pri-lost-after-sb: the secondary loses normally ...
            row(
                ("discard-least-changes", "call-pri-lost-after-sb", d),
                (P, 9, true),
                (S, 5, false),
                Survivor,
            ),
            row(
                ("discard-least-changes", "call-pri-lost-after-sb", d),
                (S, 5, false),
                (P, 9, true),
                Victim,
            ),
            // ... or the primary is told it lost, and nothing is synced.
            Row {
                policies: ("discard-least-changes", "call-pri-lost-after-sb", d),
                local: (P, 1, true),
                remote: (S, 5, false),
                expected: Disconnect,
                primary_lost: true,
            },
            Row {
                policies: ("discard-least-changes", "call-pri-lost-after-sb", d),
                local: (S, 5, false),
                remote: (P, 1, true),
                expected: Disconnect,
                primary_lost: false,
            },
            // --- after-sb-2pri (both primary now) ---
            row(
                ("discard-zero-changes", "discard-secondary", d),
                (P, 0, true),
                (P, 5, false),
                Disconnect,
            ),
            row(
                ("discard-least-changes", d, "violently-as0p"),
                (P, 1, true),
                (P, 5, false),
                Victim,
            ),
            Row {
                policies: ("discard-least-changes", d, "call-pri-lost-after-sb"),
                local: (P, 1, true),
                remote: (P, 5, false),
                expected: Disconnect,
                primary_lost: true,
            },
            Row {
                policies: ("discard-least-changes", d, "call-pri-lost-after-sb"),
                local: (P, 5, true),
                remote: (P, 1, false),
                expected: Disconnect,
                primary_lost: false,
            },
        ];
        for (n, r) in rows.iter().enumerate() {
            let p = policies(r.policies);
            let (a, b) = (side(0, r.local), side(1, r.remote));
            let got = resolve(p, &a, &b);
            assert_eq!(
                got.resolution, r.expected,
                "row {n}: {:?} {:?} {:?}",
                r.policies, r.local, r.remote
            );
            assert_eq!(got.primary_lost, r.primary_lost, "row {n}: primary_lost");
            let seen = resolve(p.seen_from_peer(), &b, &a);
            assert_eq!(seen.resolution, r.expected.mirrored(), "row {n} seen from the peer");
        }
    }

    /// Every combination of policies, roles, counts and flags gives mirrored answers on the
    /// two ends, and never makes both survivors or both victims.
    #[test]
    fn both_ends_agree_exhaustively() {
        let counts = [0u64, 1, 5];
        for &p0 in AfterSb0Pri::ALL {
            for &p1 in AfterSb1Pri::ALL {
                for &p2 in AfterSb2Pri::ALL {
                    let p =
                        AfterSbPolicies { zero_primaries: p0, one_primary: p1, two_primaries: p2 };
                    for ra in [P, S] {
                        for rb in [P, S] {
                            for ca in counts {
                                for cb in counts {
                                    for fa in [false, true] {
                                        for fb in [false, true] {
                                            let a = side(2, (ra, ca, fa));
                                            let b = side(5, (rb, cb, fb));
                                            let x = resolve(p, &a, &b);
                                            let y = resolve(p.seen_from_peer(), &b, &a);
                                            assert_eq!(
                                                x.resolution,
                                                y.resolution.mirrored(),
                                                "{p:?} {a:?} {b:?}"
                                            );
                                            assert!(!(x.primary_lost && y.primary_lost));
                                            if x.primary_lost {
                                                assert_eq!(x.resolution, Disconnect);
                                                assert_eq!(a.role, P);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn words_and_wire_round_trip() {
        for p in AfterSb0Pri::ALL {
            assert_eq!(p.as_str().parse::<AfterSb0Pri>(), Ok(*p));
            assert_eq!(AfterSb0Pri::from_wire(p.to_wire()), Some(*p));
        }
        for p in AfterSb1Pri::ALL {
            assert_eq!(p.as_str().parse::<AfterSb1Pri>(), Ok(*p));
            assert_eq!(AfterSb1Pri::from_wire(p.to_wire()), Some(*p));
        }
        for p in AfterSb2Pri::ALL {
            assert_eq!(p.as_str().parse::<AfterSb2Pri>(), Ok(*p));
            assert_eq!(AfterSb2Pri::from_wire(p.to_wire()), Some(*p));
        }
        assert!("discard-secondary".parse::<AfterSb0Pri>().is_err());
        let local = policies(("discard-local", "consensus", "disconnect"));
        let remote = policies(("discard-remote", "consensus", "disconnect"));
        assert!(local.compatible_with_peer(remote));
        assert!(!local.compatible_with_peer(local));
        assert_eq!(AfterSbPolicies::from_wire(local.to_wire()), Some(local));
        assert_eq!(AfterSbPolicies::from_wire([9, 0, 0]), None);
    }
}
