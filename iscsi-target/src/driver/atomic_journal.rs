//! A double-write journal that makes WRITE ATOMIC whole across a crash for up to
//! [`FILE_ATOMIC_WRITE_BYTES_MAX`] on the standalone file device.
//!
//! A buffered write to the image can be torn by a crash above one page: the kernel copies it
//! into the page cache and writes it back page by page. So an atomic write goes to a side file
//! first (`IMAGE.atomic-journal`: one header block and one slot of the maximum atomic size):
//!
//! 1. the record (magic, version, sequence, offset, length, CRC32C of the data, CRC32C of the
//!    header) and the data are written into the journal and made durable;
//! 2. the data is written in place in the image and made durable;
//! 3. the record is marked applied and made durable; only then is the command completed.
//!
//! On open, a valid record that is not applied is written in place again (step 2 may have been
//! torn); a torn record (bad CRC) means step 1 never finished, so step 2 never started and the
//! image holds the old data whole: the record is cleared. Either way the range holds all of
//! the old data or all of the new, never a mix.
//!
//! One slot suffices: an atomic write holds the device lock exclusively (no other atomic write,
//! nor any other write, runs meanwhile); [`AtomicJournal::write`] asserts the first half. An
//! atomic write that fails after step 1 began fences every later write until a restart has
//! replayed its record (see `AtomicJournal::fenced`).
//!
//! The journal is a second [`BackingStore`] on the side file rather than `std::fs` in
//! `spawn_blocking`: it gets the engine, O_DIRECT handling, range checks and error kinds of the
//! image for free, and "durable" means the same thing for both files (a FUA write: RWF_DSYNC,
//! the data and the metadata needed to read it back, i.e. an fdatasync limited to what we
//! wrote). Each step is one FUA write, so an atomic write costs three synchronous writes.

use std::fmt;
use std::path::{Path, PathBuf};

use backing_store::constants::IO_SIZE_BYTES_MAX;
use backing_store::{BackingStore, OpenOptions};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Mutex;

use crate::constants::FILE_ATOMIC_WRITE_BYTES_MAX;

/// Appended to the image path to name its journal.
pub const JOURNAL_SUFFIX: &str = ".atomic-journal";
/// Bytes of the header block: the record lives in its first bytes, the rest is zero. A whole
/// 4 KiB block keeps the slot aligned for O_DIRECT.
pub const HEADER_BYTES: usize = 4096;
/// Size of the journal file: the header block and one slot.
pub const JOURNAL_BYTES: u64 = HEADER_BYTES as u64 + FILE_ATOMIC_WRITE_BYTES_MAX as u64;
/// Block size the record's offset and length are multiples of (the LUN's logical block).
const BLOCK_BYTES: u64 = 512;
const MAGIC: [u8; 8] = *b"TNDMATJ\n";
const VERSION: u32 = 1;
/// Bytes of the encoded record, its header CRC included.
const RECORD_BYTES: usize = 44;

// Step 1 writes header and slot as one request.
const _: () = assert!(JOURNAL_BYTES <= IO_SIZE_BYTES_MAX as u64);
const _: () = assert!(RECORD_BYTES <= HEADER_BYTES && HEADER_BYTES.is_multiple_of(4096));
const _: () = assert!((FILE_ATOMIC_WRITE_BYTES_MAX as u64).is_multiple_of(BLOCK_BYTES));

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

/// Journal contents we refuse to act on: the operator must look (the image may be fine; the
/// journal can be removed once it is known not to hold the only copy of an atomic write).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: backing_store::Error },
    #[error("{path}: syncing its directory: {source}")]
    SyncDirectory { path: PathBuf, source: std::io::Error },
    #[error("{path}: {size_bytes} bytes, an atomic-write journal has {JOURNAL_BYTES}")]
    WrongSize { path: PathBuf, size_bytes: u64 },
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
}

/// Why decoding refused a header whose CRC holds or whose magic is foreign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    NotAJournal,
    UnsupportedVersion(u32),
    BadState(u32),
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

