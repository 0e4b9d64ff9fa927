//! Side-by-side benchmark of the backing-store engines.
//!
//! Run with: `cargo run --release -p backing-store --example backing_bench -- [--dir DIR]
//! [--size-mib N] [--seconds S] [--rounds R] [--workloads 4k-randwrite-qd1,...]
//! [--io buffered|direct|both] [--inline off,on,blocking]`
//!
//! `--inline` lists the fast-path modes to compare (default `off,on`): `off` sends every
//! request to the engine, `on` is the default inline fast path (RWF_NOWAIT), `blocking` adds
//! blocking inline writes (`set_inline_blocking_writes`).
//!
//! For each workload it runs every (engine, O_DIRECT, inline fast path) combination back to
//! back, `--rounds`
//! times alternating the order, so noise from a shared machine hits all engines alike. The
//! file is filled with data first so reads hit allocated extents. Buffered reads mostly come
//! from the page cache: they measure the engine's overhead, not the disk.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use backing_store::{BackingStore, EngineKind, OpenOptions};
use bytes::Bytes;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    block_bytes: usize,
    queue_depth: usize,
    write: bool,
    sequential: bool,
}

const WORKLOADS: [Workload; 8] = [
    Workload {
        name: "4k-randwrite-qd1",
        block_bytes: 4096,
        queue_depth: 1,
        write: true,
        sequential: false,
    },
    Workload {
        name: "4k-randwrite-qd32",
        block_bytes: 4096,
        queue_depth: 32,
        write: true,
        sequential: false,
    },
    Workload {
        name: "4k-randread-qd32",
        block_bytes: 4096,
        queue_depth: 32,
        write: false,
        sequential: false,
    },
    // 64 KiB and 256 KiB: either side of INLINE_IO_BYTES_MAX, to check the inline limit.
    Workload {
        name: "64k-randread-qd8",
        block_bytes: 64 << 10,
        queue_depth: 8,
        write: false,
        sequential: false,
    },
    Workload {
        name: "64k-randwrite-qd8",
        block_bytes: 64 << 10,
        queue_depth: 8,
        write: true,
        sequential: false,
    },
    Workload {
        name: "256k-randread-qd8",
        block_bytes: 256 << 10,
        queue_depth: 8,
        write: false,
        sequential: false,
    },
    Workload {
        name: "1m-seqwrite-qd8",
        block_bytes: 1 << 20,
        queue_depth: 8,
        write: true,
        sequential: true,
    },
    Workload {
        name: "1m-seqread-qd8",
        block_bytes: 1 << 20,
        queue_depth: 8,
        write: false,
        sequential: true,
    },
];

