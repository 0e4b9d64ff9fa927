//! Hot-plug of an iSCSI volume as pure decisions: which hot-plug slot is free, which QMP calls
//! attach a volume and which undo each of them, and how an attachment's status may change.
//! The supervisor executes these plans; nothing here touches QEMU.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::connection_info::IscsiConnection;
use crate::constants::{
    DEVICE_DELETED_TIMEOUT_MS, HOTPLUG_SLOTS_MAX, ISCSI_TIMEOUT_S, QMP_BLOCKDEV_ADD_TIMEOUT_MS,
    QMP_COMMAND_TIMEOUT_MS,
};

/// The QOM id of hot-plug slot `index` (a pcie-root-port on q35).
pub fn root_port_id(index: usize) -> String {
    format!("tandem-port{index}")
}

/// Which attachment holds each hot-plug slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    owners: Vec<Option<String>>,
}

impl SlotTable {
    pub fn new(slots: usize) -> SlotTable {
        assert!(slots <= HOTPLUG_SLOTS_MAX, "slot count is checked when the instance is created");
        SlotTable { owners: vec![None; slots] }
    }

    /// Takes the lowest free slot for `owner`; `None` when every slot is taken.
    pub fn allocate(&mut self, owner: &str) -> Option<usize> {
        assert!(self.slot_of(owner).is_none(), "an attachment holds at most one slot");
        let index = self.owners.iter().position(Option::is_none)?;
        self.owners[index] = Some(owner.to_owned());
        Some(index)
    }

    /// Takes slot `index` for `owner` (an attachment found again after a restart); false when
    /// the slot does not exist or is held.
    pub fn claim(&mut self, index: usize, owner: &str) -> bool {
        assert!(self.slot_of(owner).is_none(), "an attachment holds at most one slot");
        match self.owners.get_mut(index) {
            Some(held @ None) => {
                *held = Some(owner.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Frees the slot `owner` holds (no-op when it holds none).
    pub fn release(&mut self, owner: &str) {
        if let Some(index) = self.slot_of(owner) {
            self.owners[index] = None;
        }
    }

    pub fn slot_of(&self, owner: &str) -> Option<usize> {
        self.owners.iter().position(|held| held.as_deref() == Some(owner))
    }

    pub fn free_count(&self) -> usize {
        self.owners.iter().filter(|held| held.is_none()).count()
    }
}

/// The QEMU object names of one attachment; unique per attachment serial so a late
/// DEVICE_DELETED of an old attachment can never be taken for a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentNames {
    pub secret_id: Option<String>,
    pub node_name: String,
    pub device_id: String,
    /// The bus the device is plugged into: a root port on q35, `pci.0` on `pc`.
    pub bus: String,
}

impl AttachmentNames {
    pub fn new(serial: u64, bus: String, with_secret: bool) -> AttachmentNames {
        AttachmentNames {
            secret_id: with_secret.then(|| format!("tandem-secret{serial}")),
            node_name: format!("tandem-node{serial}"),
            device_id: format!("tandem-disk{serial}"),
            bus,
        }
    }
}

/// One QMP command with its time limit.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpCall {
    pub command: &'static str,
    pub arguments: Value,
    pub timeout_ms: u64,
}

/// How to take back a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// A plain command (`blockdev-del`, `object-del`).
    Call(QmpCall),
    /// `device_del`, complete only when DEVICE_DELETED names the device.
    DeleteDevice { device_id: String, timeout_ms: u64 },
}

/// One step of an attach and its undo.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub call: QmpCall,
    pub undo: Undo,
}

/// The guest-visible error policy of hot-plugged disks. A target that merely goes away raises no
/// error (measured: libiscsi blocks the I/O and reconnects, even with `timeout` set, and the
/// guest's write completes once the target is back), but SCSI errors do, e.g. from a promoted
/// node that accepts logins before it exports the LUN. `stop` pauses the VM instead of handing
/// the guest an I/O error, so the resume watcher can `cont` (QEMU retries the failed requests)
/// once the volume answers again.
pub const ERROR_POLICY: &str = "stop";

