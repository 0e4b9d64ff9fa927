//! A double-write journal that keeps an atomic write whole across a crash: after a crash the
//! range holds all of the old data or all of the new, never a mix.
//!
//! Why it is needed: a write longer than one page can be torn by a crash. A buffered write is
//! copied into the page cache page by page (a killed process can leave a prefix written) and
//! written back page by page (a power loss can persist any subset); the disk itself writes at
//! most a sector or a page as one. So an atomic write goes to a side file first (one header
//! block and one slot of the largest atomic write):
//!
//! 1. the record (magic, version, sequence, offset, length, CRC32C of the data, CRC32C of the
//!    header) and the data are written into the journal as one FUA write;
//! 2. the data is written in place in the image, FUA;
//! 3. the record is marked applied, FUA; only then does the write complete.
//!
//! On open, a valid record that is not applied is written in place again (step 2 may have been
//! torn); a torn record (bad CRC) means step 1 never finished, so step 2 never started and the
//! image holds the old data whole: the record is cleared.
//!
//! Step 3 must be durable before the write completes: were the "applied" mark lost, the
//! pending record would be replayed on open over any later write to the range, a silent revert
//! of data the caller had been told was written. For the same reason an atomic write that
//! fails after step 1 began fences every later atomic write of this journal (`check_not_fenced`)
//! until a restart has replayed its record; the caller fences its other writes the same way
//! (the replication engine detaches the disk on any failed write).
//!
//! One slot: atomic writes wait for each other (an async lock held for the whole write).
//! Other writes to the image go on meanwhile; the caller keeps them off the range of an atomic
//! write in flight (the SCSI layer runs WRITE ATOMIC under its device lock held exclusively,
//! the replication engine never has two overlapping writes on the disk at once).
//!
//! The journal is a second [`BackingStore`] on the side file, so "durable" means the same for
//! both files (a FUA write: RWF_DSYNC). Three synchronous writes per atomic write.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::sync::Mutex;

use crate::constants::IO_SIZE_BYTES_MAX;
use crate::{BackingStore, OpenOptions};

/// Appended to the image path to name its journal (the convention both users keep).
pub const JOURNAL_SUFFIX: &str = ".atomic-journal";
/// Bytes of the header block: the record lives in its first bytes, the rest is zero. A whole
/// 4 KiB block keeps the slot aligned for O_DIRECT.
pub const HEADER_BYTES: usize = 4096;
/// Block size the record's offset and length are multiples of (the smallest logical block).
pub const RECORD_BLOCK_BYTES: u64 = 512;
/// The largest slot a journal may have: header and slot are written as one request.
pub const SLOT_BYTES_MAX: u32 = 4 * 1024 * 1024;
const MAGIC: [u8; 8] = *b"TNDMATJ\n";
const VERSION: u32 = 1;
/// Bytes of the encoded record, its header CRC included.
pub const RECORD_BYTES: usize = 44;

const _: () = assert!(HEADER_BYTES + SLOT_BYTES_MAX as usize <= IO_SIZE_BYTES_MAX);
const _: () = assert!(RECORD_BYTES <= HEADER_BYTES && HEADER_BYTES.is_multiple_of(4096));
const _: () = assert!((SLOT_BYTES_MAX as u64).is_multiple_of(RECORD_BLOCK_BYTES));

/// Size of the journal file for a slot of `slot_bytes`.
pub fn journal_bytes(slot_bytes: u32) -> u64 {
    HEADER_BYTES as u64 + u64::from(slot_bytes)
}

/// The journal path of `image`.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(JOURNAL_SUFFIX);
    PathBuf::from(name)
}

/// Whether the data of a record is known to be in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Step 1 done: the data in the slot may or may not be in place yet.
    Pending,
    /// Step 3 done: the data is durable in place.
    Applied,
}

impl RecordState {
    fn code(self) -> u32 {
        match self {
            Self::Pending => 1,
            Self::Applied => 2,
        }
    }
}

/// The journal header record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub state: RecordState,
    /// Increases by one per atomic write: tells records apart in logs.
    pub sequence: u64,
    pub offset_bytes: u64,
    pub length_bytes: u32,
    pub data_crc32c: u32,
}

/// What a header block holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// All zero: a new journal, or one cleared after a torn record.
    Empty,
    Valid(Record),
    /// A header that fails its CRC: a write of it did not finish.
    Torn,
}

/// Why decoding refused a header whose CRC holds or whose magic is foreign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    NotAJournal,
    UnsupportedVersion(u32),
    BadState(u32),
}

