//! The tokio driver: accepts connections on portals, runs one task per connection around the
//! pure [`Connection`], performs block I/O and writes the encoded PDUs. Nothing here decides
//! anything about the protocol.

pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, RwLock, mpsc};

use crate::connection::{Config, Connection, Event, ForwardTicket, LuStep, LuTask};
use crate::constants::{
    BHS_BYTES, CHAP_CHALLENGE_BYTES, KEEPALIVE_INTERVAL_MS, TRANSMIT_BATCH_BYTES_MAX,
};
use crate::device::{BlockDevice, DeviceError, IoData, perform};
use crate::pdu;
use crate::remote::{ForwardError, ForwardReply, ForwardRequest};

/// Live connections by id, so a reinstated session can close the old one; and one write lock
/// per device, shared by every connection (multipath included) and by commands forwarded from
/// remote ports ([`execute_forwarded`]).
#[derive(Default)]
pub struct Registry {
    connections: Mutex<HashMap<u64, Arc<Notify>>>,
    next_id: AtomicU64,
    device_locks: Mutex<HashMap<usize, Arc<RwLock<()>>>>,
}

impl Registry {
    /// The lock of the device behind `device`. Reads and plain writes share it; exclusive ops
    /// (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC) hold it alone, which makes them atomic.
    fn device_lock<D>(&self, device: &Arc<D>) -> Arc<RwLock<()>> {
        let key = Arc::as_ptr(device) as *const () as usize;
        let mut locks = self.device_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key).or_default().clone()
    }
}

/// Serves the configured targets on already-bound listeners, one per portal, each with its
/// relative target port identifier. Runs until every listener fails.
pub async fn serve<D: BlockDevice>(
    config: Arc<Config<D>>,
    listeners: Vec<(TcpListener, u16)>,
) -> std::io::Result<()> {
    serve_with(config, listeners, Arc::new(Registry::default())).await
}

/// [`serve`] with a registry shared with [`execute_forwarded`], so commands from remote ports
/// take the same device locks as local ones.
pub async fn serve_with<D: BlockDevice>(
    config: Arc<Config<D>>,
    listeners: Vec<(TcpListener, u16)>,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    let mut accept_tasks = Vec::new();
    for (listener, relative_port) in listeners {
        let config = config.clone();
        let registry = registry.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await?;
                let id = registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                let kill = Arc::new(Notify::new());
                registry
                    .connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, kill.clone());
                let config = config.clone();
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(error) =
                        run_connection(stream, config, id, relative_port, kill, &registry).await
                    {
                        eprintln!("tandem-iscsi: connection from {peer}: {error}");
                    }
                    registry.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }));
    }
    for task in accept_tasks {
        match task.await {
            Ok(result) => result?,
            Err(error) => return Err(std::io::Error::other(error)),
        }
    }
    Ok(())
}

/// Binds every portal address; returns listeners with 1-based relative port identifiers.
pub async fn bind(portals: &[SocketAddr]) -> std::io::Result<Vec<(TcpListener, u16)>> {
    let mut out = Vec::new();
    for (i, addr) in portals.iter().enumerate() {
        let listener = TcpListener::bind(addr).await?;
        out.push((listener, u16::try_from(i + 1).unwrap_or(u16::MAX)));
    }
    Ok(out)
}

type Completion = (u32, u64, Result<IoData, DeviceError>);
/// A command's block I/O, run by its connection's task (no task of its own).
type IoFuture = Pin<Box<dyn Future<Output = Completion> + Send>>;
type ForwardCompletion = (u32, u64, Result<ForwardReply, ForwardError>);

