//! The seam between the SCSI emulation and storage: [`BlockDevice`], implemented by a file
//! through the backing-store layer and later by the replicated device.

use std::future::Future;

use bytes::Bytes;

#[cfg(doc)]
use crate::constants::ATOMIC_WRITE_BYTES_MAX;
use crate::constants::PAGE_ATOMIC_WRITE_BYTES;
use crate::remote::{ForwardError, ForwardReply, ForwardRequest};

/// ALUA access state of the LUN through this target (SPC-4 §5.16.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluaState {
    ActiveOptimized,
    /// Serves every command, more slowly: a remote port whose commands run on another node
    /// ([`BlockDevice::forwards`]).
    ActiveNonOptimized,
    Standby,
}

impl AluaState {
    /// The ASYMMETRIC ACCESS STATE code reported by REPORT TARGET PORT GROUPS.
    pub fn code(self) -> u8 {
        match self {
            Self::ActiveOptimized => 0x0,
            Self::ActiveNonOptimized => 0x1,
            Self::Standby => 0x2,
        }
    }
}

/// Target port group id of this target's own ports unless a device says otherwise.
pub const LOCAL_PORT_GROUP_ID: u16 = 1;

/// One target port group as REPORT TARGET PORT GROUPS lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AluaPortGroup {
    pub group_id: u16,
    pub state: AluaState,
    /// The group holding this target's own ports: the SCSI layer lists the target's relative
    /// port identifiers for it (the device does not know them) and names it in VPD page 83h.
    pub local: bool,
    /// Relative target port identifiers of a remote group (e.g. the peer node's portal);
    /// ignored for the local group. They must not collide with this target's own.
    pub relative_ports: Vec<u16>,
}

impl AluaPortGroup {
    /// The group of this target's own ports, in `state`.
    pub fn local(state: AluaState) -> Self {
        Self { group_id: LOCAL_PORT_GROUP_ID, state, local: true, relative_ports: Vec::new() }
    }
}

/// Kinds of device failure, mapped to sense data at the SCSI boundary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("access beyond the end of the device")]
    OutOfRange,
    #[error("no space left on the backing store")]
    NoSpace,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("the device is in ALUA standby")]
    Standby,
}

/// A range of the device and whether it holds data (mapped) or reads as zeroes (deallocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRange {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub mapped: bool,
}