/// Journal contents we refuse to act on, and I/O failures. The operator must look: the journal
/// can be removed once it is known not to hold the only copy of an atomic write.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: crate::Error },
    #[error("{path}: syncing its directory: {source}")]
    SyncDirectory { path: PathBuf, source: std::io::Error },
    #[error("{path}: {size_bytes} bytes, this atomic-write journal has {expected_bytes}")]
    WrongSize { path: PathBuf, size_bytes: u64, expected_bytes: u64 },
    #[error("{path}: not an atomic-write journal (bad magic); refusing to overwrite it")]
    NotAJournal { path: PathBuf },
    #[error("{path}: journal format version {version}, this build reads {VERSION}")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: an earlier atomic write failed after its record was written; writes are refused \
         until a restart replays it"
    )]
    Fenced { path: PathBuf },
    #[error("{path}: a record with a valid CRC that cannot be applied: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(
        "{path}: slot of {slot_bytes} bytes: must be whole 512-byte blocks up to {SLOT_BYTES_MAX}"
    )]
    BadSlot { path: PathBuf, slot_bytes: u32 },
}

/// Encodes `record` as a header block (little-endian fields, CRC32C over the fields before it).
pub fn encode(record: &Record) -> Bytes {
    let mut block = BytesMut::zeroed(HEADER_BYTES);
    block[0..8].copy_from_slice(&MAGIC);
    block[8..12].copy_from_slice(&VERSION.to_le_bytes());
    block[12..16].copy_from_slice(&record.state.code().to_le_bytes());
    block[16..24].copy_from_slice(&record.sequence.to_le_bytes());
    block[24..32].copy_from_slice(&record.offset_bytes.to_le_bytes());
    block[32..36].copy_from_slice(&record.length_bytes.to_le_bytes());
    block[36..40].copy_from_slice(&record.data_crc32c.to_le_bytes());
    let crc = crc32c::crc32c(&block[..40]);
    block[40..44].copy_from_slice(&crc.to_le_bytes());
    block.freeze()
}

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn le64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

/// Decodes a header block. Never panics, whatever `block` holds.
pub fn decode(block: &[u8]) -> Result<Decoded, DecodeError> {
    if block.len() < RECORD_BYTES {
        return Ok(Decoded::Torn);
    }
    let record = &block[..RECORD_BYTES];
    if record.iter().all(|&b| b == 0) {
        return Ok(Decoded::Empty);
    }
    if record[0..8] != MAGIC {
        return Err(DecodeError::NotAJournal);
    }
    if crc32c::crc32c(&record[..40]) != le32(&record[40..]) {
        return Ok(Decoded::Torn);
    }
    let version = le32(&record[8..]);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let state = match le32(&record[12..]) {
        1 => RecordState::Pending,
        2 => RecordState::Applied,
        other => return Err(DecodeError::BadState(other)),
    };
    Ok(Decoded::Valid(Record {
        state,
        sequence: le64(&record[16..]),
        offset_bytes: le64(&record[24..]),
        length_bytes: le32(&record[32..]),
        data_crc32c: le32(&record[36..]),
    }))
}

/// Checks that a record describes a write of at most `slot_bytes` inside `image_bytes`.
pub fn check_record(record: &Record, slot_bytes: u32, image_bytes: u64) -> Result<(), String> {
    let length = u64::from(record.length_bytes);
    if length == 0 || length > u64::from(slot_bytes) {
        return Err(format!("length {length} outside 1..={slot_bytes}"));
    }
    if !length.is_multiple_of(RECORD_BLOCK_BYTES)
        || !record.offset_bytes.is_multiple_of(RECORD_BLOCK_BYTES)
    {
        return Err(format!("offset {} or length {length} not in blocks", record.offset_bytes));
    }
    if record.offset_bytes.checked_add(length).is_none_or(|end| end > image_bytes) {
        return Err(format!(
            "{length} bytes at {} beyond the image's {image_bytes} bytes",
            record.offset_bytes
        ));
    }
    Ok(())
}

/// What opening the journal found and did, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: a new or cleared journal, or the last record was applied.
    Clean,
    /// A pending record was written in place again and marked applied.
    Replayed { sequence: u64, offset_bytes: u64, length_bytes: u32 },
    /// A torn record (header or data CRC mismatch) was cleared; the image was not touched.
    DiscardedTorn { what: &'static str },
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Clean => write!(f, "clean"),
            Self::Replayed { sequence, offset_bytes, length_bytes } => write!(
                f,
                "replayed atomic write #{sequence} ({length_bytes} bytes at offset {offset_bytes})"
            ),
            Self::DiscardedTorn { what } => {
                write!(f, "discarded a torn record ({what}); the image was not touched")
            }
        }
    }
}