/// Whether an attachment gets a guest device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// A virtio-blk device on `names.bus`: what a guest sees.
    VirtioBlk,
    /// The block node only. An instance with no OS cannot answer a hot-unplug request, so its
    /// volumes are attached as QEMU block nodes (reachable with `qemu-io` through QMP's
    /// human-monitor-command) that detach without the guest.
    NodeOnly,
}

/// The QMP steps that attach `connection` on `names.bus`, in order.
pub fn plan_attach(
    connection: &IscsiConnection,
    names: &AttachmentNames,
    initiator_iqn: &str,
    frontend: Frontend,
) -> Vec<Step> {
    assert_eq!(connection.chap.is_some(), names.secret_id.is_some(), "a secret exactly with CHAP");
    let mut steps = Vec::new();
    let mut blockdev = json!({
        "driver": "iscsi",
        "node-name": names.node_name,
        "transport": "tcp",
        "portal": connection.primary.portal.to_string(),
        "target": connection.primary.iqn,
        "lun": connection.primary.lun,
        "initiator-name": initiator_iqn,
        // Bounds the login that blockdev-add waits for: QMP is blocked meanwhile.
        "timeout": ISCSI_TIMEOUT_S,
        "cache": { "direct": true, "no-flush": false },
        "read-only": connection.read_only,
        "discard": if connection.discard { "unmap" } else { "ignore" },
    });
    if let (Some(chap), Some(secret_id)) = (&connection.chap, &names.secret_id) {
        steps.push(Step {
            call: QmpCall {
                command: "object-add",
                arguments: json!({ "qom-type": "secret", "id": secret_id, "data": chap.password }),
                timeout_ms: QMP_COMMAND_TIMEOUT_MS,
            },
            undo: Undo::Call(QmpCall {
                command: "object-del",
                arguments: json!({ "id": secret_id }),
                timeout_ms: QMP_COMMAND_TIMEOUT_MS,
            }),
        });
        blockdev["user"] = json!(chap.username);
        blockdev["password-secret"] = json!(secret_id);
    }
    steps.push(Step {
        call: QmpCall {
            command: "blockdev-add",
            arguments: blockdev,
            timeout_ms: QMP_BLOCKDEV_ADD_TIMEOUT_MS,
        },
        undo: Undo::Call(QmpCall {
            command: "blockdev-del",
            arguments: json!({ "node-name": names.node_name }),
            timeout_ms: QMP_COMMAND_TIMEOUT_MS,
        }),
    });
    if frontend == Frontend::NodeOnly {
        return steps;
    }
    let mut device = json!({
        "driver": "virtio-blk-pci",
        "id": names.device_id,
        "drive": names.node_name,
        "bus": names.bus,
        "werror": ERROR_POLICY,
        "rerror": ERROR_POLICY,
    });
    if let Some(volume_id) = &connection.volume_id {
        // Nova puts the volume id in the disk serial; guests find volumes by it
        // (/dev/disk/by-id/virtio-<first 20 bytes>).
        device["serial"] = json!(volume_id);
    }
    steps.push(Step {
        call: QmpCall {
            command: "device_add",
            arguments: device,
            timeout_ms: QMP_COMMAND_TIMEOUT_MS,
        },
        undo: Undo::DeleteDevice {
            device_id: names.device_id.clone(),
            timeout_ms: DEVICE_DELETED_TIMEOUT_MS,
        },
    });
    steps
}

/// What takes back the first `done` steps of `steps`: their undos, newest first. A detach is
/// `rollback(&steps, steps.len())`, so attach and detach can never disagree about what exists.
pub fn rollback(steps: &[Step], done: usize) -> Vec<Undo> {
    assert!(done <= steps.len());
    steps[..done].iter().rev().map(|step| step.undo.clone()).collect()
}

/// An attachment's life, as Nova's volume attachment states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentStatus {
    Attaching,
    Attached,
    Detaching,
    /// A detach could not finish (the guest never released the device): an operator may retry.
    Error,
}

