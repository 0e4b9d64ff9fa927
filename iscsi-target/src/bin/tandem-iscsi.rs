//! tandem-iscsi: serves files as iSCSI LUNs.
//!
//! tandem-iscsi --portal 127.0.0.1:3260 --target iqn.2026-11.org.tandem:demo --lun 0=/var/lib/tandem/demo.img
//!   [--portal ADDR]... [--target IQN [--lun N=PATH]...]... [--create-size SIZE]
//!   [--chap USER:SECRET] [--mutual-chap USER:SECRET] [--allow-initiator IQN]...
//!   [--engine sync|uring] [--read-engine sync|uring] [--direct-io]   (default engine: sync)
//!   [--inline-writes blocking|nowait]   (default: blocking)
//! A --lun belongs to the --target before it. --create-size creates missing files sparse.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use backing_store::atomic_journal::journal_path;
use backing_store::{BackingStore, EngineKind, OpenOptions};
use iscsi_target::driver::store::StoreDevice;
use iscsi_target::{AuthConfig, Config, Credentials, LogicalUnit, PortalAddress, TargetNode};

const USAGE: &str = "usage: tandem-iscsi --portal ADDR:PORT --target IQN --lun N=PATH \
[--portal ...] [--target IQN --lun N=PATH ...] [--create-size SIZE] [--chap USER:SECRET] \
[--mutual-chap USER:SECRET] [--allow-initiator IQN]... [--engine sync|uring] [--read-engine sync|uring] [--direct-io] [--inline-writes blocking|nowait]";

struct TargetArgs {
    name: String,
    luns: Vec<(u64, PathBuf)>,
}

struct Args {
    portals: Vec<SocketAddr>,
    targets: Vec<TargetArgs>,
    create_size_bytes: Option<u64>,
    auth: AuthConfig,
    engine: EngineKind,
    /// Engine for reads when it differs from `engine`.
    read_engine: Option<EngineKind>,
    direct_io: bool,
    /// Small buffered writes done on the connection's own thread even where the file system
    /// refuses RWF_NOWAIT writes (ext4): see `backing_store::BackingStore::set_inline_blocking_writes`.
    inline_blocking_writes: bool,
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, multiplier) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("unknown size suffix in {text:?} (use K, M, G or T)"),
            };
            (&text[..i], m)
        }
        _ => (text, 1),
    };
    let n: u64 = number.parse().with_context(|| format!("bad size {text:?}"))?;
    n.checked_mul(multiplier).with_context(|| format!("size {text:?} overflows"))
}

fn parse_credentials(text: &str, flag: &str) -> anyhow::Result<Credentials> {
    let (user, secret) =
        text.split_once(':').with_context(|| format!("{flag} wants USER:SECRET"))?;
    if user.is_empty() || secret.is_empty() {
        bail!("{flag} wants a non-empty USER and SECRET");
    }
    Ok(Credentials { user: user.to_string(), secret: secret.to_string() })
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        portals: Vec::new(),
        targets: Vec::new(),
        create_size_bytes: None,
        auth: AuthConfig::default(),
        // Measured with bench/vs-tgt on buffered files: the pread/pwrite engine beat io_uring
        // (which punts buffered writes to its worker pool) on every case.
        engine: EngineKind::Sync,
        read_engine: None,
        direct_io: false,
        // Measured with backing-store/bench/vs-tgt-cpu on ext4 (backing-store README, "Inline
        // fast path"): 4 KiB writes at QD1 cost 22 µs of target CPU instead of 36-39 µs and run
        // 1.4-1.6x tgt instead of 0.9-1.0x. The price is that a write may sleep in the kernel on
        // a runtime thread; the store suspends the mode for a second after any such stall.
        inline_blocking_writes: true,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--direct-io" {
            args.direct_io = true;
            continue;
        }
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), v.to_string()),
            _ => {
                let value =
                    argv.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
                (flag, value)
            }
        };
        match flag.as_str() {
            "--portal" => {
                args.portals.push(value.parse().with_context(|| format!("bad portal {value:?}"))?)
            }
            "--target" => args.targets.push(TargetArgs { name: value, luns: Vec::new() }),
            "--lun" => {
                let target = args.targets.last_mut().context("--lun must follow a --target")?;
                let (n, path) = value.split_once('=').context("--lun wants N=PATH")?;
                let n: u64 = n.parse().with_context(|| format!("bad LUN number {n:?}"))?;
                if n > 255 {
                    bail!("LUN {n} is above 255");
                }
                if target.luns.iter().any(|(l, _)| *l == n) {
                    bail!("LUN {n} given twice for {}", target.name);
                }
                target.luns.push((n, PathBuf::from(path)));
            }
            "--create-size" => args.create_size_bytes = Some(parse_size(&value)?),
            "--chap" => args.auth.chap = Some(parse_credentials(&value, "--chap")?),
            "--mutual-chap" => {
                args.auth.mutual_chap = Some(parse_credentials(&value, "--mutual-chap")?)
            }
            "--allow-initiator" => args.auth.allowed_initiators.push(value),
            "--engine" => args.engine = value.parse()?,
            "--read-engine" => args.read_engine = Some(value.parse()?),
            "--inline-writes" => {
                args.inline_blocking_writes = match value.as_str() {
                    "blocking" => true,
                    "nowait" => false,
                    _ => bail!("--inline-writes wants blocking or nowait, not {value:?}"),
                }
            }
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }
    if args.portals.is_empty() {
        bail!("at least one --portal is needed\n{USAGE}");
    }
    if args.targets.is_empty() {
        bail!("at least one --target is needed\n{USAGE}");
    }
    if args.auth.mutual_chap.is_some() && args.auth.chap.is_none() {
        bail!("--mutual-chap needs --chap");
    }
    Ok(args)
}

