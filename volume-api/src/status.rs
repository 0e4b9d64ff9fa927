//! The volume status machine, as Cinder's: which action may start from which status and where it
//! leads. Pure: the API applies a `Transition` to the stored record; background operations report
//! their outcome through `complete`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeStatus {
    Creating,
    Available,
    Reserved,
    Attaching,
    InUse,
    Detaching,
    Extending,
    Deleting,
    Error,
    #[serde(rename = "error_deleting")]
    ErrorDeleting,
    #[serde(rename = "error_extending")]
    ErrorExtending,
    Maintenance,
}

impl VolumeStatus {
    pub const ALL: [VolumeStatus; 12] = [
        VolumeStatus::Creating,
        VolumeStatus::Available,
        VolumeStatus::Reserved,
        VolumeStatus::Attaching,
        VolumeStatus::InUse,
        VolumeStatus::Detaching,
        VolumeStatus::Extending,
        VolumeStatus::Deleting,
        VolumeStatus::Error,
        VolumeStatus::ErrorDeleting,
        VolumeStatus::ErrorExtending,
        VolumeStatus::Maintenance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::Creating => "creating",
            VolumeStatus::Available => "available",
            VolumeStatus::Reserved => "reserved",
            VolumeStatus::Attaching => "attaching",
            VolumeStatus::InUse => "in-use",
            VolumeStatus::Detaching => "detaching",
            VolumeStatus::Extending => "extending",
            VolumeStatus::Deleting => "deleting",
            VolumeStatus::Error => "error",
            VolumeStatus::ErrorDeleting => "error_deleting",
            VolumeStatus::ErrorExtending => "error_extending",
            VolumeStatus::Maintenance => "maintenance",
        }
    }
}

impl fmt::Display for VolumeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        VolumeStatus::ALL.into_iter().find(|v| v.as_str() == s).ok_or(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachStatus {
    Attached,
    Detached,
}

impl AttachStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachStatus::Attached => "attached",
            AttachStatus::Detached => "detached",
        }
    }
}

/// What a request wants to do to a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Reserve,
    Unreserve,
    /// Attachment update with a connector, or os-initialize_connection after os-reserve.
    BeginAttaching,
    /// os-attach or attachment os-complete.
    Attach,
    BeginDetaching,
    RollDetaching,
    /// os-detach or the last attachment deleted.
    Detach,
    Extend,
    Delete,
    Snapshot,
    Clone,
    Update,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Reserve => "reserve",
            Action::Unreserve => "unreserve",
            Action::BeginAttaching => "attach",
            Action::Attach => "attach",
            Action::BeginDetaching => "begin detaching",
            Action::RollDetaching => "roll detaching",
            Action::Detach => "detach",
            Action::Extend => "extend",
            Action::Delete => "delete",
            Action::Snapshot => "create a snapshot",
            Action::Clone => "clone",
            Action::Update => "update",
        }
    }
}

/// What the caller knows about the volume besides its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Facts {
    /// Attachments other than the one this request is about.
    pub other_attachments: usize,
    pub snapshots: usize,
}

/// The refusal Cinder would give, as the message of an `Invalid volume` fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Where `action` takes a volume in `status`, or why it may not.
pub fn transition(
    status: VolumeStatus,
    action: Action,
    facts: Facts,
) -> Result<VolumeStatus, Refused> {
    use VolumeStatus as S;
    let refuse = |allowed: &str| {
        Err(Refused(format!(
            "Volume status must be {allowed} to {}, but current status is: {status}.",
            action.verb()
        )))
    };
    match action {
        Action::Reserve => match status {
            S::Available => Ok(S::Reserved),
            _ => refuse("available"),
        },
        Action::Unreserve => match status {
            S::Reserved if facts.other_attachments > 0 => Ok(S::InUse),
            S::Reserved => Ok(S::Available),
            _ => refuse("reserved"),
        },
        Action::BeginAttaching => match status {
            S::Reserved | S::Attaching | S::Available => Ok(S::Attaching),
            _ => refuse("available, reserved or attaching"),
        },
        Action::Attach => match status {
            S::Reserved | S::Attaching | S::Available => Ok(S::InUse),
            _ => refuse("available, reserved or attaching"),
        },
        Action::BeginDetaching => match status {
            S::InUse => Ok(S::Detaching),
            _ => refuse("in-use"),
        },
        Action::RollDetaching => match status {
            S::Detaching => Ok(S::InUse),
            // Cinder leaves any other status unchanged here.
            other => Ok(other),
        },
        Action::Detach => match status {
            S::InUse | S::Detaching | S::Reserved | S::Attaching | S::Error | S::Maintenance
                if facts.other_attachments > 0 =>
            {
                Ok(S::InUse)
            }
            S::InUse | S::Detaching | S::Reserved | S::Attaching => Ok(S::Available),
            // A volume in error whose attachment goes away stays in error for the operator.
            S::Error | S::Maintenance => Ok(status),
            _ => refuse("in-use, detaching, reserved or attaching"),
        },
        Action::Extend => match status {
            // Online extend (3.42) is allowed; the node resizes the LUN under the session.
            S::Available | S::InUse => Ok(S::Extending),
            _ => refuse("available or in-use"),
        },
        Action::Delete => {
            if facts.snapshots > 0 {
                return Err(Refused(
                    "Volume must not have snapshots to be deleted, but it has dependent snapshots."
                        .into(),
                ));
            }
            if facts.other_attachments > 0 {
                return Err(Refused("Volume status must be available or error or error_restoring or error_extending or error_managing and must not be migrating, attached, belong to a group, have snapshots, awaiting a transfer, or be disassociated from snapshots after volume transfer.".into()));
            }
            match status {
                S::Available | S::Error | S::ErrorExtending | S::ErrorDeleting => Ok(S::Deleting),
                _ => refuse(
                    "available or error or error_restoring or error_extending or error_managing",
                ),
            }
        }
        Action::Snapshot | Action::Clone => match status {
            S::Available | S::InUse => Ok(status),
            _ => refuse("available or in-use"),
        },
        Action::Update => match status {
            S::Maintenance => refuse("not maintenance"),
            other => Ok(other),
        },
    }
}