/// What happened to an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentEvent {
    AttachSucceeded,
    DetachRequested,
    DetachFailed,
}

/// A transition the state machine does not allow (a caller error turned into an API error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attachment is {from:?}: cannot handle {event:?}")]
pub struct TransitionError {
    pub from: AttachmentStatus,
    pub event: AttachmentEvent,
}

impl AttachmentStatus {
    /// The status after `event`. A failed attach and a finished detach remove the attachment,
    /// so they have no successor status.
    pub fn next(self, event: AttachmentEvent) -> Result<AttachmentStatus, TransitionError> {
        use AttachmentEvent as E;
        use AttachmentStatus as S;
        match (self, event) {
            (S::Attaching, E::AttachSucceeded) => Ok(S::Attached),
            (S::Attached | S::Error, E::DetachRequested) => Ok(S::Detaching),
            (S::Detaching, E::DetachFailed) => Ok(S::Error),
            (from, event) => Err(TransitionError { from, event }),
        }
    }
}

/// How far an attach by volume id got (nova's order: the attachment in tandem-api first, then
/// the hot-plug, then `os-complete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeAttachStage {
    /// Nothing exists yet.
    Nothing,
    /// tandem-api holds an attachment (the volume is `attaching`).
    AttachmentCreated,
    /// The volume is plugged into QEMU as well.
    Plugged,
    /// `os-complete` succeeded: the volume is `in-use`; nothing to take back.
    Completed,
}

/// What takes back a partial attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    /// Run the QMP undo list of the plugged volume.
    Unplug,
    /// Delete the attachment in tandem-api (the volume returns to `available`).
    DeleteAttachment,
}

