//! The io_uring engine: rings driven by dedicated threads.
//!
//! Callers push requests onto a queue. A ring thread with nothing in flight parks on a condition
//! variable, so a request arriving at an idle ring costs one futex wake, like the thread pool.
//! With I/O in flight it waits in `io_uring_enter`, and an eventfd whose read is always armed
//! on the ring wakes it for new work; the eventfd is written only when the ring thread
//! announced it is going to sleep there, so a busy ring costs submitters no system call. Every buffer belongs to its in-flight
//! slot until the kernel posts the completion (tokio-uring's ownership rule); if the thread
//! dies with I/O in flight, the buffers are leaked rather than freed under the kernel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};

use crate::buffer::AlignedBuffer;
use crate::constants::{
    IN_FLIGHT_MAX, URING_ENTRIES_MAX, URING_HELPER_THREADS_MAX, URING_RINGS_MAX,
};
use crate::error::{Error, ErrorKind};
use crate::file::{BackingFile, WriteData, ZeroingKind, is_fallocate_unsupported, u64_from};
use crate::options::EngineKind;
use crate::request::{Completion, Operation, Output, Request};

use super::Engine;
use super::sync::SyncEngine;

/// user_data of the eventfd read; slot indexes are far below it.
const EVENTFD_USER_DATA: u64 = u64::MAX;

#[derive(Debug)]
struct Shared {
    file: Arc<BackingFile>,
    /// Requests prepared by the submitting thread (buffers allocated, data copied), waiting
    /// for the ring thread.
    queue: Mutex<RingQueue>,
    /// Signalled when a request arrives for a parked ring thread (or at shutdown).
    arrived: Condvar,
    /// Set by the ring thread just before it may block in io_uring_enter.
    sleeping: AtomicBool,
    /// Set on drop: the ring thread finishes everything in flight, then exits.
    closing: AtomicBool,
    eventfd: OwnedFd,
    /// Runs what the ring does not: resize, and zeroing when fallocate is refused. Shared by
    /// all rings of the engine.
    helper: Arc<SyncEngine>,
}

#[derive(Debug, Default)]
struct RingQueue {
    slots: VecDeque<Slot>,
    /// The ring thread waits on `arrived` (nothing in flight).
    parked: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RingQueue> {
        // Push and drain are single calls, so a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self) {
        let value: u64 = 1;
        // SAFETY: writes 8 bytes from a valid local u64 to an eventfd we own. A failure
        // (counter saturated) still leaves the eventfd readable, which is all a wake needs.
        let _ =
            unsafe { libc::write(self.eventfd.as_raw_fd(), std::ptr::from_ref(&value).cast(), 8) };
    }
}

/// The engine: `URING_RINGS_MAX` rings, each on its own thread; requests go round-robin.
/// More than one ring lets completions be processed on more than one core and keeps the engine
/// from starving when the CPU is contended (one thread gets one thread's share).
#[derive(Debug)]
pub(crate) struct UringEngine {
    // Declared first: the rings are joined before the helper they forward to is dropped.
    rings: Vec<Ring>,
    next_ring: AtomicUsize,
}

/// One ring and the thread driving it.
#[derive(Debug)]
struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Sets up the rings; fails (and the caller falls back to the sync engine) when the kernel
    /// refuses io_uring or lacks what this engine needs.
    pub(crate) fn new(file: Arc<BackingFile>) -> io::Result<UringEngine> {
        let helper = Arc::new(SyncEngine::new(Arc::clone(&file), URING_HELPER_THREADS_MAX)?);
        let mut rings = Vec::with_capacity(URING_RINGS_MAX);
        for index in 0..URING_RINGS_MAX {
            // On failure, the rings already started are dropped (joined) here.
            rings.push(Ring::start(Arc::clone(&file), Arc::clone(&helper), index)?);
        }
        Ok(UringEngine { rings, next_ring: AtomicUsize::new(0) })
    }
}

