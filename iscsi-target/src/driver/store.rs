//! [`BlockDevice`] over a backing-store file: what the standalone binary serves.

use bytes::{Bytes, BytesMut};

use backing_store::atomic_journal::{AtomicJournal, JournalError, Recovery, journal_path};
use backing_store::constants::IO_SIZE_BYTES_MAX;
use backing_store::{BackingStore, ErrorKind, OpenOptions};

use crate::constants::FILE_ATOMIC_WRITE_BYTES_MAX;
use crate::device::{BlockDevice, DeviceError, MappedRange};

#[cfg(test)]
mod journal_tests;

// The file LUN's journal is backing-store's, with a slot of the LUN's atomic-write maximum.
const _: () = assert!(
    FILE_ATOMIC_WRITE_BYTES_MAX <= backing_store::atomic_journal::SLOT_BYTES_MAX
        && FILE_ATOMIC_WRITE_BYTES_MAX.is_multiple_of(512)
);

/// A backing file served as a LUN with 512-byte blocks.
pub struct StoreDevice {
    store: BackingStore,
    /// Serves reads when set: a second handle on the same file with another engine (both
    /// buffered, so they share the page cache and see each other's writes at once).
    reader: Option<BackingStore>,
    size_bytes: u64,
    /// Makes atomic writes whole across a crash up to `FILE_ATOMIC_WRITE_BYTES_MAX`; without it
    /// the device keeps the one-page default.
    journal: Option<AtomicJournal>,
}

impl StoreDevice {
    pub fn new(store: BackingStore) -> Self {
        // The LUN ends at the last whole block.
        let size_bytes = store.size_bytes() / 512 * 512;
        Self { store, reader: None, size_bytes, journal: None }
    }

    /// Reads go to `reader`, everything else to `store`.
    pub fn with_reader(store: BackingStore, reader: BackingStore) -> Self {
        assert_eq!(store.size_bytes(), reader.size_bytes(), "both handles open the same file");
        Self { reader: Some(reader), ..Self::new(store) }
    }

    /// Journals atomic writes through `journal` (opened, and recovered, on this device's
    /// image by [`AtomicJournal::open`] before any I/O).
    pub fn with_journal(self, journal: AtomicJournal) -> Self {
        Self { journal: Some(journal), ..self }
    }

    /// Opens (creating it if missing) the journal `IMAGE.atomic-journal` of this device's
    /// image, with one slot of [`FILE_ATOMIC_WRITE_BYTES_MAX`], finishes or discards the
    /// atomic write a crash interrupted, and journals atomic writes through it. Must run
    /// before the device serves any I/O. `options` are the image's (engine, O_DIRECT).
    pub async fn open_journal(
        self,
        options: &OpenOptions,
    ) -> Result<(Self, Recovery), JournalError> {
        let path = journal_path(self.store.path());
        // A pending record must lie within the LUN (the image's whole blocks) to be replayed.
        let (journal, recovery) = AtomicJournal::open(
            &path,
            &self.store,
            self.size_bytes,
            FILE_ATOMIC_WRITE_BYTES_MAX,
            options,
        )
        .await?;
        Ok((self.with_journal(journal), recovery))
    }

    /// Refuses writes after an atomic write failed half way (see `AtomicJournal::write`).
    fn check_not_fenced(&self) -> Result<(), DeviceError> {
        match &self.journal {
            Some(journal) => journal.check_not_fenced().map_err(convert_journal),
            None => Ok(()),
        }
    }

    /// The backing store writes go to.
    pub fn store(&self) -> &BackingStore {
        &self.store
    }
}

fn convert_journal(error: JournalError) -> DeviceError {
    match error {
        JournalError::Io { source, .. } => convert(source),
        other => DeviceError::Io(other.to_string()),
    }
}

fn convert(error: backing_store::Error) -> DeviceError {
    match error.kind() {
        ErrorKind::OutOfRange => DeviceError::OutOfRange,
        ErrorKind::NoSpace => DeviceError::NoSpace,
        _ => DeviceError::Io(error.to_string()),
    }
}

impl BlockDevice for StoreDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn atomic_write_max_bytes(&self) -> u32 {
        match self.journal {
            Some(_) => FILE_ATOMIC_WRITE_BYTES_MAX,
            None => crate::constants::PAGE_ATOMIC_WRITE_BYTES,
        }
    }

    fn atomic_write_alignment_bytes(&self) -> u32 {
        match self.journal {
            // The journal keeps any run of whole blocks whole.
            Some(_) => self.block_size_bytes(),
            None => crate::constants::PAGE_ATOMIC_WRITE_BYTES,
        }
    }

    async fn write_atomic(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), DeviceError> {
        match &self.journal {
            // Journaled writes are durable when they complete, FUA or not.
            Some(journal) => {
                journal.write(&self.store, offset_bytes, data).await.map_err(convert_journal)
            }
            None => self.write(offset_bytes, data, fua).await,
        }
    }

    async fn read(&self, offset_bytes: u64, length_bytes: u32) -> Result<Bytes, DeviceError> {
        let length = usize::try_from(length_bytes).map_err(|_| DeviceError::OutOfRange)?;
        let store = self.reader.as_ref().unwrap_or(&self.store);
        if length <= IO_SIZE_BYTES_MAX {
            return store.read(offset_bytes, length).await.map_err(convert);
        }
        // The store bounds one request; larger SCSI transfers are split.
        let mut out = BytesMut::with_capacity(length);
        while out.len() < length {
            let chunk = (length - out.len()).min(IO_SIZE_BYTES_MAX);
            let data = store.read(offset_bytes + out.len() as u64, chunk).await.map_err(convert)?;
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset_bytes: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.check_not_fenced()?;
        if data.len() <= IO_SIZE_BYTES_MAX {
            return self.store.write(offset_bytes, data, fua).await.map_err(convert);
        }
        let mut done = 0usize;
        while done < data.len() {
            let chunk = (data.len() - done).min(IO_SIZE_BYTES_MAX);
            self.store
                .write(offset_bytes + done as u64, data.slice(done..done + chunk), fua)
                .await
                .map_err(convert)?;
            done += chunk;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.store.flush().await.map_err(convert)
    }

    async fn unmap(&self, offset_bytes: u64, length_bytes: u64) -> Result<(), DeviceError> {
        self.check_not_fenced()?;
        self.store.discard(offset_bytes, length_bytes).await.map_err(convert)
    }

    async fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64) -> Result<(), DeviceError> {
        self.check_not_fenced()?;
        self.store.write_zeroes(offset_bytes, length_bytes).await.map_err(convert)
    }

    async fn mapped_ranges(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<Vec<MappedRange>, DeviceError> {
        let ranges = self.store.mapped_ranges(offset_bytes, length_bytes).map_err(convert)?;
        Ok(ranges
            .into_iter()
            .map(|(offset_bytes, length_bytes, mapped)| MappedRange {
                offset_bytes,
                length_bytes,
                mapped,
            })
            .collect())
    }
}