/// The compensations of an attach that failed after reaching `stage`, in order: QEMU lets go
/// of the volume before tandem-api hands it to anyone else, so a volume is never written by two
/// hosts, and the attachment is always deleted, so a volume never stays `attaching`/`reserved`.
pub fn compensations(stage: VolumeAttachStage) -> Vec<Compensation> {
    match stage {
        VolumeAttachStage::Nothing | VolumeAttachStage::Completed => vec![],
        VolumeAttachStage::AttachmentCreated => vec![Compensation::DeleteAttachment],
        VolumeAttachStage::Plugged => vec![Compensation::Unplug, Compensation::DeleteAttachment],
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn connection(chap: bool) -> IscsiConnection {
        let mut data = json!({
            "target_iqn": "iqn.2026-11.org.tandem:v", "target_portal": "127.0.0.1:3260",
            "target_lun": 0, "volume_id": "vol-1"
        });
        if chap {
            data["auth_method"] = json!("CHAP");
            data["auth_username"] = json!("u");
            data["auth_password"] = json!("secret");
        }
        IscsiConnection::parse(&json!({ "driver_volume_type": "iscsi", "data": data })).expect("ok")
    }

    #[test]
    fn slots_go_lowest_first_and_come_back() {
        let mut table = SlotTable::new(3);
        assert_eq!(table.allocate("a"), Some(0));
        assert_eq!(table.allocate("b"), Some(1));
        assert_eq!(table.allocate("c"), Some(2));
        assert_eq!(table.allocate("d"), None, "full");
        table.release("b");
        assert_eq!(table.free_count(), 1);
        assert_eq!(table.allocate("d"), Some(1), "the freed slot is reused");
        table.release("nobody");
        assert_eq!(table.slot_of("d"), Some(1));
        assert_eq!(SlotTable::new(0).allocate("x"), None);
    }

    #[test]
    fn chap_attach_adds_secret_node_device_and_detach_undoes_them_in_reverse() {
        let names = AttachmentNames::new(7, root_port_id(2), true);
        let steps = plan_attach(
            &connection(true),
            &names,
            "iqn.2026-11.org.tandem:host",
            Frontend::VirtioBlk,
        );
        let commands: Vec<_> = steps.iter().map(|step| step.call.command).collect();
        assert_eq!(commands, ["object-add", "blockdev-add", "device_add"]);
        let blockdev = &steps[1].call.arguments;
        assert_eq!(blockdev["driver"], "iscsi");
        assert_eq!(blockdev["portal"], "127.0.0.1:3260");
        assert_eq!(blockdev["user"], "u");
        assert_eq!(blockdev["password-secret"], "tandem-secret7");
        assert_eq!(blockdev["initiator-name"], "iqn.2026-11.org.tandem:host");
        assert!(blockdev["timeout"].as_u64().is_some_and(|timeout| timeout > 0));
        assert!(!blockdev.to_string().contains("\"secret\""), "the password goes via the secret");
        let device = &steps[2].call.arguments;
        assert_eq!(device["bus"], "tandem-port2");
        assert_eq!(device["drive"], "tandem-node7");
        assert_eq!(device["werror"], "stop");
        assert_eq!(device["rerror"], "stop");
        assert_eq!(device["serial"], "vol-1");

        let detach = rollback(&steps, steps.len());
        assert!(
            matches!(&detach[0], Undo::DeleteDevice { device_id, .. } if device_id == "tandem-disk7")
        );
        assert!(matches!(&detach[1], Undo::Call(call) if call.command == "blockdev-del"
            && call.arguments["node-name"] == "tandem-node7"));
        assert!(matches!(&detach[2], Undo::Call(call) if call.command == "object-del"
            && call.arguments["id"] == "tandem-secret7"));
        // A failure at step k undoes exactly the k steps before it.
        for done in 0..=steps.len() {
            assert_eq!(rollback(&steps, done).len(), done);
        }
        assert_eq!(rollback(&steps, 2), detach[1..].to_vec());
    }

    fn names_with_secret() -> AttachmentNames {
        AttachmentNames::new(2, root_port_id(1), true)
    }

    #[test]
    fn without_chap_there_is_no_secret() {
        let names = AttachmentNames::new(1, root_port_id(0), false);
        let steps = plan_attach(&connection(false), &names, "iqn.x:y", Frontend::VirtioBlk);
        assert_eq!(steps.len(), 2);
        assert!(steps[0].call.arguments.get("user").is_none());
        let node_only =
            plan_attach(&connection(true), &names_with_secret(), "iqn.x:y", Frontend::NodeOnly);
        let commands: Vec<_> = node_only.iter().map(|step| step.call.command).collect();
        assert_eq!(
            commands,
            ["object-add", "blockdev-add"],
            "no device for an instance without an OS"
        );
        assert!(rollback(&node_only, 2).iter().all(|undo| matches!(undo, Undo::Call(_))));
    }

    #[test]
    fn a_failed_attach_unplugs_before_it_gives_the_volume_back() {
        use Compensation::{DeleteAttachment, Unplug};
        use VolumeAttachStage as S;
        let cases = [
            (S::Nothing, vec![]),
            (S::AttachmentCreated, vec![DeleteAttachment]),
            (S::Plugged, vec![Unplug, DeleteAttachment]),
            (S::Completed, vec![]),
        ];
        for (stage, expected) in cases {
            assert_eq!(compensations(stage), expected, "{stage:?}");
        }
    }

    #[test]
    fn attachment_transitions() {
        use AttachmentEvent as E;
        use AttachmentStatus as S;
        let all_statuses = [S::Attaching, S::Attached, S::Detaching, S::Error];
        let all_events = [E::AttachSucceeded, E::DetachRequested, E::DetachFailed];
        let allowed = [
            (S::Attaching, E::AttachSucceeded, S::Attached),
            (S::Attached, E::DetachRequested, S::Detaching),
            (S::Error, E::DetachRequested, S::Detaching),
            (S::Detaching, E::DetachFailed, S::Error),
        ];
        for from in all_statuses {
            for event in all_events {
                let expected = allowed
                    .iter()
                    .find(|(a, e, _)| *a == from && *e == event)
                    .map(|(_, _, to)| *to);
                assert_eq!(from.next(event).ok(), expected, "{from:?} + {event:?}");
            }
        }
    }
}