impl Ring {
    fn start(file: Arc<BackingFile>, helper: Arc<SyncEngine>, index: usize) -> io::Result<Ring> {
        // SAFETY: eventfd takes no pointers.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            file,
            queue: Mutex::new(RingQueue {
                slots: VecDeque::with_capacity(IN_FLIGHT_MAX),
                parked: false,
            }),
            arrived: Condvar::new(),
            sleeping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            eventfd,
            helper,
        });
        // The ring is built on its own thread: with IORING_SETUP_SINGLE_ISSUER the creating
        // thread is the only one allowed to submit.
        let (ready_sender, ready_receiver) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name(format!("backing-uring-{index}")).spawn(
            move || {
                let ring = match build_ring() {
                    Ok(ring) => ring,
                    Err(error) => {
                        let _ = ready_sender.send(Err(error));
                        return;
                    }
                };
                let _ = ready_sender.send(Ok(()));
                let ring_thread = RingThread {
                    ring,
                    slots: Vec::with_capacity(IN_FLIGHT_MAX),
                    free_slots: Vec::with_capacity(IN_FLIGHT_MAX),
                    in_flight: 0,
                    eventfd_buffer: Box::new(0),
                    eventfd_armed: false,
                    eventfd_kicked: false,
                    shared: thread_shared,
                };
                ring_thread.run();
            },
        )?;
        let ready = ready_receiver
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the io_uring thread exited during setup")));
        match ready {
            Ok(()) => Ok(Ring { shared, thread: Some(thread) }),
            Err(error) => {
                let _ = thread.join();
                Err(error)
            }
        }
    }

    fn submit(&self, request: Request) {
        // Allocation and copying happen here, on the caller's thread, so the ring thread only
        // moves SQEs and CQEs: with 1 MiB requests the preparation (page faults of fresh
        // buffers, copies) would otherwise serialize on the ring thread.
        let slot = match prepare(&self.shared.file, request) {
            Ok(slot) => slot,
            Err(request) => {
                self.shared.helper.submit(request);
                return;
            }
        };
        let parked = {
            let mut queue = self.shared.lock();
            queue.slots.push_back(slot);
            queue.parked
        };
        if parked {
            self.shared.arrived.notify_one();
        } else if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            // Pairs with the ring thread's store(true) + queue check: either it sees this
            // request in the queue, or this swap sees its announcement and wakes it.
            self.shared.wake();
        }
    }
}

/// Builds the ring with the flags that cut completion overhead for a ring driven by one
/// thread (completions run only when that thread enters the kernel), falling back to a plain
/// ring on kernels without them (before 6.1). Checks that every opcode used is supported.
fn build_ring() -> io::Result<IoUring> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(URING_ENTRIES_MAX)
        .or_else(|_| IoUring::builder().build(URING_ENTRIES_MAX))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in
        [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE, opcode::Fallocate::CODE]
    {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} is not supported by this kernel"),
            ));
        }
    }
    Ok(ring)
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn submit(&self, request: Request) {
        let index = self.next_ring.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        self.rings[index].submit(request);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // Taking the lock orders the store before a parked thread's re-check.
        drop(self.shared.lock());
        self.shared.arrived.notify_all();
        self.shared.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("an io_uring thread panicked; its buffers in flight were leaked");
        }
        // Requests the thread never took (only possible after a panic) fail as EngineStopped
        // when their Completions drop with the queue.
    }
}

/// Turns a request into what the ring runs, or hands it back for the helper (resize, gathered
/// writes).
fn prepare(file: &BackingFile, request: Request) -> Result<Slot, Request> {
    let Request { operation, completion } = request;
    let operation = match operation {
        Operation::Read { offset, len } => {
            let (target, buffer) = file.prepare_read(offset, len);
            SlotOperation::Read { fd: target.as_raw_fd(), buffer, offset, done: 0 }
        }
        Operation::Write { offset, data, fua } => {
            let (target, data) = file.prepare_write(offset, data);
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            SlotOperation::Write { fd: target.as_raw_fd(), data, offset, done: 0, flags }
        }
        Operation::Flush => SlotOperation::Flush { fd: file.buffered_fd() },
        Operation::Discard { offset, len } => {
            SlotOperation::Zero { fd: file.buffered_fd(), kind: ZeroingKind::Discard, offset, len }
        }
        Operation::WriteZeroes { offset, len } => SlotOperation::Zero {
            fd: file.buffered_fd(),
            kind: ZeroingKind::WriteZeroes,
            offset,
            len,
        },
        // Gathered writes are small page-cache writes the inline path normally takes; the
        // helper runs the rest as one pwritev rather than the ring needing a vectored slot.
        operation @ (Operation::Resize { .. } | Operation::WriteGathered { .. }) => {
            return Err(Request { operation, completion });
        }
    };
    Ok(Slot { operation, completion })
}

/// What an in-flight slot holds until its completion arrives.
#[derive(Debug)]
enum SlotOperation {
    Read { fd: RawFd, buffer: AlignedBuffer, offset: u64, done: usize },
    Write { fd: RawFd, data: WriteData, offset: u64, done: usize, flags: i32 },
    Flush { fd: RawFd },
    Zero { fd: RawFd, kind: ZeroingKind, offset: u64, len: u64 },
}

#[derive(Debug)]
struct Slot {
    operation: SlotOperation,
    completion: Completion,
}

