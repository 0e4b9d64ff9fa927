//! The README's first command, end to end: `scripts/walkthrough` brings up the all-in-one
//! cluster (three tandemd, tandem-api on SQLite, tandem-compute), creates a volume with the
//! OpenStack CLI (two replicas and a diskless tiebreaker), attaches it to the tiny guest, kills
//! the primary while the guest writes, waits for the survivor to promote itself (nobody runs
//! `tandemadm primary`), and checks from inside the guest that its data survived and it saw no
//! I/O error. Run with this
//! workspace's binaries (`TANDEM_BIN_DIR`) and `WALKTHROUGH_KEEP=0`, so it stops at the end.

use std::process::Command;
use std::time::Duration;

use tests::{binary, require_slow, run_with_timeout, workspace_root};

#[test]
fn the_walkthrough_fails_over_under_a_writing_guest_and_loses_nothing() {
    require_slow!();
    let bin_dir = ["tandemd", "tandemadm", "tandem-api", "tandem-compute", "tandem-sim"]
        .map(binary)
        .first()
        .and_then(|path| path.parent().map(std::path::Path::to_path_buf))
        .expect("the binaries' directory");
    let output = run_with_timeout(
        Command::new(workspace_root().join("scripts/walkthrough"))
            .env("TANDEM_BIN_DIR", &bin_dir)
            .env("WALKTHROUGH_KEEP", "0")
            .env("WALKTHROUGH_SIM_SEEDS", "20"),
        Duration::from_secs(1200),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(output.status.success(), "the walk-through failed");
    for needle in [
        "20 seeds, 0 violations",
        "volume status: in-use",
        ", diskless tiebreaker on ",
        "promoted itself automatically",
        "the same, and the guest kernel logged no I/O error",
        "no acknowledged write lost",
        "is UpToDate again",
        "its longest wait for a write:",
    ] {
        assert!(text.contains(needle), "the walk-through printed {needle:?}");
    }
    // The figures, in one line for the logs: takeover time and the guest's longest wait.
    let figure = |needle: &str| {
        text.lines().find(|l| l.contains(needle)).map(str::trim).unwrap_or_default().to_owned()
    };
    println!(
        "walkthrough figures: {} | {}",
        figure("promoted itself automatically"),
        figure("its longest wait for a write:")
    );
}