/// Where an atomic write stops in a crash test: the process dies (SIGKILL) after this step.
/// Only crash tests set one ([`AtomicJournal::set_crash_point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After step 1, with half of the data written in place (a torn step 2).
    TornInPlace,
    /// After step 2 (the data is in place; the record is not marked applied).
    InPlace,
}

/// The journal of one image.
pub struct AtomicJournal {
    path: PathBuf,
    file: BackingStore,
    slot_bytes: u32,
    /// The sequence of the last record; the lock is the one slot, held for a whole write.
    slot: Mutex<u64>,
    /// Set when an atomic write fails after step 1 began: see the module documentation.
    fenced: AtomicBool,
    crash_at: Option<CrashPoint>,
}

impl fmt::Debug for AtomicJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicJournal")
            .field("path", &self.path)
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}

impl AtomicJournal {
    /// Opens (creating it if missing) the journal at `path` for `image`, with a slot of
    /// `slot_bytes`, and finishes or discards the atomic write a crash interrupted; a pending
    /// record must lie within the first `image_bytes` (the data area) to be replayed. Must run
    /// before the image serves any I/O.
    pub async fn open(
        path: &Path,
        image: &BackingStore,
        image_bytes: u64,
        slot_bytes: u32,
        options: &OpenOptions,
    ) -> Result<(Self, Recovery), JournalError> {
        let path = path.to_path_buf();
        if slot_bytes == 0
            || slot_bytes > SLOT_BYTES_MAX
            || !u64::from(slot_bytes).is_multiple_of(RECORD_BLOCK_BYTES)
        {
            return Err(JournalError::BadSlot { path, slot_bytes });
        }
        let io = |source| JournalError::Io { path: path.clone(), source };
        let expected_bytes = journal_bytes(slot_bytes);
        let created = !path.exists();
        let options = OpenOptions {
            create_size_bytes: Some(expected_bytes),
            read_only: false,
            ..options.clone()
        };
        let file = BackingStore::open(&path, &options).map_err(io)?;
        if file.size_bytes() != expected_bytes {
            return Err(JournalError::WrongSize {
                path,
                size_bytes: file.size_bytes(),
                expected_bytes,
            });
        }
        if created {
            // The journal must survive a crash as a name too, or a replay would find nothing.
            sync_parent_directory(&path)
                .map_err(|source| JournalError::SyncDirectory { path: path.clone(), source })?;
        }
        let header = file.read(0, HEADER_BYTES).await.map_err(io)?;
        let decoded = decode(&header).map_err(|error| match error {
            DecodeError::NotAJournal => JournalError::NotAJournal { path: path.clone() },
            DecodeError::UnsupportedVersion(version) => {
                JournalError::UnsupportedVersion { path: path.clone(), version }
            }
            DecodeError::BadState(state) => {
                JournalError::BadRecord { path: path.clone(), reason: format!("state {state}") }
            }
        })?;
        let mut journal = Self {
            path,
            file,
            slot_bytes,
            slot: Mutex::new(0),
            fenced: AtomicBool::new(false),
            crash_at: None,
        };
        let recovery = match decoded {
            Decoded::Empty => Recovery::Clean,
            Decoded::Torn => {
                journal.clear().await?;
                Recovery::DiscardedTorn { what: "header CRC" }
            }
            Decoded::Valid(record) => {
                *journal.slot.get_mut() = record.sequence;
                journal.recover(image, image_bytes.min(image.size_bytes()), record).await?
            }
        };
        Ok((journal, recovery))
    }

    /// The largest atomic write this journal keeps whole, in bytes.
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn recover(
        &self,
        image: &BackingStore,
        image_bytes: u64,
        record: Record,
    ) -> Result<Recovery, JournalError> {
        if record.state == RecordState::Applied {
            return Ok(Recovery::Clean);
        }
        check_record(&record, self.slot_bytes, image_bytes)
            .map_err(|reason| JournalError::BadRecord { path: self.path.clone(), reason })?;
        let length = usize::try_from(record.length_bytes).unwrap_or(usize::MAX);
        let data = self.file.read(HEADER_BYTES as u64, length).await.map_err(|e| self.io(e))?;
        if crc32c::crc32c(&data) != record.data_crc32c {
            // Step 1 did not finish, so step 2 never started: the image holds the old data.
            self.clear().await?;
            return Ok(Recovery::DiscardedTorn { what: "data CRC" });
        }
        self.apply(image, &record, data).await?;
        Ok(Recovery::Replayed {
            sequence: record.sequence,
            offset_bytes: record.offset_bytes,
            length_bytes: record.length_bytes,
        })
    }