struct RingThread {
    // Declared first so it is dropped (closed) before the buffers below.
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    in_flight: usize,
    eventfd_buffer: Box<u64>,
    eventfd_armed: bool,
    /// The ring thread wrote the eventfd itself to retire its armed read at shutdown.
    eventfd_kicked: bool,
    shared: Arc<Shared>,
}

impl Drop for RingThread {
    fn drop(&mut self) {
        if self.in_flight > 0 || self.eventfd_armed {
            // Only after a panic: the kernel may still write into these buffers after the ring
            // is closed, so they are leaked, never freed. Their callers still get an answer.
            for slot in std::mem::take(&mut self.slots).into_iter().flatten() {
                let Slot { operation, completion } = slot;
                std::mem::forget(operation);
                completion.complete(Err(Error::new(
                    ErrorKind::EngineStopped,
                    "the io_uring thread stopped with this request in flight",
                )));
            }
            std::mem::forget(std::mem::replace(&mut self.eventfd_buffer, Box::new(0)));
        }
    }
}

impl RingThread {
    fn run(mut self) {
        let mut incoming = VecDeque::with_capacity(IN_FLIGHT_MAX);
        let mut completed = Vec::with_capacity(URING_ENTRIES_MAX as usize);
        self.arm_eventfd();
        loop {
            std::mem::swap(&mut self.shared.lock().slots, &mut incoming);
            for slot in incoming.drain(..) {
                self.start(slot);
            }
            let closing = self.shared.closing.load(Ordering::SeqCst);
            if self.in_flight == 0 && !closing {
                // Nothing for the kernel to finish: park until a request (or shutdown) comes.
                let mut queue = self.shared.lock();
                queue.parked = true;
                while queue.slots.is_empty() && !self.shared.closing.load(Ordering::SeqCst) {
                    queue = self
                        .shared
                        .arrived
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                queue.parked = false;
                continue;
            }
            if closing && self.in_flight == 0 {
                if !self.eventfd_armed {
                    break;
                }
                if !self.eventfd_kicked {
                    self.eventfd_kicked = true;
                    self.shared.wake();
                }
            }
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let want = if self.shared.lock().slots.is_empty() {
                1
            } else {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                0
            };
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                // Interrupted, or completions must be reaped first: both retried after reaping.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(error) => panic!("io_uring_enter failed: {error}"),
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            completed.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
            for (user_data, result) in completed.drain(..) {
                self.handle_completion(user_data, result);
            }
        }
    }

    fn arm_eventfd(&mut self) {
        assert!(!self.eventfd_armed);
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            std::ptr::from_mut(&mut *self.eventfd_buffer).cast(),
            8,
        )
        .build()
        .user_data(EVENTFD_USER_DATA);
        self.push(&entry);
        self.eventfd_armed = true;
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every entry points at memory owned by an in-flight slot (or the eventfd
            // buffer), which stays alive and unmoved until its completion has been reaped.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return;
            }
            // The queue is sized for every admitted request, so this is unexpected; submitting
            // makes room either way.
            if let Err(error) = self.ring.submit()
                && !matches!(error.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN))
            {
                panic!("io_uring submit failed: {error}");
            }
        }
    }

    fn start(&mut self, slot: Slot) {
        let index = match self.free_slots.pop() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        assert!(self.slots[index].is_none());
        self.slots[index] = Some(slot);
        self.in_flight += 1;
        assert!(self.in_flight <= IN_FLIGHT_MAX, "more requests in flight than admitted");
        self.submit_slot(index);
    }

    fn submit_slot(&mut self, index: usize) {
        let Some(slot) = self.slots[index].as_mut() else {
            panic!("submitting empty slot {index}");
        };
        let entry = match &mut slot.operation {
            SlotOperation::Read { fd, buffer, offset, done } => {
                assert!(*done < buffer.len());
                let remaining = buffer.len() - *done;
                // SAFETY: done < len <= allocation size, so the pointer stays inside the buffer.
                let pointer = unsafe { buffer.as_mut_ptr().add(*done) };
                opcode::Read::new(types::Fd(*fd), pointer, length_u32(remaining))
                    .offset(*offset + u64_from(*done))
                    .build()
            }
            SlotOperation::Write { fd, data, offset, done, flags } => {
                let remaining = &data.as_slice()[*done..];
                assert!(!remaining.is_empty());
                opcode::Write::new(types::Fd(*fd), remaining.as_ptr(), length_u32(remaining.len()))
                    .offset(*offset + u64_from(*done))
                    .rw_flags(*flags)
                    .build()
            }
            SlotOperation::Flush { fd } => {
                opcode::Fsync::new(types::Fd(*fd)).flags(types::FsyncFlags::DATASYNC).build()
            }
            SlotOperation::Zero { fd, kind, offset, len } => {
                opcode::Fallocate::new(types::Fd(*fd), *len)
                    .offset(*offset)
                    .mode(kind.fallocate_modes()[0])
                    .build()
            }
        };
        self.push(&entry.user_data(u64_from(index)));
    }

    fn handle_completion(&mut self, user_data: u64, result: i32) {
        if user_data == EVENTFD_USER_DATA {
            self.eventfd_armed = false;
            if !self.shared.closing.load(Ordering::SeqCst) {
                self.arm_eventfd();
            }
            return;
        }
        let index = usize::try_from(user_data).unwrap_or(usize::MAX);
        let slot = self.slots.get_mut(index).and_then(Option::as_mut);
        let Some(slot) = slot else {
            panic!("completion for unknown slot {user_data}");
        };
        let retry = result == -libc::EAGAIN || result == -libc::EINTR;
        let file = &self.shared.file;
        let finished = match &mut slot.operation {
            SlotOperation::Read { buffer, offset, done, .. } => {
                let len = buffer.len();
                match advance(done, len, result, retry) {
                    Progress::Again => false,
                    Progress::Complete => true,
                    Progress::Failed(message) => {
                        let error = error_for(file, "read", *offset, len, result, message);
                        return self.finish(index, Err(error));
                    }
                }
            }
            SlotOperation::Write { data, offset, done, .. } => {
                let len = data.as_slice().len();
                match advance(done, len, result, retry) {
                    Progress::Again => false,
                    Progress::Complete => true,
                    Progress::Failed(message) => {
                        let error = error_for(file, "write", *offset, len, result, message);
                        return self.finish(index, Err(error));
                    }
                }
            }
            SlotOperation::Flush { .. } if retry => false,
            SlotOperation::Flush { .. } if result < 0 => {
                let message = format!("fdatasync of {}", file.path().display());
                return self.finish(index, Err(Error::from_cqe(message, result)));
            }
            SlotOperation::Flush { .. } => true,
            SlotOperation::Zero { .. } if retry => false,
            SlotOperation::Zero { kind, offset, len, .. } if result < 0 => {
                let (kind, offset, len) = (*kind, *offset, *len);
                if is_fallocate_unsupported(-result) {
                    // The helper walks the whole fallback chain (other fallocate mode, then
                    // writing zeroes) off the ring.
                    let Some(slot) = self.take_slot(index) else { return };
                    let operation = kind.operation(offset, len);
                    self.shared.helper.submit(Request { operation, completion: slot.completion });
                    return;
                }
                let operation = kind.operation(offset, len);
                let message = file.error_message(operation.name(), offset, len);
                return self.finish(index, Err(Error::from_cqe(message, result)));
            }
            SlotOperation::Zero { .. } => true,
        };
        if finished {
            self.finish(index, Ok(()));
        } else {
            self.submit_slot(index);
        }
    }

    fn take_slot(&mut self, index: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(index)?.take()?;
        self.free_slots.push(index);
        assert!(self.in_flight > 0);
        self.in_flight -= 1;
        Some(slot)
    }

    fn finish(&mut self, index: usize, result: Result<(), Error>) {
        let Some(Slot { operation, completion }) = self.take_slot(index) else {
            panic!("finishing empty slot {index}");
        };
        let result = result.map(|()| match operation {
            SlotOperation::Read { buffer, .. } => Output::Data(Bytes::from_owner(buffer)),
            _ => Output::Done,
        });
        completion.complete(result);
    }
}