/// Runs a request that arrived from a remote port on this process's logical unit: a command
/// as if it had arrived on a local port (same reservations, unit attentions, device lock), or
/// a notice / reset. The caller (the transport between nodes) checks who sent it.
pub async fn execute_forwarded<D: BlockDevice>(
    config: &Arc<Config<D>>,
    registry: &Registry,
    request: ForwardRequest,
) -> Result<ForwardReply, ForwardError> {
    let command = match request {
        ForwardRequest::Command(command) => command,
        notice => return config.handle_remote_notice(&notice).map(|()| ForwardReply::Done),
    };
    let (mut task, mut step) = match LuTask::start(config.clone(), command) {
        Ok(started) => started,
        Err(outcome) => return Ok(ForwardReply::Outcome(outcome)),
    };
    loop {
        match step {
            LuStep::Done(outcome) => return Ok(ForwardReply::Outcome(outcome)),
            LuStep::Io { device, op } => {
                let lock = registry.device_lock(&device);
                let result = perform_locked(&lock, &*device, op).await;
                step = task.resume(result);
            }
        }
    }
}

/// Sends each request for a remote logical unit on its way; answers come back on `answers`.
fn dispatch_forwards<D: BlockDevice>(
    connection: &mut Connection<D>,
    answers: &mpsc::UnboundedSender<ForwardCompletion>,
) {
    while let Some(ForwardTicket { itt, tag, device, request }) = connection.poll_forward() {
        let answers = answers.clone();
        tokio::spawn(async move {
            let result = device.forward(request).await;
            let _ = answers.send((itt, tag, result));
        });
    }
}