/// Allocations up to this size stay in malloc's heap instead of fresh mmap()s.
const MMAP_THRESHOLD_BYTES: i32 = 64 * 1024 * 1024;

/// Every large read or write allocates a buffer of up to a few MiB. glibc serves those with
/// mmap()/munmap() by default, which costs a page fault per 4 KiB touched and a TLB shootdown
/// per free: more CPU than the copy itself. Keeping them in the heap makes them cheap.
fn tune_allocator() {
    if std::env::var_os("TANDEM_ISCSI_DEFAULT_MALLOC").is_some() {
        return;
    }
    // SAFETY: mallopt only changes glibc allocator parameters; it is called before any other
    // thread exists, and both parameters accept any positive value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD_BYTES);
    }
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for t in &args.targets {
        let mut luns = Vec::new();
        for (n, path) in &t.luns {
            let options = OpenOptions {
                engine: args.engine,
                direct_io: args.direct_io,
                create_size_bytes: args.create_size_bytes,
                read_only: false,
            };
            let store = BackingStore::open(path, &options)
                .with_context(|| format!("opening LUN {n} of {}: {}", t.name, path.display()))?;
            store.set_inline_blocking_writes(args.inline_blocking_writes);
            let device = match args.read_engine {
                Some(engine) => {
                    let reader_options = OpenOptions { engine, create_size_bytes: None, ..options };
                    let reader = BackingStore::open(path, &reader_options)
                        .with_context(|| format!("opening LUN {n} of {} for reads", t.name))?;
                    StoreDevice::with_reader(store, reader)
                }
                None => StoreDevice::new(store),
            };
            // Atomic writes of a file LUN go through a journal next to it; a block device has
            // no place for one that survives a reboot, so it keeps the one-page guarantee.
            // The journal is recovered here, before the LUN serves any I/O.
            let device = if device.store().is_block_device() {
                device
            } else {
                let (device, recovery) = device
                    .open_journal(&options)
                    .await
                    .with_context(|| format!("atomic-write journal of {}", path.display()))?;
                eprintln!(
                    "tandem-iscsi: atomic-write journal {}: {recovery}",
                    journal_path(path).display()
                );
                device
            };
            let device = Arc::new(device);
            luns.push(Arc::new(LogicalUnit::new(&t.name, *n, device)));
        }
        targets.push(TargetNode::new(t.name.clone(), luns));
    }
    let listeners = iscsi_target::driver::bind(&args.portals).await.context("binding portals")?;
    let portals = listeners
        .iter()
        .map(|(l, port)| {
            let address = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            PortalAddress { address, relative_port: *port }
        })
        .collect::<Vec<_>>();
    let config = Arc::new(Config::new(targets, args.auth.clone(), portals.clone()));
    for p in &portals {
        println!("tandem-iscsi: listening on {}", p.address);
    }
    iscsi_target::driver::serve(config, listeners).await.context("serving")?;
    Ok(())
}