enum Progress {
    Again,
    Complete,
    Failed(Option<&'static str>),
}

/// Accounts a read/write completion: short transfers are resubmitted for the rest.
fn advance(done: &mut usize, len: usize, result: i32, retry: bool) -> Progress {
    if retry {
        return Progress::Again;
    }
    if result < 0 {
        return Progress::Failed(None);
    }
    if result == 0 {
        return Progress::Failed(Some("unexpected end of file"));
    }
    let count = usize::try_from(result).unwrap_or(0);
    assert!(*done + count <= len, "the kernel transferred more than asked");
    *done += count;
    if *done == len { Progress::Complete } else { Progress::Again }
}

fn error_for(
    file: &BackingFile,
    operation: &str,
    offset: u64,
    len: usize,
    result: i32,
    message: Option<&'static str>,
) -> Error {
    let context = file.error_message(operation, offset, u64_from(len));
    match message {
        Some(message) => Error::new(ErrorKind::Io, format!("{context}: {message}")),
        None => Error::from_cqe(context, result),
    }
}

fn length_u32(len: usize) -> u32 {
    // Reads and writes are capped at IO_SIZE_BYTES_MAX, which fits (asserted in constants).
    match u32::try_from(len) {
        Ok(len) => len,
        Err(_) => panic!("I/O of {len} bytes exceeds an SQE's length field"),
    }
}