    fn io(&self, source: crate::Error) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }

    /// Steps 2 and 3: the data in place, durable; then the record marked applied, durable.
    async fn apply(
        &self,
        image: &BackingStore,
        record: &Record,
        data: Bytes,
    ) -> Result<(), JournalError> {
        image
            .write(record.offset_bytes, data, true)
            .await
            .map_err(|source| JournalError::Io { path: image.path().to_path_buf(), source })?;
        self.maybe_crash(CrashPoint::InPlace);
        let applied = Record { state: RecordState::Applied, ..*record };
        self.file.write(0, encode(&applied), true).await.map_err(|e| self.io(e))
    }

    /// Clears the header (durably), so a torn record is not looked at again.
    async fn clear(&self) -> Result<(), JournalError> {
        self.file.write(0, Bytes::from(vec![0u8; HEADER_BYTES]), true).await.map_err(|e| self.io(e))
    }

    /// Writes `data` at `offset_bytes` of `image` so that after a crash the range holds all of
    /// it or none of it; durable when it returns. Waits for an atomic write in flight.
    pub async fn write(
        &self,
        image: &BackingStore,
        offset_bytes: u64,
        data: Bytes,
    ) -> Result<(), JournalError> {
        let mut sequence = self.slot.lock().await;
        self.check_not_fenced()?;
        let length_bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let record = Record {
            state: RecordState::Pending,
            sequence: *sequence + 1,
            offset_bytes,
            length_bytes,
            data_crc32c: crc32c::crc32c(&data),
        };
        // A write we could not replay must not start: refuse it before step 1. Against the
        // image as it is now (it may have grown since open); keeping data writes inside a data
        // area is the caller's business, as for its plain writes.
        check_record(&record, self.slot_bytes, image.size_bytes())
            .map_err(|reason| JournalError::BadRecord { path: self.path.clone(), reason })?;
        let result = self.write_steps(image, &record, data).await;
        match result {
            Ok(()) => *sequence = record.sequence,
            Err(_) => self.fenced.store(true, Ordering::SeqCst),
        }
        result
    }

    /// Fails once an atomic write failed half way (see the module documentation).
    pub fn check_not_fenced(&self) -> Result<(), JournalError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(JournalError::Fenced { path: self.path.clone() });
        }
        Ok(())
    }

    async fn write_steps(
        &self,
        image: &BackingStore,
        record: &Record,
        data: Bytes,
    ) -> Result<(), JournalError> {
        // Step 1: record and data into the journal, durably, as one write.
        let mut entry = BytesMut::with_capacity(HEADER_BYTES + data.len());
        entry.extend_from_slice(&encode(record));
        entry.extend_from_slice(&data);
        self.file.write(0, entry.freeze(), true).await.map_err(|e| self.io(e))?;
        if self.crash_at == Some(CrashPoint::TornInPlace) {
            let half = data.len() / 2 / 512 * 512;
            let _ = image.write(record.offset_bytes, data.slice(..half), true).await;
            self.maybe_crash(CrashPoint::TornInPlace);
        }
        // Steps 2 and 3.
        self.apply(image, record, data).await
    }

    fn maybe_crash(&self, point: CrashPoint) {
        if self.crash_at == Some(point) {
            // A crash, not an unwind: no destructor, no flush, the process is gone. SIGKILL
            // rather than abort(), which could leave a core dump behind.
            // SAFETY: kill() with our own pid and a valid signal number touches no memory.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::process::abort();
        }
    }

    /// For crash tests only: the process kills itself at `point` of the next atomic write.
    #[doc(hidden)]
    pub fn set_crash_point(&mut self, point: CrashPoint) {
        self.crash_at = Some(point);
    }
}