struct Arguments {
    directory: PathBuf,
    size_bytes: u64,
    duration: Duration,
    rounds: usize,
    /// Workload names to run (all when empty).
    workloads: Vec<String>,
    /// Run buffered, O_DIRECT, or both.
    direct_modes: Vec<bool>,
    /// Inline fast-path modes to compare.
    inline_modes: Vec<InlineMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InlineMode {
    Off,
    On,
    Blocking,
}

impl InlineMode {
    fn name(self) -> &'static str {
        match self {
            InlineMode::Off => "off",
            InlineMode::On => "on",
            InlineMode::Blocking => "block",
        }
    }
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut arguments = Arguments {
        directory: PathBuf::from("/var/tmp"),
        size_bytes: 1 << 30,
        duration: Duration::from_secs(2),
        rounds: 2,
        workloads: Vec::new(),
        direct_modes: vec![false, true],
        inline_modes: vec![InlineMode::Off, InlineMode::On],
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|error| format!("{flag} {value}: {error}"));
        match flag.as_str() {
            "--dir" => arguments.directory = PathBuf::from(&value),
            "--size-mib" => arguments.size_bytes = number()? << 20,
            "--seconds" => arguments.duration = Duration::from_secs(number()?),
            "--rounds" => {
                arguments.rounds = usize::try_from(number()?).map_err(|error| error.to_string())?;
            }
            "--workloads" => {
                arguments.workloads = value.split(',').map(str::to_owned).collect();
            }
            "--io" => {
                arguments.direct_modes = match value.as_str() {
                    "buffered" => vec![false],
                    "direct" => vec![true],
                    "both" => vec![false, true],
                    other => {
                        return Err(format!("--io {other}: expected buffered, direct or both"));
                    }
                };
            }
            "--inline" => {
                arguments.inline_modes = value
                    .split(',')
                    .map(|mode| match mode {
                        "off" => Ok(InlineMode::Off),
                        "on" => Ok(InlineMode::On),
                        "blocking" => Ok(InlineMode::Blocking),
                        other => Err(format!("--inline {other}: expected off, on or blocking")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(arguments)
}

struct Outcome {
    operations: u64,
    /// Slowest single request (a stall of the inline path shows here).
    max_latency: Duration,
    elapsed: Duration,
    cpu: Duration,
}

/// User + system CPU time of the whole process (every thread, io_uring workers included).
fn process_cpu_time() -> Duration {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage through the valid, exclusively borrowed pointer.
    let result = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(result, 0, "getrusage failed");
    let micros = |time: libc::timeval| {
        Duration::from_secs(u64::try_from(time.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(time.tv_usec).unwrap_or(0))
    };
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

async fn run(store: &BackingStore, workload: Workload, duration: Duration) -> Outcome {
    let blocks = store.size_bytes() / workload.block_bytes as u64;
    let payload = Bytes::from(vec![0xA5u8; workload.block_bytes]);
    let cpu_started = process_cpu_time();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workload.queue_depth {
        let store = store.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut state =
                0x2545_F491_4F6C_DD1Du64 ^ (worker as u64 + 1).wrapping_mul(0x9E37_79B9);
            let mut next_sequential = worker as u64;
            let mut operations = 0u64;
            let mut max_latency = Duration::ZERO;
            while Instant::now() < deadline {
                let issued = Instant::now();
                let block = if workload.sequential {
                    let block = next_sequential % blocks;
                    next_sequential += workload.queue_depth as u64;
                    block
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state % blocks
                };
                let offset = block * workload.block_bytes as u64;
                if workload.write {
                    store.write(offset, payload.clone(), false).await.expect("write");
                } else {
                    store.read(offset, workload.block_bytes).await.expect("read");
                }
                operations += 1;
                max_latency = max_latency.max(issued.elapsed());
            }
            (operations, max_latency)
        });
    }
    let mut operations = 0;
    let mut max_latency = Duration::ZERO;
    while let Some(result) = tasks.join_next().await {
        let (worker_operations, worker_max) = result.expect("worker");
        operations += worker_operations;
        max_latency = max_latency.max(worker_max);
    }
    let cpu = process_cpu_time() - cpu_started;
    Outcome { operations, max_latency, elapsed: started.elapsed(), cpu }
}

fn main() -> Result<(), String> {
    let arguments = parse_arguments()?;
    let directory =
        tempfile::tempdir_in(&arguments.directory).map_err(|error| error.to_string())?;
    let path = directory.path().join("bench.img");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    runtime.block_on(async {
        let options = OpenOptions {
            engine: EngineKind::Uring,
            direct_io: true,
            create_size_bytes: Some(arguments.size_bytes),
            read_only: false,
        };
        let store = BackingStore::open(&path, &options).map_err(|error| error.to_string())?;
        let chunk = Bytes::from(vec![0x5Au8; 1 << 20]);
        for offset in (0..arguments.size_bytes).step_by(1 << 20) {
            store.write(offset, chunk.clone(), false).await.map_err(|error| error.to_string())?;
        }
        store.flush().await.map_err(|error| error.to_string())?;
        Ok::<(), String>(())
    })?;
    println!(
        "file {} ({} MiB), {} s per run, {} rounds, current-thread tokio runtime",
        path.display(),
        arguments.size_bytes >> 20,
        arguments.duration.as_secs(),
        arguments.rounds
    );
    println!(
        "{:<18} {:<6} {:<9} {:<6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "workload",
        "engine",
        "io",
        "inline",
        "IOPS",
        "MiB/s",
        "avg_us",
        "max_us",
        "cpu_us/op",
        "inline%"
    );
    let mut configurations: Vec<(EngineKind, bool, InlineMode)> = Vec::new();
    for &direct_io in &arguments.direct_modes {
        for &inline in &arguments.inline_modes {
            for engine in [EngineKind::Sync, EngineKind::Uring] {
                configurations.push((engine, direct_io, inline));
            }
        }
    }
    let selected = WORKLOADS.into_iter().filter(|workload| {
        arguments.workloads.is_empty()
            || arguments.workloads.iter().any(|name| name == workload.name)
    });
    for workload in selected {
        for round in 0..arguments.rounds {
            if round % 2 == 1 {
                configurations.reverse();
            }
            for &(engine, direct_io, inline) in &configurations {
                let options =
                    OpenOptions { engine, direct_io, create_size_bytes: None, read_only: false };
                let store =
                    BackingStore::open(&path, &options).map_err(|error| error.to_string())?;
                store.set_inline_io(inline != InlineMode::Off);
                store.set_inline_blocking_writes(inline == InlineMode::Blocking);
                let outcome = runtime.block_on(run(&store, workload, arguments.duration));
                let counters = store.io_counters();
                drop(store);
                let inline_percent = 100.0 * counters.inline_served as f64
                    / (counters.inline_served + counters.engine_served).max(1) as f64;
                let seconds = outcome.elapsed.as_secs_f64();
                let iops = outcome.operations as f64 / seconds;
                let mib_per_s = iops * workload.block_bytes as f64 / f64::from(1u32 << 20);
                let average_us =
                    seconds * 1e6 * workload.queue_depth as f64 / outcome.operations.max(1) as f64;
                let io = if direct_io { "O_DIRECT" } else { "buffered" };
                println!(
                    "{:<18} {:<6} {:<9} {:<6} {:>10.0} {:>10.1} {:>10.1} {:>10} {:>10.2} {:>8.1}",
                    workload.name,
                    engine,
                    io,
                    inline.name(),
                    iops,
                    mib_per_s,
                    average_us,
                    outcome.max_latency.as_micros(),
                    outcome.cpu.as_secs_f64() * 1e6 / outcome.operations.max(1) as f64,
                    inline_percent
                );
            }
            if round % 2 == 1 {
                configurations.reverse();
            }
        }
    }
    Ok(())
}