/// Checks that a record describes a write we could have made to an image of `image_bytes`.
pub fn check_record(record: &Record, image_bytes: u64) -> Result<(), String> {
    let length = u64::from(record.length_bytes);
    if length == 0 || length > u64::from(FILE_ATOMIC_WRITE_BYTES_MAX) {
        return Err(format!("length {length} outside 1..={FILE_ATOMIC_WRITE_BYTES_MAX}"));
    }
    if !length.is_multiple_of(BLOCK_BYTES) || !record.offset_bytes.is_multiple_of(BLOCK_BYTES) {
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

/// Where an atomic write stops in a crash test: the process dies after this step.
#[cfg(test)]
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
    /// The sequence of the last record; the lock is the one slot. Held for a whole atomic write.
    slot: Mutex<u64>,
    /// Set when an atomic write fails after step 1 began: its record may be pending, and a
    /// replay on the next start would write it over any later write to the range, so no write
    /// may be acknowledged until then (fail-stop rather than a silent revert).
    fenced: AtomicBool,
    #[cfg(test)]
    crash_at: Option<CrashPoint>,
}

/// The journal path of `image`.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(JOURNAL_SUFFIX);
    PathBuf::from(name)
}

impl AtomicJournal {
    /// Opens (creating it if missing) the journal of `image` and finishes or discards the
    /// atomic write a crash interrupted. Must run before the image serves any I/O.
    pub async fn open(
        image: &BackingStore,
        options: &OpenOptions,
    ) -> Result<(Self, Recovery), JournalError> {
        let path = journal_path(image.path());
        let io = |source| JournalError::Io { path: path.clone(), source };
        let created = !path.exists();
        let options = OpenOptions {
            create_size_bytes: Some(JOURNAL_BYTES),
            read_only: false,
            ..options.clone()
        };
        let file = BackingStore::open(&path, &options).map_err(io)?;
        if file.size_bytes() != JOURNAL_BYTES {
            return Err(JournalError::WrongSize { path, size_bytes: file.size_bytes() });
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
            path: path.clone(),
            file,
            slot: Mutex::new(0),
            fenced: AtomicBool::new(false),
            #[cfg(test)]
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
                journal.recover(image, record).await?
            }
        };
        Ok((journal, recovery))
    }

    async fn recover(
        &self,
        image: &BackingStore,
        record: Record,
    ) -> Result<Recovery, JournalError> {
        if record.state == RecordState::Applied {
            return Ok(Recovery::Clean);
        }
        // The LUN is the image's whole blocks (see StoreDevice::new).
        let image_bytes = image.size_bytes() / BLOCK_BYTES * BLOCK_BYTES;
        check_record(&record, image_bytes)
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

    fn io(&self, source: backing_store::Error) -> JournalError {
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
        #[cfg(test)]
        self.maybe_crash(CrashPoint::InPlace);
        // Step 3 must be durable before the command completes. Were the "applied" mark lost in
        // a crash after the acknowledgement, the pending record would be replayed on open and
        // write this (older) data over any write the initiator made to the range since, and
        // had acknowledged: a silent revert of acknowledged data.
        let applied = Record { state: RecordState::Applied, ..*record };
        self.file.write(0, encode(&applied), true).await.map_err(|e| self.io(e))
    }

    /// Clears the header (durably), so a torn record is not looked at again.
    async fn clear(&self) -> Result<(), JournalError> {
        self.file.write(0, Bytes::from(vec![0u8; HEADER_BYTES]), true).await.map_err(|e| self.io(e))
    }

    /// Writes `data` at `offset_bytes` of `image` so that after a crash the range holds all of
    /// it or none of it. The caller runs it alone on the image (device lock held exclusively).
    pub async fn write(
        &self,
        image: &BackingStore,
        offset_bytes: u64,
        data: Bytes,
    ) -> Result<(), JournalError> {
        let length_bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
        // One slot: a second atomic write at the same time would overwrite the record of the
        // first before it is applied. The driver's exclusive lock rules that out.
        let mut slot = self.slot.try_lock();
        assert!(slot.is_ok(), "two atomic writes at once on {}", self.path.display());
        let Ok(sequence) = slot.as_deref_mut() else { unreachable!() };
        let record = Record {
            state: RecordState::Pending,
            sequence: *sequence + 1,
            offset_bytes,
            length_bytes,
            data_crc32c: crc32c::crc32c(&data),
        };
        // The SCSI layer checks range and length before the write gets here.
        assert!(check_record(&record, image.size_bytes()).is_ok(), "atomic write {record:?}");
        self.check_not_fenced()?;
        let result = self.write_steps(image, &record, data).await;
        match result {
            Ok(()) => *sequence = record.sequence,
            Err(_) => self.fenced.store(true, Ordering::SeqCst),
        }
        result
    }

    /// Fails once an atomic write failed half way: see `fenced`. Every write to the image
    /// checks it.
    pub fn check_not_fenced(&self) -> Result<(), JournalError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(JournalError::Fenced { path: self.path.clone() });
        }
        Ok(())
    }

    /// Steps 1 to 3 of an atomic write.
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
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::TornInPlace) {
            let half = data.len() / 2 / 512 * 512;
            let _ = image.write(record.offset_bytes, data.slice(..half), true).await;
            self.maybe_crash(CrashPoint::TornInPlace);
        }
        // Steps 2 and 3.
        self.apply(image, record, data).await
    }

    #[cfg(test)]
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

    #[cfg(test)]
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
    use std::sync::Arc;

    use super::*;
    use crate::device::{BlockDevice, IoData, IoOp};
    use crate::driver::perform_locked;
    use crate::driver::store::StoreDevice;

    const IMAGE_BYTES: u64 = 1024 * 1024;
    /// The range the crash tests write: one full-size atomic write, not page aligned.
    const OFFSET_BYTES: u64 = 3 * 512;
    const LENGTH: usize = FILE_ATOMIC_WRITE_BYTES_MAX as usize;
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
    fn records_round_trip_and_an_empty_header_is_empty() {
        for state in [RecordState::Pending, RecordState::Applied] {
            let r = Record { state, ..record() };
            let block = encode(&r);
            assert_eq!(block.len(), HEADER_BYTES);
            assert_eq!(decode(&block), Ok(Decoded::Valid(r)));
        }
        assert_eq!(decode(&[0u8; HEADER_BYTES]), Ok(Decoded::Empty));
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_record_is_torn_or_refused_never_trusted() {
        let block = encode(&record());
        for at in 0..RECORD_BYTES {
            for bit in 0..8 {
                let mut bad = block.to_vec();
                bad[at] ^= 1 << bit;
                let decoded = decode(&bad);
                if at < 8 {
                    assert_eq!(decoded, Err(DecodeError::NotAJournal), "byte {at}");
                } else {
                    assert_eq!(decoded, Ok(Decoded::Torn), "byte {at} bit {bit}");
                }
            }
        }
        // Bytes past the record do not matter.
        let mut tail = block.to_vec();
        tail[HEADER_BYTES - 1] = 0xff;
        assert_eq!(decode(&tail), Ok(Decoded::Valid(record())));
    }

    #[test]
    fn short_foreign_and_future_headers_are_errors_not_panics() {
        assert_eq!(decode(&[]), Ok(Decoded::Torn));
        assert_eq!(decode(&encode(&record())[..RECORD_BYTES - 1]), Ok(Decoded::Torn));
        assert_eq!(
            decode(b"not a journal at all, just some text here......"),
            Err(DecodeError::NotAJournal)
        );
        // A valid CRC over an unknown version or state.
        for (at, value, expected) in
            [(8, 2u32, DecodeError::UnsupportedVersion(2)), (12, 9u32, DecodeError::BadState(9))]
        {
            let mut block = encode(&record()).to_vec();
            block[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let crc = crc32c::crc32c(&block[..40]);
            block[40..44].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(decode(&block), Err(expected));
        }
    }

    #[test]
    fn records_that_no_atomic_write_could_have_made_are_refused() {
        let image = IMAGE_BYTES;
        // (offset, length, acceptable)
        let cases = [
            (0, 512, true),
            (image - u64::from(FILE_ATOMIC_WRITE_BYTES_MAX), FILE_ATOMIC_WRITE_BYTES_MAX, true),
            (0, 0, false),
            (0, FILE_ATOMIC_WRITE_BYTES_MAX + 512, false),
            (1, 512, false),
            (0, 100, false),
            (image - 512, 1024, false),
            (u64::MAX - 511, 512, false),
        ];
        for (offset_bytes, length_bytes, ok) in cases {
            let r = Record { offset_bytes, length_bytes, ..record() };
            assert_eq!(check_record(&r, image).is_ok(), ok, "{offset_bytes} {length_bytes}");
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn image_path(dir: &Path) -> PathBuf {
        dir.join("lun.img")
    }

    fn options() -> OpenOptions {
        OpenOptions { create_size_bytes: Some(IMAGE_BYTES), ..OpenOptions::default() }
    }

    /// Opens the image with its journal, as tandem-iscsi does.
    async fn open(dir: &Path) -> (StoreDevice, Recovery) {
        let store = BackingStore::open(&image_path(dir), &options()).unwrap();
        let (journal, recovery) = AtomicJournal::open(&store, &options()).await.unwrap();
        (StoreDevice::new(store).with_journal(journal), recovery)
    }

    async fn region(device: &StoreDevice) -> Vec<u8> {
        let length = u32::try_from(LENGTH).unwrap();
        device.read(OFFSET_BYTES, length).await.unwrap().to_vec()
    }

    /// A new image whose test range holds OLD.
    fn prepare(dir: &Path) {
        runtime().block_on(async {
            let (device, recovery) = open(dir).await;
            assert_eq!(recovery, Recovery::Clean);
            device.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
        });
    }

    /// Runs `crash_child` in a child process that dies at `point` in an atomic write of NEW.
    fn crash_at(dir: &Path, point: &str) {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["driver::atomic_journal::tests::crash_child", "--exact", "--nocapture"])
            .env("TANDEM_ATOMIC_CRASH_DIR", dir)
            .env("TANDEM_ATOMIC_CRASH_POINT", point)
            .status()
            .unwrap();
        assert!(!status.success(), "the child was meant to die at {point}");
    }

    /// Not a test of its own: the child process of the crash tests (does nothing otherwise).
    #[test]
    fn crash_child() {
        let (Some(dir), Some(point)) = (
            std::env::var_os("TANDEM_ATOMIC_CRASH_DIR"),
            std::env::var("TANDEM_ATOMIC_CRASH_POINT").ok(),
        ) else {
            return;
        };
        let point = match point.as_str() {
            "torn-in-place" => CrashPoint::TornInPlace,
            "in-place" => CrashPoint::InPlace,
            other => panic!("unknown crash point {other}"),
        };
        runtime().block_on(async {
            let store = BackingStore::open(&image_path(Path::new(&dir)), &options()).unwrap();
            let (mut journal, _) = AtomicJournal::open(&store, &options()).await.unwrap();
            journal.set_crash_point(point);
            let device = StoreDevice::new(store).with_journal(journal);
            let _ = device.write_atomic(OFFSET_BYTES, Bytes::from(vec![NEW; LENGTH]), false).await;
        });
        unreachable!("the atomic write returned instead of crashing at {point:?}");
    }

    fn is_all(data: &[u8], value: u8) -> bool {
        data.iter().all(|&b| b == value)
    }

    #[test]
    fn a_crash_after_the_journal_write_with_a_torn_in_place_write_is_replayed_whole() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        crash_at(dir.path(), "torn-in-place");
        let rt = runtime();
        // Without the journal the range is a mix: the crash really tore the write.
        let raw = std::fs::read(image_path(dir.path())).unwrap();
        let start = usize::try_from(OFFSET_BYTES).unwrap();
        let torn = &raw[start..start + LENGTH];
        assert!(torn.contains(&NEW) && torn.contains(&OLD), "the crash did not tear the write");
        rt.block_on(async {
            let (device, recovery) = open(dir.path()).await;
            assert!(matches!(recovery, Recovery::Replayed { sequence: 1, .. }), "{recovery}");
            assert!(is_all(&region(&device).await, NEW));
        });
        // Replayed once and marked applied: the next open has nothing to do.
        rt.block_on(async {
            let (device, recovery) = open(dir.path()).await;
            assert_eq!(recovery, Recovery::Clean);
            assert!(is_all(&region(&device).await, NEW));
        });
    }

    #[test]
    fn a_crash_after_the_in_place_write_is_replayed_and_replay_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        crash_at(dir.path(), "in-place");
        let journal = journal_path(&image_path(dir.path()));
        let pending = std::fs::read(&journal).unwrap();
        let rt = runtime();
        for round in 0..2 {
            rt.block_on(async {
                let (device, recovery) = open(dir.path()).await;
                assert!(matches!(recovery, Recovery::Replayed { .. }), "round {round}: {recovery}");
                assert!(is_all(&region(&device).await, NEW), "round {round}");
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
            // Put the old data back and damage the journal: as if step 1 had been torn (and
            // step 2 therefore never started).
            let rt = runtime();
            rt.block_on(async {
                let store = BackingStore::open(&image_path(dir.path()), &options()).unwrap();
                store.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
            });
            let journal = journal_path(&image_path(dir.path()));
            let mut bytes = std::fs::read(&journal).unwrap();
            bytes[corrupt_at] ^= 0x40;
            std::fs::write(&journal, &bytes).unwrap();
            rt.block_on(async {
                let (device, recovery) = open(dir.path()).await;
                assert_eq!(recovery, Recovery::DiscardedTorn { what }, "{what}");
                assert!(is_all(&region(&device).await, OLD), "{what}");
            });
            rt.block_on(async {
                assert_eq!(open(dir.path()).await.1, Recovery::Clean, "{what}: cleared");
            });
        }
    }

    #[test]
    fn a_plain_write_after_an_atomic_write_is_not_reverted_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let (device, _) = open(dir.path()).await;
            device.write_atomic(OFFSET_BYTES, Bytes::from(vec![NEW; LENGTH]), false).await.unwrap();
            device.write(OFFSET_BYTES, Bytes::from(vec![OLD; LENGTH]), true).await.unwrap();
        });
        rt.block_on(async {
            let (device, recovery) = open(dir.path()).await;
            assert_eq!(recovery, Recovery::Clean);
            assert!(is_all(&region(&device).await, OLD));
        });
    }

    #[test]
    fn a_failed_atomic_write_fences_writes_until_a_restart_replays_it() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        let rt = runtime();
        rt.block_on(async {
            // The image refuses writes (read-only handle), the journal takes them: step 2 fails.
            let read_only = OpenOptions { read_only: true, ..options() };
            let store = BackingStore::open(&image_path(dir.path()), &read_only).unwrap();
            let (journal, _) = AtomicJournal::open(&store, &options()).await.unwrap();
            let device = StoreDevice::new(store).with_journal(journal);
            let new = Bytes::from(vec![NEW; LENGTH]);
            assert!(device.write_atomic(OFFSET_BYTES, new.clone(), false).await.is_err());
            for error in [
                device.write_atomic(OFFSET_BYTES, new.clone(), false).await,
                device.write(OFFSET_BYTES, new.clone(), false).await,
                device.write_zeroes(OFFSET_BYTES, 512).await,
                device.unmap(OFFSET_BYTES, 512).await,
            ] {
                let error = error.expect_err("fenced").to_string();
                assert!(error.contains("until a restart replays it"), "{error}");
            }
        });
        rt.block_on(async {
            let (device, recovery) = open(dir.path()).await;
            assert!(matches!(recovery, Recovery::Replayed { .. }), "{recovery}");
            assert!(is_all(&region(&device).await, NEW));
            device.write(OFFSET_BYTES, Bytes::from(vec![OLD; 512]), false).await.unwrap();
        });
    }

    #[test]
    fn bad_journal_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal_path(&image_path(dir.path()));
        let rt = runtime();
        let open_error = || {
            rt.block_on(async {
                let store = BackingStore::open(&image_path(dir.path()), &options()).unwrap();
                AtomicJournal::open(&store, &options()).await.err().expect("an error").to_string()
            })
        };
        std::fs::write(&journal, b"short").unwrap();
        assert!(open_error().contains("bytes, an atomic-write journal has"));
        let mut foreign = vec![0u8; usize::try_from(JOURNAL_BYTES).unwrap()];
        foreign[..5].copy_from_slice(b"hello");
        std::fs::write(&journal, &foreign).unwrap();
        assert!(open_error().contains("not an atomic-write journal"));
        // A valid record that points past the end of the image.
        let r = Record { offset_bytes: IMAGE_BYTES, length_bytes: 512, ..record() };
        let mut beyond = foreign;
        beyond[..HEADER_BYTES].copy_from_slice(&encode(&r));
        std::fs::write(&journal, &beyond).unwrap();
        assert!(open_error().contains("cannot be applied"));
    }

    #[test]
    fn the_file_device_advertises_the_journal_size_and_the_default_stays_one_page() {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let (device, _) = open(dir.path()).await;
            assert_eq!(device.atomic_write_max_bytes(), FILE_ATOMIC_WRITE_BYTES_MAX);
            assert_eq!(device.atomic_write_alignment_bytes(), 512);
            let plain = StoreDevice::new(device.store().clone());
            assert_eq!(plain.atomic_write_max_bytes(), 4096);
        });
    }

    #[test]
    fn concurrent_readers_never_see_an_atomic_write_half_done() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        rt.block_on(async {
            let (device, _) = open(dir.path()).await;
            let device = Arc::new(device);
            let lock = Arc::new(tokio::sync::RwLock::new(()));
            let length = u32::try_from(LENGTH).unwrap();
            perform_locked(
                &lock,
                &*device,
                IoOp::Write {
                    offset_bytes: OFFSET_BYTES,
                    data: Bytes::from(vec![0u8; LENGTH]),
                    fua: false,
                },
            )
            .await
            .unwrap();
            let writer = {
                let (device, lock) = (device.clone(), lock.clone());
                tokio::spawn(async move {
                    for round in 1..=40u8 {
                        let op = IoOp::AtomicWrite {
                            offset_bytes: OFFSET_BYTES,
                            data: Bytes::from(vec![round; LENGTH]),
                            fua: false,
                        };
                        perform_locked(&lock, &*device, op).await.unwrap();
                    }
                })
            };
            let mut readers = Vec::new();
            for _ in 0..3 {
                let (device, lock) = (device.clone(), lock.clone());
                readers.push(tokio::spawn(async move {
                    let mut reads = 0;
                    loop {
                        let op = IoOp::Read { offset_bytes: OFFSET_BYTES, length_bytes: length };
                        let Ok(IoData::Read(data)) = perform_locked(&lock, &*device, op).await
                        else {
                            panic!("read failed");
                        };
                        assert!(is_all(&data, data[0]), "a read saw a mix after {reads} reads");
                        reads += 1;
                        if data[0] == 40 {
                            return reads;
                        }
                    }
                }));
            }
            writer.await.unwrap();
            for reader in readers {
                assert!(reader.await.unwrap() >= 1);
            }
        });
    }

    /// Latency of a 128 KiB WRITE ATOMIC against plain 128 KiB writes, at the device boundary
    /// (the iSCSI path in front is the same for both). Prints medians and 99th percentiles.
    #[test]
    fn atomic_write_latency() {
        if std::env::var("TANDEM_SLOW_TESTS").as_deref() != Ok("1") {
            eprintln!("skipped: set TANDEM_SLOW_TESTS=1");
            return;
        }
        const ROUNDS: usize = 300;
        let dir = tempfile::tempdir_in(std::env::var_os("TANDEM_BENCH_DIR").unwrap_or(".".into()))
            .unwrap();
        runtime().block_on(async {
            let (device, _) = open(dir.path()).await;
            let data = Bytes::from(vec![NEW; LENGTH]);
            for (what, kind) in [("WRITE", 0), ("WRITE FUA", 1), ("WRITE ATOMIC", 2)] {
                let mut samples_us = Vec::with_capacity(ROUNDS);
                for round in 0..ROUNDS {
                    // Different offsets, so the page cache does not absorb rewrites of one range.
                    let offset = (round as u64 % 7) * LENGTH as u64;
                    let start = std::time::Instant::now();
                    match kind {
                        0 => device.write(offset, data.clone(), false).await.unwrap(),
                        1 => device.write(offset, data.clone(), true).await.unwrap(),
                        _ => device.write_atomic(offset, data.clone(), false).await.unwrap(),
                    }
                    samples_us.push(start.elapsed().as_micros());
                }
                samples_us.sort_unstable();
                eprintln!(
                    "{what} 128 KiB: median {} us, p99 {} us ({ROUNDS} writes)",
                    samples_us[ROUNDS / 2],
                    samples_us[ROUNDS * 99 / 100]
                );
            }
        });
    }
}
