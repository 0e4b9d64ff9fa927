//! `tandem-sim --seed S --count N [--nodes K]`: runs seeds S..S+N-1 of the deterministic
//! simulator. Each failing seed prints its violation and a one-line reproducer; the last line
//! is always `N seeds, V violations`, preceded by the counters summed over all seeds (`total:`),
//! and the exit code is 1 when V > 0. `--verbose` prints each seed's swarm and counters.

use drbd_engine::sim;
use std::process::ExitCode;

const USAGE: &str = "usage: tandem-sim --seed S --count N [--nodes 2|3] [--diskful 3] [--verbose]
--nodes 3: two diskful nodes and a diskless tiebreaker, quorum majority, on-no-quorum drawn per seed;
--nodes 3 --diskful 3: the same with three diskful nodes (a full mesh, per-peer bitmaps);
runs seeds S..S+N-1; the last line is `N seeds, V violations` (exit 1 when V > 0);
a failing seed is reproduced with `tandem-sim --seed S --count 1` (TANDEM_SIM_TRACE=1 traces it)";

fn parse_args() -> Result<(u64, u64, usize, bool, bool), String> {
    let mut seed = None;
    let mut diskful = None;
    let mut count = 1u64;
    let mut nodes = 2usize;
    let mut verbose = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seed" => seed = Some(value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--count" => count = value("--count")?.parse().map_err(|e| format!("--count: {e}"))?,
            "--nodes" => nodes = value("--nodes")?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--diskful" => {
                diskful = Some(
                    value("--diskful")?.parse::<usize>().map_err(|e| format!("--diskful: {e}"))?,
                );
            }
            "--verbose" => verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let seed = seed.ok_or("--seed S is required")?;
    if !(2..=3).contains(&nodes) {
        return Err("--nodes is 2 (two diskful nodes, no quorum) or 3 (two diskful nodes and a \
             diskless tiebreaker, quorum majority)"
            .into());
    }
    let mesh = match diskful {
        None => false,
        Some(d) if d == nodes && nodes == 3 => true,
        Some(d) if d == 2 && nodes == 3 => false,
        Some(d) if d == nodes && nodes == 2 => false,
        Some(_) => {
            return Err("--diskful is 2 (a diskless tiebreaker with --nodes 3) or 3 (--nodes 3 \
                 only: three diskful nodes)"
                .into());
        }
    };
    Ok((seed, count, nodes, verbose, mesh))
}

fn main() -> ExitCode {
    let (seed, count, nodes, verbose, mesh) = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("tandem-sim: {message}");
            return ExitCode::from(2);
        }
    };
    // Panics are reported as violations of their seed; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut violations = 0u64;
    let mut total = sim::Report::default();
    for s in seed..seed.saturating_add(count) {
        let report = if mesh { sim::mesh::run_seed_mesh(s) } else { sim::run_seed(s, nodes) };
        total.add(&report);
        if verbose {
            let world = if mesh { sim::World::new_mesh(s) } else { sim::World::new(s, nodes) };
            println!("seed {s}: {:?} {:?}", world.swarm(), world.more_faults_swarm());
            println!("seed {s}: {}", report.summary());
        }
        if !report.violations.is_empty() {
            violations += 1;
            for v in &report.violations {
                println!("seed {s}: {v}");
            }
            let command = if mesh {
                sim::mesh::reproduce_command_mesh(s)
            } else {
                sim::reproduce_command(s, nodes)
            };
            println!("reproduce: {command}");
        }
    }
    println!("total: {}", total.summary());
    println!("{count} seeds, {violations} violations");
    if violations > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
