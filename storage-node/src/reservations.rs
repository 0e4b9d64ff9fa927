//! Persistent reservations replicated with the data.
//!
//! The logical unit's PERSISTENT RESERVE OUT state (registrations, the reservation, the
//! PRgeneration; `iscsi_target::scsi::pr_image`) is kept in the last
//! [`RESERVATION_AREA_BYTES`] of the replicated device, below the data the initiator sees
//! (the LUN is that much smaller than the device). It is written there with an ordinary
//! replicated FUA write, so it obeys exactly the rules of the data: acknowledged only when the
//! resource's protocol (and quorum) says a write is safe, resynced to a peer that was away,
//! covered by the activity log after a crash, part of split-brain detection, snapshots and
//! verify. A secondary therefore always holds the state the primary acknowledged, and the
//! node that is promoted reads it before its LUN serves ([`ensure_loaded`]); a restart of any
//! node keeps it, as it keeps the data.
//!
//! Each slot names the resource that wrote it: a resource created from a snapshot or from
//! another resource copies the data area, this end included, but not its reservations.
//!
//! Crash safety: two slots; each new image goes to the slot that does not hold the newest
//! durable one, and a load takes the newest image whose checksum holds, so a torn write falls
//! back to the previous acknowledged state, never to garbage.
//!
//! The ALUA state is not stored: it follows from the roles (the primary's port group is
//! active/optimized, a secondary's active/non-optimized while its forward link is up, standby
//! otherwise; `lun.rs`), which every node derives from the engine after a failover.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use drbd_engine::driver::{DeviceError as EngineError, ReplicatedDevice};
use iscsi_target::scsi::pr_image::{self, RESERVATION_IMAGE_BYTES_MAX};

use crate::constants::RELATIVE_PORTS_PER_NODE;
use crate::host::Slot;
use crate::lun::{LUN_BLOCK_SIZE_BYTES, REQUEST_BYTES_MAX};

/// One copy of the reservation image, padded to whole blocks.
pub const RESERVATION_SLOT_BYTES: u64 = 64 * 1024;
/// The end of the device that holds the two copies.
pub const RESERVATION_AREA_BYTES: u64 = 2 * RESERVATION_SLOT_BYTES;
const _: () = assert!(RESERVATION_SLOT_BYTES >= RESERVATION_IMAGE_BYTES_MAX as u64);
const _: () = assert!(RESERVATION_SLOT_BYTES.is_multiple_of(LUN_BLOCK_SIZE_BYTES as u64));
// A slot is read and written in one engine request.
const _: () = assert!(RESERVATION_SLOT_BYTES <= REQUEST_BYTES_MAX);

/// The size of the LUN on a device of `device_size_bytes`.
pub fn lun_size_bytes(device_size_bytes: u64) -> u64 {
    device_size_bytes.saturating_sub(RESERVATION_AREA_BYTES)
}

/// The byte offset of slot `index` (0 or 1) on a device of `device_size_bytes`.
pub fn slot_offset_bytes(device_size_bytes: u64, index: usize) -> u64 {
    assert!(index < 2);
    lun_size_bytes(device_size_bytes) + index as u64 * RESERVATION_SLOT_BYTES
}

/// Each slot starts with the name of the resource that wrote it, so a resource made from a
/// snapshot or a copy of another (which copies the whole data area, this end included) does
/// not inherit the source's registrations.
const OWNER_MAGIC: &[u8; 8] = b"TNDMPRv1";
/// The owner header: magic, name length (u16), name (at most `OWNER_NAME_BYTES_MAX`).
pub const OWNER_HEADER_BYTES: usize = 512;
const OWNER_NAME_BYTES_MAX: usize = OWNER_HEADER_BYTES - OWNER_MAGIC.len() - 2;
const _: () =
    assert!(RESERVATION_SLOT_BYTES >= (OWNER_HEADER_BYTES + RESERVATION_IMAGE_BYTES_MAX) as u64);

fn owner_header(owner: &str) -> [u8; OWNER_HEADER_BYTES] {
    let name = &owner.as_bytes()[..owner.len().min(OWNER_NAME_BYTES_MAX)];
    let mut header = [0u8; OWNER_HEADER_BYTES];
    header[..8].copy_from_slice(OWNER_MAGIC);
    header[8..10].copy_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
    header[10..10 + name.len()].copy_from_slice(name);
    header
}

