//! `tandem-replica`: one replication engine instance over TCP with a file as its disk, driven
//! by line commands on stdin (one reply line each), for end-to-end tests and measurements.
//!
//! ```text
//! tandem-replica --node-id 0 --listen 127.0.0.1:7789 --peer 1=127.0.0.1:7790 \
//!     --backing /tmp/a.img --meta /tmp/a.tmeta --size-bytes 67108864 [--protocol C]
//!     [--engine sync|uring] [--al-extents 64] [--resync-rate-kib 0 (dynamic)]
//!     [--meta-format v09|sidecar] [--direct-io]   (v09: DRBD 9 flex-external metadata, drbdmeta reads it)
//!     [--fencing dont-care|resource-only|resource-and-stonith] [--fence-peer CMD]
//!     [--fence-timeout-ms N] [--resource NAME]   (DRBD's fence-peer handler; NAME is DRBD_RESOURCE)
//!     [--csums-alg crc32c|sha256] [--csums-after-crash-only] [--verify-alg crc32c|sha256]
//!     [--quorum off|majority|all|N] [--on-no-quorum suspend-io|io-error]
//!     [--diskless] [--diskless-peer ID]...   (DRBD's `disk none`: a tiebreaker that stores nothing;
//!                                             its --backing and --meta files are opened, never used)
//!     [--after-sb-0pri P] [--after-sb-1pri P] [--after-sb-2pri P]   (drbd.conf words; default disconnect)
//!     [--cram-hmac-alg sha256 --shared-secret S]   (peer authentication, both directions)
//!     [--on-io-error detach|pass_on]   (DRBD's disk option; default detach)
//! commands: primary [--force] | secondary | new-current-uuid | status | flush | outdate
//!           attach | detach   (the local disk: back after a detach / stop using it)
//!           read-latency FIRST COUNT   (QD1 4 KiB reads; prints "ok median_us=N p99_us=N reads=N")
//!           connect PEER [--discard-my-data] | disconnect PEER
//!           wait-connected MS | wait-synced MS
//!           verify PEER [FIRST_BLOCK]   (online verify; this node becomes VerifyS)
//!           wait-verified MS   (waits for the verify started here to end; prints
//!                               "ok MS completed=B blocks=N oos=N skipped=N runs=FIRST+BLOCKS,...")
//!           stream FIRST COUNT GEN QD   (prints "acked BLOCK" per completed write, then "done")
//!           check FIRST COUNT GEN       (prints "ok" or "mismatch BLOCK")
//!           write FIRST COUNT GEN       (one write per block, sequential)
//!
//! tandem-replica tcp-rtt [COUNT] [BYTES]
//!     measures the loopback TCP round trip the way replication sees it: BYTES of frame
//!     (default 4096 + the 49-byte Data header) one way, a 40-byte WriteAck back, TCP_NODELAY,
//!     blocking sockets on two threads; prints the median and 99th percentile in microseconds.
//! tandem-replica tcp-stream [MIB]
//!     one-way loopback TCP throughput: MIB MiB (default 4096) in 1 MiB writes, read by a second
//!     thread in 1 MiB reads (what a resync's frame stream can get at most); prints MiB/s.
//! ```