fn sync_parent_directory(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const IMAGE_BYTES: u64 = 4 * 1024 * 1024;
    const SLOT_BYTES: u32 = 1024 * 1024;
    /// The range the crash tests write: one full-size atomic write, not page aligned.
    const OFFSET_BYTES: u64 = 3 * 512;
    const LENGTH: usize = SLOT_BYTES as usize;
    const OLD: u8 = 0x11;
    const NEW: u8 = 0xa6;

    fn record() -> Record {
        Record {
            state: RecordState::Pending,
            sequence: 7,
            offset_bytes: 4096,
            length_bytes: 8192,
            data_crc32c: 0xdead_beef,
        }
    }

    #[test]
    fn records_round_trip_and_a_flipped_bit_is_torn_or_refused() {
        for state in [RecordState::Pending, RecordState::Applied] {
            let r = Record { state, ..record() };
            assert_eq!(decode(&encode(&r)), Ok(Decoded::Valid(r)));
        }
        assert_eq!(decode(&[0u8; HEADER_BYTES]), Ok(Decoded::Empty));
        let block = encode(&record());
        for at in 0..RECORD_BYTES {
            let mut bad = block.to_vec();
            bad[at] ^= 0x10;
            let expected = if at < 8 { Err(DecodeError::NotAJournal) } else { Ok(Decoded::Torn) };
            assert_eq!(decode(&bad), expected, "byte {at}");
        }
    }

    #[test]
    fn records_outside_the_slot_or_the_image_are_refused() {
        let cases = [
            (0, 512, true),
            (0, SLOT_BYTES, true),
            (0, SLOT_BYTES + 512, false),
            (0, 0, false),
            (1, 512, false),
            (IMAGE_BYTES - 512, 1024, false),
            (u64::MAX - 511, 512, false),
        ];
        for (offset_bytes, length_bytes, ok) in cases {
            let r = Record { offset_bytes, length_bytes, ..record() };
            let checked = check_record(&r, SLOT_BYTES, IMAGE_BYTES);
            assert_eq!(checked.is_ok(), ok, "{offset_bytes} {length_bytes}");
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn options() -> OpenOptions {
        OpenOptions { create_size_bytes: Some(IMAGE_BYTES), ..OpenOptions::default() }
    }

    async fn open(dir: &Path) -> (BackingStore, AtomicJournal, Recovery) {
        let image_path = dir.join("data.img");
        let image = BackingStore::open(&image_path, &options()).unwrap();
        let (journal, recovery) = AtomicJournal::open(
            &journal_path(&image_path),
            &image,
            IMAGE_BYTES,
            SLOT_BYTES,
            &options(),
        )
        .await
        .unwrap();
        (image, journal, recovery)
    }

    async fn region(image: &BackingStore) -> Vec<u8> {
        image.read(OFFSET_BYTES, LENGTH).await.unwrap().to_vec()
    }

    fn is_all(data: &[u8], value: u8) -> bool {
        data.iter().all(|&b| b == value)
    }

    fn prepare(dir: &Path) {
        runtime().block_on(async {
            let (image, _journal, recovery) = open(dir).await;
            assert_eq!(recovery, Recovery::Clean);
            image.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
        });
    }

    /// Runs `crash_child` in a child process that dies at `point` in an atomic write of NEW.
    fn crash_at(dir: &Path, point: &str) {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["atomic_journal::tests::crash_child", "--exact", "--nocapture"])
            .env("TANDEM_JOURNAL_CRASH_DIR", dir)
            .env("TANDEM_JOURNAL_CRASH_POINT", point)
            .status()
            .unwrap();
        assert!(!status.success(), "the child was meant to die at {point}");
    }

    /// Not a test of its own: the child process of the crash tests (does nothing otherwise).
    #[test]
    fn crash_child() {
        let (Some(dir), Ok(point)) = (
            std::env::var_os("TANDEM_JOURNAL_CRASH_DIR"),
            std::env::var("TANDEM_JOURNAL_CRASH_POINT"),
        ) else {
            return;
        };
        let point = match point.as_str() {
            "torn-in-place" => CrashPoint::TornInPlace,
            "in-place" => CrashPoint::InPlace,
            other => panic!("unknown crash point {other}"),
        };
        runtime().block_on(async {
            let (image, mut journal, _) = open(Path::new(&dir)).await;
            journal.set_crash_point(point);
            let _ = journal.write(&image, OFFSET_BYTES, Bytes::from(vec![NEW; LENGTH])).await;
        });
        unreachable!("the atomic write returned instead of crashing at {point:?}");
    }

    #[test]
    fn a_torn_in_place_write_is_replayed_whole_once() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        crash_at(dir.path(), "torn-in-place");
        let raw = std::fs::read(dir.path().join("data.img")).unwrap();
        let start = usize::try_from(OFFSET_BYTES).unwrap();
        let torn = &raw[start..start + LENGTH];
        assert!(torn.contains(&NEW) && torn.contains(&OLD), "the crash did not tear the write");
        let rt = runtime();
        rt.block_on(async {
            let (image, _journal, recovery) = open(dir.path()).await;
            assert!(matches!(recovery, Recovery::Replayed { sequence: 1, .. }), "{recovery}");
            assert!(is_all(&region(&image).await, NEW));
        });
        rt.block_on(async {
            let (image, _journal, recovery) = open(dir.path()).await;
            assert_eq!(recovery, Recovery::Clean);
            assert!(is_all(&region(&image).await, NEW));
        });
    }

    #[test]
    fn a_crash_before_the_applied_mark_is_replayed_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        crash_at(dir.path(), "in-place");
        let journal = journal_path(&dir.path().join("data.img"));
        let pending = std::fs::read(&journal).unwrap();
        let rt = runtime();
        for round in 0..2 {
            rt.block_on(async {
                let (image, _journal, recovery) = open(dir.path()).await;
                assert!(matches!(recovery, Recovery::Replayed { .. }), "round {round}");
                assert!(is_all(&region(&image).await, NEW), "round {round}");
            });
            // A crash during the replay, before the applied mark: the record is pending again.
            std::fs::write(&journal, &pending).unwrap();
        }
    }

    #[test]
    fn a_torn_journal_write_leaves_the_old_data_and_is_cleared() {
        for (what, corrupt_at) in [("data CRC", HEADER_BYTES + 100), ("header CRC", 20)] {
            let dir = tempfile::tempdir().unwrap();
            prepare(dir.path());
            crash_at(dir.path(), "in-place");
            let rt = runtime();
            // Put the old data back and damage the journal: as if step 1 had been torn (and
            // step 2 therefore never started).
            rt.block_on(async {
                let image = BackingStore::open(&dir.path().join("data.img"), &options()).unwrap();
                image.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
            });
            let journal = journal_path(&dir.path().join("data.img"));
            let mut bytes = std::fs::read(&journal).unwrap();
            bytes[corrupt_at] ^= 0x40;
            std::fs::write(&journal, &bytes).unwrap();
            rt.block_on(async {
                let (image, _journal, recovery) = open(dir.path()).await;
                assert_eq!(recovery, Recovery::DiscardedTorn { what }, "{what}");
                assert!(is_all(&region(&image).await, OLD), "{what}");
            });
            rt.block_on(async {
                assert_eq!(open(dir.path()).await.2, Recovery::Clean, "{what}: cleared");
            });
        }
    }

    #[test]
    fn a_completed_atomic_write_is_never_replayed_over_a_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let (image, journal, _) = open(dir.path()).await;
            journal.write(&image, OFFSET_BYTES, Bytes::from(vec![NEW; LENGTH])).await.unwrap();
            image.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
        });
        rt.block_on(async {
            let (image, _journal, recovery) = open(dir.path()).await;
            assert_eq!(recovery, Recovery::Clean);
            assert!(is_all(&region(&image).await, OLD));
        });
    }

    #[test]
    fn bad_journal_files_and_writes_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let image_path = dir.path().join("data.img");
        let journal = journal_path(&image_path);
        let rt = runtime();
        let open_error = |slot_bytes| {
            rt.block_on(async {
                let image = BackingStore::open(&image_path, &options()).unwrap();
                AtomicJournal::open(&journal, &image, IMAGE_BYTES, slot_bytes, &options())
                    .await
                    .expect_err("an error")
                    .to_string()
            })
        };
        assert!(open_error(100).contains("must be whole 512-byte blocks"));
        std::fs::write(&journal, b"short").unwrap();
        assert!(open_error(SLOT_BYTES).contains("this atomic-write journal has"));
        let mut foreign = vec![0u8; usize::try_from(journal_bytes(SLOT_BYTES)).unwrap()];
        foreign[..5].copy_from_slice(b"hello");
        std::fs::write(&journal, &foreign).unwrap();
        assert!(open_error(SLOT_BYTES).contains("not an atomic-write journal"));
        std::fs::remove_file(&journal).unwrap();
        rt.block_on(async {
            let (image, journal, _) = open(dir.path()).await;
            let too_long = Bytes::from(vec![NEW; LENGTH + 512]);
            let error = journal.write(&image, 0, too_long).await.unwrap_err().to_string();
            assert!(error.contains("cannot be applied"), "{error}");
            // Refused before step 1: nothing is fenced.
            journal.write(&image, 0, Bytes::from(vec![NEW; 4096])).await.unwrap();
        });
    }
}