/// Whether a slot's first block holds data Tandem never writes there: neither zeroes (a
/// fresh device) nor an owner header (this or another resource's image, torn or whole). A
/// volume that comes from kernel DRBD, or any device whose initiator data fill it to the end,
/// has such data in the area; using it would cut the initiator's data short and the first
/// PERSISTENT RESERVE OUT would overwrite it. A torn image write lands block by block, but
/// its first block is either still zero or the header, so a torn slot is never foreign. Pure.
pub fn foreign(slot: &[u8]) -> bool {
    let first = &slot[..slot.len().min(OWNER_HEADER_BYTES)];
    !first.starts_with(OWNER_MAGIC) && first.iter().any(|byte| *byte != 0)
}

/// Why the reservations could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Device(#[from] EngineError),
    #[error(
        "the last {} KiB of the device hold data that is not a reservation image (slot \
         {slot}): a volume from kernel DRBD or another system fills its device to the end. \
         Nothing was written there. Put `reservations {resource} local` in the node file to \
         export the whole device (reservations then stay in this node's memory)",
        RESERVATION_AREA_BYTES / 1024
    )]
    Foreign { resource: String, slot: usize },
}

/// The newest valid image of `owner` among the slots' contents: (slot index, version, image
/// bytes). Slots of another owner, torn or empty ones count as holding nothing. Pure.
pub fn newest(owner: &str, slots: [&[u8]; 2]) -> Option<(usize, u64, Bytes)> {
    let header = owner_header(owner);
    slots
        .iter()
        .enumerate()
        .filter_map(|(index, bytes)| {
            let image = bytes.strip_prefix(header.as_slice())?;
            let (version, _) = pr_image::decode(image).ok()?;
            Some((index, version, Bytes::copy_from_slice(image)))
        })
        .max_by_key(|(_, version, _)| *version)
}

/// The port of this node (relative identifiers `port_offset + 1 ..`) that serves in place of
/// `port`, a port of another node with the same portal index; `None` for this node's own.
pub fn port_here(port: u16, port_offset: u16) -> Option<u16> {
    let per_node = RELATIVE_PORTS_PER_NODE;
    if port == 0 || (port > port_offset && port <= port_offset + per_node) {
        return None;
    }
    Some(port_offset + (port - 1) % per_node + 1)
}

/// A slot's contents: the owner header and the image, padded to whole blocks (the decoder
/// ignores what follows the image).
fn framed(owner: &str, image: &[u8]) -> Bytes {
    let block = LUN_BLOCK_SIZE_BYTES as usize;
    let mut out = BytesMut::from(owner_header(owner).as_slice());
    out.extend_from_slice(image);
    let length = out.len().div_ceil(block) * block;
    out.resize(length, 0);
    out.freeze()
}

/// What the last load found and where the newest durable image is.
#[derive(Debug, Default)]
struct Durable {
    version: u64,
    /// The slot holding `version`; the next image goes to the other one.
    slot: usize,
}