/// Where a finished background operation leaves the volume. `before` is the status the
/// operation started from (an extend returns to in-use when it was attached).
pub fn complete(during: VolumeStatus, before: VolumeStatus, succeeded: bool) -> VolumeStatus {
    use VolumeStatus as S;
    assert!(
        matches!(during, S::Creating | S::Extending | S::Deleting),
        "not a long operation: {during}"
    );
    match (during, succeeded) {
        (S::Creating, true) => S::Available,
        (S::Creating, false) => S::Error,
        (S::Extending, true) => before,
        (S::Extending, false) => S::ErrorExtending,
        (S::Deleting, false) => S::ErrorDeleting,
        // A deleted volume's record goes away; the status is only seen by a racing reader.
        (S::Deleting, true) => S::Deleting,
        _ => unreachable!(),
    }
}

/// The attach_status that goes with a volume status.
pub fn attach_status_for(status: VolumeStatus, attachments: usize) -> AttachStatus {
    match status {
        VolumeStatus::InUse | VolumeStatus::Detaching => AttachStatus::Attached,
        _ if attachments > 0 && status != VolumeStatus::Reserved => AttachStatus::Attached,
        _ => AttachStatus::Detached,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VolumeStatus as S;

    const NONE: Facts = Facts { other_attachments: 0, snapshots: 0 };

    #[test]
    fn allowed_transitions() {
        let cases = [
            (S::Available, Action::Reserve, S::Reserved),
            (S::Reserved, Action::Unreserve, S::Available),
            (S::Reserved, Action::BeginAttaching, S::Attaching),
            (S::Attaching, Action::Attach, S::InUse),
            (S::Reserved, Action::Attach, S::InUse),
            (S::InUse, Action::BeginDetaching, S::Detaching),
            (S::Detaching, Action::RollDetaching, S::InUse),
            (S::Detaching, Action::Detach, S::Available),
            (S::InUse, Action::Detach, S::Available),
            (S::Available, Action::Extend, S::Extending),
            (S::InUse, Action::Extend, S::Extending),
            (S::Available, Action::Delete, S::Deleting),
            (S::Error, Action::Delete, S::Deleting),
            (S::ErrorExtending, Action::Delete, S::Deleting),
            (S::ErrorDeleting, Action::Delete, S::Deleting),
            (S::InUse, Action::Snapshot, S::InUse),
        ];
        for (from, action, to) in cases {
            assert_eq!(transition(from, action, NONE), Ok(to), "{from} {action:?}");
        }
    }

    #[test]
    fn every_status_refuses_what_cinder_refuses() {
        // For each action, the statuses it may start from; every other status must be refused.
        let table: [(Action, &[S]); 6] = [
            (Action::Reserve, &[S::Available]),
            (Action::Unreserve, &[S::Reserved]),
            (Action::BeginDetaching, &[S::InUse]),
            (Action::Extend, &[S::Available, S::InUse]),
            (Action::Delete, &[S::Available, S::Error, S::ErrorExtending, S::ErrorDeleting]),
            (Action::Attach, &[S::Available, S::Reserved, S::Attaching]),
        ];
        for (action, allowed) in table {
            for status in S::ALL {
                let result = transition(status, action, NONE);
                assert_eq!(
                    result.is_ok(),
                    allowed.contains(&status),
                    "{status} {action:?}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn dependents_block_delete_and_keep_volume_in_use() {
        let snaps = Facts { other_attachments: 0, snapshots: 1 };
        assert!(transition(S::Available, Action::Delete, snaps).is_err());
        let attached = Facts { other_attachments: 1, snapshots: 0 };
        assert!(transition(S::Available, Action::Delete, attached).is_err());
        assert_eq!(transition(S::InUse, Action::Detach, attached), Ok(S::InUse));
        assert_eq!(transition(S::Reserved, Action::Unreserve, attached), Ok(S::InUse));
    }

    #[test]
    fn long_operations_finish_where_cinder_does() {
        assert_eq!(complete(S::Creating, S::Creating, true), S::Available);
        assert_eq!(complete(S::Creating, S::Creating, false), S::Error);
        assert_eq!(complete(S::Extending, S::InUse, true), S::InUse);
        assert_eq!(complete(S::Extending, S::Available, true), S::Available);
        assert_eq!(complete(S::Extending, S::Available, false), S::ErrorExtending);
        assert_eq!(complete(S::Deleting, S::Available, false), S::ErrorDeleting);
    }

    #[test]
    fn names_round_trip() {
        for status in S::ALL {
            assert_eq!(status.as_str().parse::<S>(), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert_eq!(attach_status_for(S::InUse, 1), AttachStatus::Attached);
        assert_eq!(attach_status_for(S::Reserved, 1), AttachStatus::Detached);
    }
}