use anyhow::{Context, Result, bail};
use backing_store::EngineKind;
use bytes::Bytes;
use drbd_engine::NodeId;
use drbd_engine::constants::{BLOCK_BYTES, BLOCK_SIZE_BYTES};
use drbd_engine::driver::constants::FENCE_HANDLER_TIMEOUT_MS_DEFAULT;
use drbd_engine::driver::fence::FenceHandler;
use drbd_engine::driver::{DriverConfig, MetaFormat, ReplicatedDevice, Status};
use drbd_engine::protocol::{
    AfterSbPolicies, DigestSettings, DiskState, DynamicControllerConfig, Fencing,
    ReplicationProtocol, ReplicationState, ResyncRate,
};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The content every test block gets: its number and a generation, then bytes derived from both.
pub fn fill_block(block: u64, generation: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_BYTES];
    out[0..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation;
    for chunk in out[16..].chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

const USAGE: &str = "usage: tandem-replica --node-id N --listen ADDR --peer ID=ADDR... \
--backing FILE --meta FILE [--size-bytes N] [--protocol A|B|C] [--engine sync|uring] \
[--al-extents N] [--resync-rate-kib N (0: dynamic)] [--meta-format v09|sidecar] [--direct-io] \
[--fencing dont-care|resource-only|resource-and-stonith] [--fence-peer CMD] [--fence-timeout-ms N] \
[--resource NAME] [--csums-alg crc32c|sha256] [--csums-after-crash-only] [--verify-alg crc32c|sha256] \
[--quorum off|majority|all|N] [--on-no-quorum suspend-io|io-error] [--diskless] [--diskless-peer ID]... \
[--after-sb-0pri P] [--after-sb-1pri P] [--after-sb-2pri P] [--cram-hmac-alg sha256 --shared-secret S] \
[--on-io-error detach|pass_on]
then line commands on stdin: primary [--force] | secondary | new-current-uuid | status | flush | outdate |
attach | detach | read-latency FIRST COUNT |
connect PEER [--discard-my-data] | disconnect PEER | wait-connected MS | wait-synced MS |
verify PEER [FIRST_BLOCK] | wait-verified MS |
stream FIRST COUNT GEN QD | check FIRST COUNT GEN | write FIRST COUNT GEN
or: tandem-replica tcp-rtt [COUNT] [BYTES]   (loopback TCP round trip, frame-sized)
or: tandem-replica tcp-stream [MIB]          (one-way loopback TCP throughput)";

fn parse_args() -> Result<(DriverConfig, Option<FenceHandler>)> {
    let mut node_id = None;
    let mut listen = None;
    let mut peers = Vec::new();
    let mut backing = None;
    let mut meta = None;
    let mut size_bytes = 64 * 1024 * 1024;
    let mut protocol = ReplicationProtocol::C;
    let mut engine = EngineKind::Sync;
    let mut al_extents = 64;
    let mut resync_rate_kib = 0u64;
    let mut meta_format = MetaFormat::V09External;
    let mut direct_io = false;
    let mut fencing = Fencing::DontCare;
    let mut fence_peer = None;
    let mut fence_timeout_ms = FENCE_HANDLER_TIMEOUT_MS_DEFAULT;
    let mut resource = "r0".to_owned();
    let mut digests = DigestSettings::default();
    let mut quorum = drbd_engine::protocol::quorum::QuorumConfig::default();
    let mut after_sb = AfterSbPolicies::default();
    let mut cram_hmac_alg = None;
    let mut shared_secret = None;
    let mut on_io_error = drbd_engine::protocol::OnIoError::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--node-id" => {
                node_id = Some(NodeId::new(value()?.parse()?).context("node id 0..=31")?)
            }
            "--listen" => listen = Some(value()?.parse::<SocketAddr>()?),
            "--peer" => {
                let v = value()?;
                let (id, addr) = v.split_once('=').context("--peer ID=ADDR")?;
                peers.push((NodeId::new(id.parse()?).context("peer id 0..=31")?, addr.parse()?));
            }
            "--backing" => backing = Some(PathBuf::from(value()?)),
            "--meta" => meta = Some(PathBuf::from(value()?)),
            "--size-bytes" => size_bytes = value()?.parse()?,
            "--protocol" => {
                protocol = match value()?.as_str() {
                    "A" => ReplicationProtocol::A,
                    "B" => ReplicationProtocol::B,
                    "C" => ReplicationProtocol::C,
                    other => bail!("unknown protocol {other:?}"),
                }
            }
            "--engine" => engine = value()?.parse()?,
            "--al-extents" => al_extents = value()?.parse()?,
            "--resync-rate-kib" => resync_rate_kib = value()?.parse()?,
            "--direct-io" => direct_io = true,
            "--fencing" => {
                fencing = match value()?.as_str() {
                    "dont-care" => Fencing::DontCare,
                    "resource-only" => Fencing::ResourceOnly,
                    "resource-and-stonith" => Fencing::ResourceAndStonith,
                    other => bail!("unknown fencing policy {other:?}"),
                }
            }
            "--fence-peer" => fence_peer = Some(value()?),
            "--fence-timeout-ms" => fence_timeout_ms = value()?.parse()?,
            "--resource" => resource = value()?,
            "--csums-alg" => digests.csums_alg = Some(value()?.parse()?),
            "--csums-after-crash-only" => digests.csums_after_crash_only = true,
            "--verify-alg" => digests.verify_alg = Some(value()?.parse()?),
            "--quorum" => quorum.quorum = value()?.parse()?,
            "--on-no-quorum" => quorum.on_no_quorum = value()?.parse()?,
            "--diskless" => quorum.diskless = true,
            "--diskless-peer" => quorum
                .diskless_peers
                .push(NodeId::new(value()?.parse()?).context("peer id 0..=31")?),
            "--after-sb-0pri" => after_sb.zero_primaries = value()?.parse()?,
            "--after-sb-1pri" => after_sb.one_primary = value()?.parse()?,
            "--after-sb-2pri" => after_sb.two_primaries = value()?.parse()?,
            "--cram-hmac-alg" => cram_hmac_alg = Some(value()?),
            "--on-io-error" => on_io_error = value()?.parse()?,
            "--shared-secret" => shared_secret = Some(value()?),
            "--meta-format" => {
                meta_format = match value()?.as_str() {
                    "v09" => MetaFormat::V09External,
                    "sidecar" => MetaFormat::Sidecar,
                    other => bail!("unknown metadata format {other:?} (v09 or sidecar)"),
                }
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let resync_rate = if resync_rate_kib == 0 {
        ResyncRate::Dynamic(DynamicControllerConfig {
            plan_ahead_steps: 20,
            fill_target_kib: 16 * 1024,
            max_rate_kib_per_s: 4 * 1024 * 1024,
            min_rate_kib_per_s: 0,
        })
    } else {
        ResyncRate::Fixed { rate_kib_per_s: resync_rate_kib }
    };
    let handler = fence_peer.map(|command| FenceHandler {
        command,
        resource,
        volume: 0,
        timeout_ms: fence_timeout_ms,
    });
    let shared_secret = match (cram_hmac_alg.as_deref(), shared_secret) {
        (None, None) => None,
        (Some("sha256"), Some(secret)) => {
            drbd_engine::protocol::auth::check_secret(secret.as_bytes())
                .map_err(|e| anyhow::anyhow!("--shared-secret: {e}"))?;
            Some(secret.into_bytes())
        }
        (Some("sha256"), None) => bail!("--cram-hmac-alg needs --shared-secret"),
        (Some(other), _) => bail!("unsupported --cram-hmac-alg {other:?} (only sha256)"),
        (None, Some(_)) => bail!("--shared-secret needs --cram-hmac-alg sha256"),
    };
    let config = DriverConfig {
        node_id: node_id.context("--node-id is required")?,
        listen: listen.context("--listen is required")?,
        peers,
        backing_path: backing.context("--backing is required")?,
        size_bytes,
        engine,
        direct_io,
        meta_path: meta.context("--meta is required")?,
        meta_format,
        protocol,
        fencing,
        resync_rate,
        al_extents,
        digests,
        quorum,
        after_sb,
        shared_secret,
        on_io_error,
        congestion: Default::default(),
    };
    Ok((config, handler))
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

fn describe(s: &Status) -> String {
    let mut line =
        format!("role={} disk={} quorum={}", s.role, s.disk, if s.quorum { "yes" } else { "no" });
    for p in &s.peers {
        line.push_str(&format!(
            " peer{}={}/{}/{} oos={}",
            p.node_id, p.connection, p.replication, p.disk, p.out_of_sync_blocks
        ));
        if let Some(r) = &p.resync {
            line.push_str(&format!(
                " resync_total={} resync_remaining={} resync_kib_per_s={} resync_eta_s={}",
                r.blocks_total,
                r.blocks_remaining,
                r.rate_kib_per_s,
                r.eta_s.map_or("-".to_owned(), |e| e.to_string())
            ));
        }
        if let Some(v) = &p.verify {
            line.push_str(&format!(
                " verify_done={:.2} verify_oos={} verify_kib_per_s={}",
                v.percent_done(),
                v.out_of_sync_blocks,
                v.rate_kib_per_s
            ));
        }
    }
    line.push_str(&format!(
        " resync_received={} resync_sent={} split_brain={}",
        s.resync_blocks_received, s.resync_blocks_sent, s.split_brain
    ));
    // Last, quoted: the message has spaces, and it is what an operator needs after a detach.
    if let Some(error) = &s.disk_error {
        line.push_str(&format!(" disk_error={error:?}"));
    }
    line
}

async fn wait_until(
    device: &ReplicatedDevice,
    timeout_ms: u64,
    done: impl Fn(&Status) -> bool,
) -> Result<u64> {
    let start = Instant::now();
    loop {
        let status = device.status().await?;
        if done(&status) {
            return Ok(u64::try_from(start.elapsed().as_millis())?);
        }
        if start.elapsed() > Duration::from_millis(timeout_ms) {
            bail!("timeout: {}", describe(&status));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn command(device: &ReplicatedDevice, line: &str) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64> { Ok(words.get(i).context("missing argument")?.parse()?) };
    match words.first().copied() {
        Some("primary") => {
            device.promote(words.get(1) == Some(&"--force")).await?;
            Ok("ok".into())
        }
        Some("secondary") => {
            device.demote().await?;
            Ok("ok".into())
        }
        Some("new-current-uuid") => {
            device.new_current_uuid_clear_bitmap().await?;
            Ok("ok".into())
        }
        Some("status") => Ok(describe(&device.status().await?)),
        Some("connect") => {
            let peer = NodeId::new(u8::try_from(num(1)?)?).context("peer id 0..=31")?;
            device.connect(peer, words.get(2) == Some(&"--discard-my-data")).await?;
            Ok("ok".into())
        }
        Some("disconnect") => {
            let peer = NodeId::new(u8::try_from(num(1)?)?).context("peer id 0..=31")?;
            device.disconnect(peer).await?;
            Ok("ok".into())
        }
        Some("outdate") => {
            device.outdate().await?;
            Ok("ok".into())
        }
        Some("attach") => {
            device.attach().await?;
            Ok("ok".into())
        }
        Some("detach") => {
            device.detach().await?;
            Ok("ok".into())
        }
        Some("read-latency") => {
            // QD1 4 KiB reads of FIRST..FIRST+COUNT: median and 99th percentile.
            let (first, count) = (num(1)?, num(2)?.max(1));
            let mut samples = Vec::new();
            for block in first..first + count {
                let start = Instant::now();
                device.read(block * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES).await?;
                samples.push(u64::try_from(start.elapsed().as_micros())?);
            }
            samples.sort_unstable();
            let at = |q: usize| samples[(samples.len() - 1) * q / 100];
            Ok(format!("ok median_us={} p99_us={} reads={}", at(50), at(99), samples.len()))
        }
        Some("flush") => {
            device.flush().await?;
            Ok("ok".into())
        }
        Some("wait-connected") => {
            let ms = wait_until(device, num(1)?, |s| {
                s.peers.iter().all(|p| p.replication != ReplicationState::Off)
            })
            .await?;
            Ok(format!("ok {ms}"))
        }
        Some("wait-synced") => {
            let ms = wait_until(device, num(1)?, |s| {
                // A diskless tiebreaker (itself or a peer) is synced when Established.
                matches!(s.disk, DiskState::UpToDate | DiskState::Diskless)
                    && s.peers.iter().all(|p| {
                        p.replication == ReplicationState::Established
                            && matches!(p.disk, DiskState::UpToDate | DiskState::Diskless)
                    })
            })
            .await?;
            Ok(format!("ok {ms}"))
        }
        Some("verify") => {
            let peer = NodeId::new(u8::try_from(num(1)?)?).context("peer id 0..=31")?;
            let first = if words.len() > 2 { num(2)? } else { 0 };
            device.verify(peer, first).await?;
            Ok("ok".into())
        }
        Some("wait-verified") => {
            let verifying = |s: &Status| {
                s.peers.iter().any(|p| {
                    matches!(p.replication, ReplicationState::VerifyS | ReplicationState::VerifyT)
                })
            };
            let ms =
                wait_until(device, num(1)?, |s| !verifying(s) && s.verify_last.is_some()).await?;
            let s = device.status().await?;
            let Some(last) = s.verify_last else { bail!("no verify ran from this node") };
            let runs: Vec<String> = s
                .verify_out_of_sync
                .iter()
                .filter(|(peer, _, _)| *peer == last.peer)
                .map(|(_, first, blocks)| format!("{first}+{blocks}"))
                .collect();
            Ok(format!(
                "ok {ms} completed={} blocks={} oos={} skipped={} runs={}",
                last.completed,
                last.blocks_verified,
                last.out_of_sync_blocks,
                last.skipped_blocks,
                runs.join(",")
            ))
        }
        Some("write") => {
            let (first, count, generation) = (num(1)?, num(2)?, num(3)?);
            for block in first..first + count {
                let data = Bytes::from(fill_block(block, generation));
                device.write(block * BLOCK_SIZE_BYTES, data, false).await?;
            }
            Ok("ok".into())
        }
        Some("stream") => {
            let (first, count, generation, depth) = (num(1)?, num(2)?, num(3)?, num(4)?.max(1));
            let semaphore =
                std::sync::Arc::new(tokio::sync::Semaphore::new(usize::try_from(depth)?));
            let mut tasks = Vec::new();
            for block in first..first + count {
                let permit = semaphore.clone().acquire_owned().await?;
                let device = device.clone();
                tasks.push(tokio::spawn(async move {
                    let data = Bytes::from(fill_block(block, generation));
                    match device.write(block * BLOCK_SIZE_BYTES, data, false).await {
                        Ok(()) => say(format!("acked {block}")),
                        Err(e) => say(format!("failed {block} {e}")),
                    }
                    drop(permit);
                }));
            }
            for task in tasks {
                task.await?;
            }
            Ok("done".into())
        }
        Some("check") => {
            let (first, count, generation) = (num(1)?, num(2)?, num(3)?);
            for block in first..first + count {
                let data = device.read(block * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES).await?;
                if data.as_ref() != fill_block(block, generation).as_slice() {
                    return Ok(format!("mismatch {block}"));
                }
            }
            Ok("ok".into())
        }
        Some(other) => bail!("unknown command {other:?}"),
        None => Ok(String::new()),
    }
}

/// A Data frame for one 4 KiB block: header, id, offset, fua, payload.
const RTT_REQUEST_BYTES_DEFAULT: usize = 32 + 17 + 4096;
/// A WriteAck frame: header and id.
const RTT_REPLY_BYTES: usize = 32 + 8;
/// Round trips measured by default (plus a tenth as warm-up).
const RTT_COUNT_DEFAULT: usize = 20_000;

/// `tcp-rtt [COUNT] [BYTES]`: a ping-pong over loopback TCP between two threads.
fn tcp_rtt(args: &[String]) -> Result<()> {
    use std::io::Read;
    let count: usize = args.first().map_or(Ok(RTT_COUNT_DEFAULT), |a| a.parse())?;
    let request_bytes: usize = args.get(1).map_or(Ok(RTT_REQUEST_BYTES_DEFAULT), |a| a.parse())?;
    let warmup = count / 10;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut request = vec![0u8; request_bytes];
        let reply = [0u8; RTT_REPLY_BYTES];
        while stream.read_exact(&mut request).is_ok() {
            stream.write_all(&reply)?;
        }
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let request = vec![0x5au8; request_bytes];
    let mut reply = [0u8; RTT_REPLY_BYTES];
    let mut samples_ns = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        if i >= warmup {
            samples_ns.push(start.elapsed().as_nanos());
        }
    }
    drop(stream);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    samples_ns.sort_unstable();
    let at = |q: usize| samples_ns[(samples_ns.len() - 1) * q / 100] as f64 / 1000.0;
    // The mean too: the QD1 latencies it is set against (qemu-img bench's run time divided
    // by the requests) are means, tails included.
    let mean_us = samples_ns.iter().sum::<u128>() as f64 / samples_ns.len() as f64 / 1000.0;
    say(format!(
        "tcp-rtt loopback: {count} round trips of {request_bytes} bytes out, {RTT_REPLY_BYTES} \
         back: median {:.1} us, mean {mean_us:.1} us, p99 {:.1} us",
        at(50),
        at(99)
    ));
    Ok(())
}

/// `tcp-stream [MIB]`: one-way loopback TCP throughput between two threads.
fn tcp_stream(args: &[String]) -> Result<()> {
    use std::io::Read;
    const CHUNK_BYTES: usize = 1024 * 1024;
    let mib: usize = args.first().map_or(Ok(4096), |a| a.parse())?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut total = 0;
        loop {
            match stream.read(&mut buffer)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let mut stream = std::net::TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; CHUNK_BYTES];
    let start = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk)?;
    }
    drop(stream);
    let received = sink.join().map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(received, mib * CHUNK_BYTES, "every byte arrived");
    say(format!(
        "tcp-stream loopback: {mib} MiB in {seconds:.2} s, {:.0} MiB/s",
        mib as f64 / seconds
    ));
    Ok(())
}

// One thread, as tandemd runs each engine (storage-node engine_runtime.rs): every hand-off
// between the driver, the connection tasks and the command loop stays on it.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("tcp-rtt") {
        return tcp_rtt(&argv[1..]);
    }
    if argv.first().map(String::as_str) == Some("tcp-stream") {
        return tcp_stream(&argv[1..]);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let (config, handler) = parse_args()?;
    let (device, _task) = ReplicatedDevice::start(config).await.context("starting the replica")?;
    if handler.is_some() {
        device.set_fence_handler(handler).await.context("setting the fence-peer handler")?;
    }
    say("ready");
    // Stdin is read on a plain thread (the workspace's tokio has no io-std feature).
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        match command(&device, &line).await {
            Ok(reply) => say(reply),
            Err(error) => say(format!("error {error:#}")),
        }
    }
    Ok(())
}