/// One resource's reservation store, part of its [`Slot`].
#[derive(Debug, Default)]
pub struct ReservationStore {
    /// Incremented by every load; 0 = never loaded.
    loads: AtomicU64,
    image: Mutex<Bytes>,
    /// Serialises writes of images and remembers the newest durable one.
    durable: tokio::sync::Mutex<Durable>,
    /// The last load's error, logged once rather than at every retry of the state watcher.
    last_error: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReservationStore {
    /// The number of the last load, for `BlockDevice::reservations_load`.
    pub fn load_number(&self) -> Option<u64> {
        match self.loads.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// The image of the last load (empty: none was found).
    pub fn image(&self) -> Bytes {
        lock(&self.image).clone()
    }

    /// Reads both slots of `device` and makes the newest valid image current, with the
    /// registrations made through other nodes' ports extended to this node's (`port_offset`:
    /// this node's relative port identifiers are `port_offset + portal index`).
    pub async fn load(
        &self,
        device: &ReplicatedDevice,
        owner: &str,
        port_offset: u16,
    ) -> Result<(), LoadError> {
        let mut durable = self.durable.lock().await;
        let size = device.size_bytes();
        let first = device.read(slot_offset_bytes(size, 0), RESERVATION_SLOT_BYTES).await?;
        let second = device.read(slot_offset_bytes(size, 1), RESERVATION_SLOT_BYTES).await?;
        if let Some(slot) = [&first, &second].iter().position(|bytes| foreign(bytes)) {
            return Err(LoadError::Foreign { resource: owner.to_owned(), slot });
        }
        let (slot, version, image) = newest(owner, [&first, &second]).unwrap_or_default();
        *durable = Durable { version, slot };
        let image = match pr_image::decode(&image) {
            Ok((version, mut state)) => {
                let added = state.take_over_ports(|port| port_here(port, port_offset));
                tracing::info!(
                    version,
                    slot,
                    generation = state.generation,
                    registrations = state.registrations.len(),
                    added,
                    reserved = state.reservation.is_some(),
                    "persistent reservations loaded"
                );
                Bytes::from(pr_image::encode(&state, version))
            }
            Err(_) => {
                tracing::info!("no persistent reservations stored");
                Bytes::new()
            }
        };
        *lock(&self.image) = image;
        self.loads.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Writes image `version` to the slot not holding the newest durable image, with FUA
    /// through the replicated device; returns once it is durable where a write must be. An
    /// image older than the newest durable one is already superseded.
    pub async fn persist(
        &self,
        device: &ReplicatedDevice,
        owner: &str,
        version: u64,
        image: Bytes,
    ) -> Result<(), EngineError> {
        assert!(image.len() <= RESERVATION_IMAGE_BYTES_MAX);
        let mut durable = self.durable.lock().await;
        if version <= durable.version {
            return Ok(());
        }
        let slot = 1 - durable.slot;
        let offset = slot_offset_bytes(device.size_bytes(), slot);
        device.write(offset, framed(owner, &image), true).await?;
        *durable = Durable { version, slot };
        Ok(())
    }
}

impl ReservationStore {
    /// Moves both slots from the end of a device of `old_size_bytes` to the end of the grown
    /// device (`new_size_bytes`), then zeroes the old area, which the grow has made LUN data:
    /// the initiator sees zeroes there like in the rest of the new space. Written through the
    /// replicated device, so every replica's copy moves. The caller holds the LUN's writes
    /// (the slot's write gate) so no initiator write lands in the old area before it is
    /// zeroed; the store's own lock keeps a PERSISTENT RESERVE OUT from writing in between.
    pub async fn relocate(
        &self,
        device: &ReplicatedDevice,
        old_size_bytes: u64,
        new_size_bytes: u64,
    ) -> Result<(), EngineError> {
        assert!(new_size_bytes > old_size_bytes, "relocation follows a grow");
        let _durable = self.durable.lock().await;
        for index in 0..2 {
            let slot = device
                .read(slot_offset_bytes(old_size_bytes, index), RESERVATION_SLOT_BYTES)
                .await?;
            device.write(slot_offset_bytes(new_size_bytes, index), slot, true).await?;
        }
        let old_area = slot_offset_bytes(old_size_bytes, 0);
        let zeroes = Bytes::from(vec![0u8; usize::try_from(RESERVATION_AREA_BYTES).unwrap_or(0)]);
        device.write(old_area, zeroes, true).await?;
        Ok(())
    }
}

/// Whether the slot's LUN may serve as the logical unit now that the engine is Primary:
/// loads the reservations the first time after each promotion (this node's LUN does not
/// serve until they are in, so no command runs against a stale state).
pub async fn ensure_loaded(slot: &Slot) -> bool {
    if slot.primary.load(Ordering::Acquire) || !slot.reservation_area() {
        return true;
    }
    let Some(device) = slot.device() else { return false };
    let Ok(plan) = slot.plan() else { return false };
    let (port_offset, _) = crate::lun::relative_ports(&plan);
    match slot.reservations.load(&device, &slot.name, port_offset).await {
        Ok(()) => {
            *lock(&slot.reservations.last_error) = None;
            true
        }
        Err(error) => {
            let text = error.to_string();
            let mut last = lock(&slot.reservations.last_error);
            if last.as_deref() != Some(text.as_str()) {
                tracing::error!(
                    resource = %slot.name, error = %text,
                    "cannot read the persistent reservations; the LUN stays in standby"
                );
                *last = Some(text);
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_target::scsi::pr::{Nexus, Registration, ReservationState};

    fn image(version: u64, key: u64) -> Vec<u8> {
        let mut bytes = owner_header("r0").to_vec();
        bytes.extend_from_slice(&bare_image(version, key));
        bytes
    }

    fn bare_image(version: u64, key: u64) -> Vec<u8> {
        let state = ReservationState {
            generation: u32::try_from(version).unwrap(),
            registrations: vec![Registration {
                nexus: Nexus { initiator_name: "iqn.x:a".into(), isid: 1, relative_port: 1 },
                key,
                all_tg_pt: false,
            }],
            ..Default::default()
        };
        let mut bytes = pr_image::encode(&state, version);
        bytes.resize(2048, 0);
        bytes
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_falls_back() {
        let (v1, v2) = (image(1, 0xa), image(2, 0xb));
        let mut torn = v2.clone();
        torn[OWNER_HEADER_BYTES + 40] ^= 1;
        let zero = vec![0u8; 4096];
        let mut foreign = owner_header("r1").to_vec();
        foreign.extend_from_slice(&bare_image(3, 0xc));
        type Case<'a> = ([&'a [u8]; 2], Option<(usize, u64)>);
        let cases: Vec<Case> = vec![
            ([&zero, &zero], None),
            ([&v1, &zero], Some((0, 1))),
            ([&v1, &v2], Some((1, 2))),
            ([&v2, &v1], Some((0, 2))),
            ([&v1, &torn], Some((0, 1))),
            // A copy of another resource's data area: its images are not ours.
            ([&v1, &foreign], Some((0, 1))),
            ([&foreign, &zero], None),
        ];
        for (slots, expected) in cases {
            assert_eq!(newest("r0", slots).map(|(s, v, _)| (s, v)), expected);
        }
    }

    #[test]
    fn data_that_tandem_never_writes_in_the_area_is_foreign() {
        let mut tail_only = vec![0u8; 4096];
        tail_only[4000] = 1;
        let mut gpt_backup = vec![0u8; 4096];
        gpt_backup[..8].copy_from_slice(b"EFI PART");
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("zeroes (a fresh device)", vec![0; 4096], false),
            ("our image", image(1, 0xa), false),
            ("another resource's image", owner_header("r9").to_vec(), false),
            ("a torn write whose first block did not land", tail_only, false),
            ("a file system's or partition table's data", gpt_backup, true),
            ("a pattern", vec![0xa5; 4096], true),
        ];
        for (what, slot, expected) in cases {
            assert_eq!(foreign(&slot), expected, "{what}");
        }
    }

    #[test]
    fn ports_of_other_nodes_map_to_the_same_portal_here() {
        // Node 1 (offset 16) serves port 17 for node 0's port 1, 18 for 2, and so on.
        let cases = [(1, 16, Some(17)), (2, 16, Some(18)), (17, 16, None), (33, 16, Some(17))];
        for (port, offset, expected) in cases {
            assert_eq!(port_here(port, offset), expected, "port {port} offset {offset}");
        }
        assert_eq!(port_here(17, 0), Some(1));
        assert_eq!(port_here(1, 0), None);
    }

    #[test]
    fn layout_and_padding() {
        assert_eq!(lun_size_bytes(1 << 20), (1 << 20) - RESERVATION_AREA_BYTES);
        assert_eq!(lun_size_bytes(4096), 0);
        assert_eq!(slot_offset_bytes(1 << 20, 1), (1 << 20) - RESERVATION_SLOT_BYTES);
        assert_eq!(framed("r0", &[1; 10]).len(), 4096);
        assert_eq!(framed("r0", &[1; 4096 - OWNER_HEADER_BYTES + 1]).len(), 8192);
        assert_eq!(framed("r0", &[]).len(), 4096);
    }
}