/// A block device as the SCSI layer sees it. Offsets and lengths are in bytes and always
/// multiples of [`BlockDevice::block_size_bytes`] inside [`BlockDevice::size_bytes`]: the SCSI
/// layer checks them before calling, so an implementation may treat violations as bugs.
pub trait BlockDevice: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    fn block_size_bytes(&self) -> u32 {
        512
    }
    /// Whether UNMAP and hole punching are supported (thin provisioning).
    fn thin_provisioned(&self) -> bool {
        true
    }
    fn alua_state(&self) -> AluaState {
        AluaState::ActiveOptimized
    }
    /// Every target port group of the logical unit, ours included (exactly one `local` group,
    /// in [`BlockDevice::alua_state`]). A storage node lists its peer's group too, so an
    /// initiator learns where the active/optimized path is. The default: our group alone.
    fn alua_port_groups(&self) -> Vec<AluaPortGroup> {
        vec![AluaPortGroup::local(self.alua_state())]
    }
    /// The longest WRITE ATOMIC the device keeps whole across a crash (not only against other
    /// commands, which the driver's exclusive lock guarantees for any length). The default is
    /// one page, the most a buffered write is known to leave whole; a device that journals its
    /// atomic writes claims more (the SCSI layer clamps it to [`ATOMIC_WRITE_BYTES_MAX`]).
    fn atomic_write_max_bytes(&self) -> u32 {
        PAGE_ATOMIC_WRITE_BYTES
    }
    /// The alignment atomic writes need, in bytes (a block size: none). The default page
    /// guarantee holds only for an aligned page.
    fn atomic_write_alignment_bytes(&self) -> u32 {
        PAGE_ATOMIC_WRITE_BYTES
    }
    fn read(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
    ) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;
    /// With `fua`, the data is on stable storage when the future completes.
    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// WRITE ATOMIC: after a crash the range holds all of `data` or none of it, for writes
    /// within [`BlockDevice::atomic_write_max_bytes`] and its alignment. The caller runs it
    /// alone on the device (the driver holds the device lock exclusively). The default is a
    /// plain write, whole across a crash for the default one-page limit.
    fn write_atomic(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.write(offset_bytes, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Deallocates the range; later reads return zeroes.
    fn unmap(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Makes reservation image `image` (`scsi::pr_image`, version `version`) durable wherever
    /// the device keeps the logical unit's persistent reservations; a PERSISTENT RESERVE OUT
    /// that changed them completes only after this does. Versions only grow: a device that
    /// already holds a newer image keeps it (two commands may finish out of order). The
    /// default keeps nothing (reservations live in the target's memory alone).
    fn persist_reservations(
        &self,
        version: u64,
        image: Bytes,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let _ = (version, image);
        std::future::ready(Ok(()))
    }
    /// A number that changes every time the device loads the logical unit's reservations (a
    /// storage node's promotion): the SCSI layer adopts each load once, before the next
    /// command runs, from [`BlockDevice::persisted_reservations`]. Asked at every command, so
    /// it must be cheap. `None`: the device loads nothing.
    fn reservations_load(&self) -> Option<u64> {
        None
    }
    /// The reservation image of the last load (empty when the device held none).
    fn persisted_reservations(&self) -> Option<Bytes> {
        None
    }
    /// Whether this port is a remote port of the logical unit: its SCSI commands (and LUN
    /// resets, and the comings and goings of its I_T nexuses) run on the node that holds the
    /// logical unit, through [`BlockDevice::forward`], instead of on this device. Asked when
    /// each command starts; while it answers `false` the device serves locally (a storage
    /// node's secondary then answers ALUA standby).
    fn forwards(&self) -> bool {
        false
    }
    /// Carries one request to the node that holds the logical unit and returns its answer.
    /// An error means the request may not have run there; the caller answers with a
    /// retryable sense, never with success.
    fn forward(
        &self,
        request: ForwardRequest,
    ) -> impl Future<Output = Result<ForwardReply, ForwardError>> + Send {
        let _ = request;
        std::future::ready(Err(ForwardError::Unavailable("this device forwards nothing".into())))
    }
    /// Mapped/deallocated status from `offset_bytes` on, in order, covering at least the first byte.
    fn mapped_ranges(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> impl Future<Output = Result<Vec<MappedRange>, DeviceError>> + Send;
}

/// One block I/O the SCSI layer asks the driver to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read {
        offset_bytes: u64,
        length_bytes: u32,
    },
    Write {
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Unmap {
        offset_bytes: u64,
        length_bytes: u64,
    },
    WriteZeroes {
        offset_bytes: u64,
        length_bytes: u64,
    },
    MappedRanges {
        offset_bytes: u64,
        length_bytes: u64,
    },
    /// Reads the range; if it equals `compare`, writes `data` there. Atomic with respect to
    /// every other write to the device: the driver runs it under an exclusive lock.
    CompareAndWrite {
        offset_bytes: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    },
    /// Reads the range, ORs `mask` into it and writes it back, atomically like CompareAndWrite.
    OrWrite {
        offset_bytes: u64,
        mask: Bytes,
        fua: bool,
    },
    /// Make a persistent-reservation image durable ([`BlockDevice::persist_reservations`]).
    PersistReservations {
        version: u64,
        image: Bytes,
    },
    /// WRITE ATOMIC(16): a write that no other command may observe half done (the driver runs
    /// it under the device lock held exclusively, so overlapping reads and writes wait) and
    /// that a crash leaves whole ([`BlockDevice::write_atomic`]).
    AtomicWrite {
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    },
}

impl IoOp {
    /// Whether the op must run alone on the device: read-modify-write ops (no other write
    /// between their two halves) and atomic writes (no reader or writer sees them half done).
    pub fn is_exclusive(&self) -> bool {
        matches!(
            self,
            Self::CompareAndWrite { .. } | Self::OrWrite { .. } | Self::AtomicWrite { .. }
        )
    }
    /// Whether the op changes the device.
    pub fn is_write(&self) -> bool {
        matches!(self, Self::Write { .. } | Self::Unmap { .. } | Self::WriteZeroes { .. })
            || self.is_exclusive()
    }
}

/// Offset of the first byte where `a` and `b` differ.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `current | mask`, byte by byte.
pub fn or_bytes(current: &[u8], mask: &[u8]) -> Bytes {
    current
        .iter()
        .zip(mask.iter().chain(std::iter::repeat(&0)))
        .map(|(c, m)| c | m)
        .collect::<Vec<u8>>()
        .into()
}

/// What a completed [`IoOp`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoData {
    None,
    Read(Bytes),
    Ranges(Vec<MappedRange>),
    /// COMPARE AND WRITE found different data at this byte offset of the range.
    Miscompare(u64),
}

/// Runs one [`IoOp`] against a device: the driver's whole job for block I/O.
pub async fn perform<D: BlockDevice>(device: &D, op: IoOp) -> Result<IoData, DeviceError> {
    match op {
        IoOp::Read { offset_bytes, length_bytes } => {
            device.read(offset_bytes, length_bytes).await.map(IoData::Read)
        }
        IoOp::Write { offset_bytes, data, fua } => {
            device.write(offset_bytes, data, fua).await.map(|()| IoData::None)
        }
        IoOp::AtomicWrite { offset_bytes, data, fua } => {
            device.write_atomic(offset_bytes, data, fua).await.map(|()| IoData::None)
        }
        IoOp::Flush => device.flush().await.map(|()| IoData::None),
        IoOp::PersistReservations { version, image } => {
            device.persist_reservations(version, image).await.map(|()| IoData::None)
        }
        IoOp::Unmap { offset_bytes, length_bytes } => {
            device.unmap(offset_bytes, length_bytes).await.map(|()| IoData::None)
        }
        IoOp::WriteZeroes { offset_bytes, length_bytes } => {
            device.write_zeroes(offset_bytes, length_bytes).await.map(|()| IoData::None)
        }
        IoOp::MappedRanges { offset_bytes, length_bytes } => {
            device.mapped_ranges(offset_bytes, length_bytes).await.map(IoData::Ranges)
        }
        IoOp::CompareAndWrite { offset_bytes, compare, data, fua } => {
            let length = u32::try_from(compare.len()).map_err(|_| DeviceError::OutOfRange)?;
            let current = device.read(offset_bytes, length).await?;
            if let Some(at) = first_difference(&current, &compare) {
                return Ok(IoData::Miscompare(at as u64));
            }
            device.write(offset_bytes, data, fua).await.map(|()| IoData::None)
        }
        IoOp::OrWrite { offset_bytes, mask, fua } => {
            let length = u32::try_from(mask.len()).map_err(|_| DeviceError::OutOfRange)?;
            let current = device.read(offset_bytes, length).await?;
            device.write(offset_bytes, or_bytes(&current, &mask), fua).await.map(|()| IoData::None)
        }
    }
}