async fn run_connection<D: BlockDevice>(
    stream: TcpStream,
    config: Arc<Config<D>>,
    id: u64,
    relative_port: u16,
    kill: Arc<Notify>,
    registry: &Registry,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let local_address = stream.local_addr()?;
    let (mut reader, mut writer) = stream.into_split();
    let challenge: [u8; CHAP_CHALLENGE_BYTES] = rand::random();
    let identifier: u8 = rand::random();
    let mut connection = Connection::new(id, config, relative_port, challenge, identifier);
    connection.set_local_address(local_address);
    // The connection's block I/O runs inside this task, not in a task per command: spawning
    // one per 4 KiB write cost a task allocation, a scheduler hand-off (often a wake of the
    // other worker thread) and a channel send back per I/O.
    let mut running: FuturesUnordered<IoFuture> = FuturesUnordered::new();
    // Bounded by the tasks in flight (the CmdSN window) plus a notice per logical unit.
    let (forwards_tx, mut forwards) = mpsc::unbounded_channel::<ForwardCompletion>();
    let mut input = BytesMut::with_capacity(512 * 1024);
    let mut out = Outgoing::default();
    let mut locks: HashMap<usize, Arc<RwLock<()>>> = HashMap::new();
    // Checked on a coarse tick rather than a timer per read: reads are the hot path.
    let mut keepalive = tokio::time::interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS / 4));
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_input = Instant::now();
    // Debugging aid: one line per received PDU on stderr.
    let trace = std::env::var_os("TANDEM_ISCSI_TRACE").is_some();
    let result = loop {
        // Parse every complete PDU already buffered.
        let mut failed = false;
        loop {
            if input.len() < BHS_BYTES {
                break;
            }
            let mut bhs = [0u8; BHS_BYTES];
            bhs.copy_from_slice(&input[..BHS_BYTES]);
            let digests = connection.digests();
            let limit = connection.data_segment_limit_bytes();
            let total = match pdu::frame_bytes(&bhs, digests, limit) {
                Ok(total) => total,
                Err(error) => {
                    connection.handle_decode_error(&error);
                    failed = true;
                    break;
                }
            };
            if input.len() < total {
                input.reserve(total - input.len());
                break;
            }
            let frame = input.split_to(total).freeze();
            match pdu::decode(frame, digests, limit) {
                Ok(pdu) => {
                    if trace {
                        let h = &pdu.header;
                        eprintln!(
                            "conn {id}: op={:#04x} flags={:#04x} itt={:#x} ttt/edtl={:#x} sn={:#x} exp={:#x} datasn={:#x} offset={:#x} len={} cdb0={:#04x}",
                            h.opcode(),
                            h.flags(),
                            h.itt(),
                            h.u32_at(20),
                            h.u32_at(24),
                            h.u32_at(28),
                            h.u32_at(36),
                            h.u32_at(40),
                            pdu.data.len(),
                            h.0[32]
                        );
                    }
                    connection.handle_pdu(pdu)
                }
                Err(error) => {
                    connection.handle_decode_error(&error);
                    failed = true;
                    break;
                }
            }
            dispatch_io(&mut connection, &running, registry, &mut locks);
            dispatch_forwards(&mut connection, &forwards_tx);
            if connection.transmit_bytes() >= TRANSMIT_BATCH_BYTES_MAX {
                write_out(&mut connection, &mut out, &mut writer).await?;
            }
        }
        // Starts the new commands' I/O now (a future does nothing until polled) and answers
        // what finished meanwhile in the same write.
        pump_io(&mut connection, &mut running, registry, &mut locks);
        dispatch_forwards(&mut connection, &forwards_tx);
        write_out(&mut connection, &mut out, &mut writer).await?;
        let mut close = failed;
        while let Some(event) = connection.poll_event() {
            match event {
                Event::Close => close = true,
                Event::Reinstated { old_connection_id } => {
                    let old = registry
                        .connections
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&old_connection_id)
                        .cloned();
                    if let Some(old) = old {
                        old.notify_one();
                    }
                }
            }
        }
        if close || connection.is_closed() {
            break Ok(());
        }
        if input.capacity() - input.len() < 64 * 1024 {
            input.reserve(256 * 1024);
        }
        tokio::select! {
            _ = keepalive.tick() => {
                if last_input.elapsed() >= Duration::from_millis(KEEPALIVE_INTERVAL_MS) {
                    connection.handle_idle();
                    last_input = Instant::now();
                }
            }
            read = reader.read_buf(&mut input) => {
                last_input = Instant::now();
                match read {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(error) => break Err(error),
                }
            }
            Some((itt, tag, result)) = running.next(), if !running.is_empty() => {
                if trace {
                    eprintln!("conn {id}: completion itt={itt:#x} ok={}", result.is_ok());
                }
                connection.handle_io_completion(itt, tag, result);
                // Batch: take every completion that is already here before writing.
                collect_ready(&mut connection, &mut running);
            }
            Some((itt, tag, result)) = forwards.recv() => {
                connection.handle_forward_completion(itt, tag, result);
                while let Ok((itt, tag, result)) = forwards.try_recv() {
                    connection.handle_forward_completion(itt, tag, result);
                }
            }
            () = kill.notified() => break Ok(()),
        }
    };
    if trace {
        eprintln!("conn {id}: closing ({result:?})");
    }
    connection.handle_disconnect();
    // The logical unit's node hears that remote nexuses are gone.
    dispatch_forwards(&mut connection, &forwards_tx);
    // Commands in flight still run to their end, holding the device lock until then (an
    // exclusive op must not be seen half done by another connection's commands).
    if !running.is_empty() {
        tokio::spawn(async move { while running.next().await.is_some() {} });
    }
    let _ = writer.shutdown().await;
    result
}

/// Polls the connection's I/O without waiting and hands every finished one to the
/// connection; returns whether any finished. (Polling here with a no-op waker is safe: the
/// loop only sleeps in its `select!`, which has polled `running` with the task's own waker by
/// then.)
fn collect_ready<D: BlockDevice>(
    connection: &mut Connection<D>,
    running: &mut FuturesUnordered<IoFuture>,
) -> bool {
    let mut finished = false;
    while let Some(Some((itt, tag, result))) = running.next().now_or_never() {
        connection.handle_io_completion(itt, tag, result);
        finished = true;
    }
    finished
}

/// Starts every I/O the connection asks for and collects what finished, until nothing is
/// left to start: a completion can ask for the next I/O of the same command (UNMAP, EXTENDED
/// COPY, COMPARE AND WRITE run several), which must not wait for the next input to start.
fn pump_io<D: BlockDevice>(
    connection: &mut Connection<D>,
    running: &mut FuturesUnordered<IoFuture>,
    registry: &Registry,
    locks: &mut HashMap<usize, Arc<RwLock<()>>>,
) {
    loop {
        dispatch_io(connection, running, registry, locks);
        if !collect_ready(connection, running) {
            break;
        }
    }
}

fn dispatch_io<D: BlockDevice>(
    connection: &mut Connection<D>,
    running: &FuturesUnordered<IoFuture>,
    registry: &Registry,
    locks: &mut HashMap<usize, Arc<RwLock<()>>>,
) {
    while let Some(request) = connection.poll_io() {
        // Every op takes the device lock: reads and plain writes share it, exclusive ops
        // (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC) hold it alone. Reads must take it too, or
        // a read could see an atomic write half done (ext4 copies buffered writes into the
        // page cache without excluding readers).
        let key = Arc::as_ptr(&request.device) as *const () as usize;
        let lock =
            locks.entry(key).or_insert_with(|| registry.device_lock(&request.device)).clone();
        running.push(Box::pin(async move {
            let result = perform_locked(&lock, &*request.device, request.op).await;
            (request.itt, request.tag, result)
        }));
    }
}

/// Runs `op` under the device lock: shared for reads and plain writes, exclusive for COMPARE
/// AND WRITE, ORWRITE and WRITE ATOMIC.
pub async fn perform_locked<D: BlockDevice>(
    lock: &RwLock<()>,
    device: &D,
    op: crate::device::IoOp,
) -> Result<IoData, DeviceError> {
    if op.is_exclusive() {
        let _exclusive = lock.write().await;
        perform(device, op).await
    } else {
        let _shared = lock.read().await;
        perform(device, op).await
    }
}

async fn write_out<D: BlockDevice>(
    connection: &mut Connection<D>,
    out: &mut Outgoing,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<()> {
    if connection.transmit_bytes() == 0 {
        return Ok(());
    }
    connection.poll_transmit(&mut out.bytes, &mut out.segments);
    let result = write_vectored_all(writer, &out.bytes, &out.segments).await;
    out.bytes.clear();
    out.segments.clear();
    result
}

/// Buffers moved out of the connection for one batched socket write.
#[derive(Default)]
struct Outgoing {
    bytes: Vec<u8>,
    segments: Vec<(usize, Bytes)>,
}

/// I/O vectors per writev call.
const IOVECS_MAX: usize = 64;

/// Writes `bytes` with each segment inserted at its position, with writev and no copy.
async fn write_vectored_all(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
    segments: &[(usize, Bytes)],
) -> std::io::Result<()> {
    if segments.is_empty() {
        return writer.write_all(bytes).await;
    }
    // The stream as a list of slices, then written front to back.
    let mut pieces: Vec<&[u8]> = Vec::with_capacity(segments.len() * 2 + 1);
    let mut at = 0;
    for (position, data) in segments {
        if *position > at {
            pieces.push(&bytes[at..*position]);
        }
        pieces.push(data);
        at = *position;
    }
    if at < bytes.len() {
        pieces.push(&bytes[at..]);
    }
    let mut index = 0;
    let mut skip = 0;
    while index < pieces.len() {
        let mut vectors = Vec::with_capacity(IOVECS_MAX);
        vectors.push(std::io::IoSlice::new(&pieces[index][skip..]));
        for piece in pieces.iter().skip(index + 1).take(IOVECS_MAX - 1) {
            vectors.push(std::io::IoSlice::new(piece));
        }
        let mut written = writer.write_vectored(&vectors).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let left = pieces[index].len() - skip;
            if written >= left {
                written -= left;
                index += 1;
                skip = 0;
            } else {
                skip += written;
                written = 0;
            }
        }
    }
    Ok(())
}
