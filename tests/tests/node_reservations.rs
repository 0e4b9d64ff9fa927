//! Persistent reservations replicated with the data (issue 7): two tandemd on loopback, two
//! initiator names register keys through the primary and one holds a WRITE EXCLUSIVE -
//! REGISTRANTS ONLY reservation (what fence_scsi takes); the primary is killed with -9 and the
//! secondary promoted with `tandemadm primary`; through the new primary the same keys, holder
//! and type show, the generation has not gone back, a non-registrant's write is refused with
//! RESERVATION CONFLICT and the holder's write succeeds. A change made on the new primary
//! survives its restart, reaches the old primary by resync when it comes back as secondary,
//! and holds after the switch back.
//! libiscsi's PR conformance tests run through the replicated LUN before and after failover,
//! and through the secondary's port while it forwards to the primary (multipath).
//!
//! The client is `tests/tools/iscsi-pr.c`, built here against libiscsi (libiscsi-bin ships
//! no PR tool): it needs `cc` and Debian's libiscsi-dev.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tests::run_with_timeout;
use tests::storage_pair::StoragePair;

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const HOLDER: &str = "iqn.2026-11.org.tandem:node-a";
const OTHER: &str = "iqn.2026-11.org.tandem:node-b";
const THIRD: &str = "iqn.2026-11.org.tandem:node-c";
const STRANGER: &str = "iqn.2026-11.org.tandem:fenced";
const HOLDER_KEY: &str = "0xa1";
const OTHER_KEY: &str = "0xb2";
const THIRD_KEY: &str = "0xc3";
/// WRITE EXCLUSIVE - REGISTRANTS ONLY.
const TYPE_WERO: &str = "5";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Builds `tests/tools/iscsi-pr.c` against libiscsi into `dir`.
fn build_client(dir: &Path) -> PathBuf {
    let cc = tests::require_tool("cc", "gcc");
    assert!(
        Path::new("/usr/include/iscsi/iscsi.h").is_file(),
        "the PR client needs libiscsi's headers: apt-get install -y libiscsi-dev"
    );
    let source = tests::workspace_root().join("tests/tools/iscsi-pr.c");
    let out = dir.join("iscsi-pr");
    let output = run_with_timeout(
        Command::new(cc).args(["-O1", "-Wall", "-o"]).arg(&out).arg(&source).arg("-liscsi"),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "building {}: {}", source.display(), text(&output));
    out
}

struct Client {
    binary: PathBuf,
}

impl Client {
    /// Runs one iscsi-pr command as `initiator` (ISID qualifier 1) and returns its stdout.
    fn run(&self, initiator: &str, url: &str, args: &[&str]) -> String {
        let output = run_with_timeout(
            Command::new(&self.binary).args(["-i", initiator, "-s", "1", url]).args(args),
            COMMAND_TIMEOUT,
        );
        assert!(output.status.success(), "iscsi-pr {args:?} as {initiator}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// (generation, set of keys) from READ KEYS.
    fn read_keys(&self, url: &str) -> (u32, BTreeSet<String>) {
        let line = self.run(STRANGER, url, &["read-keys"]);
        let generation = field(&line, "generation=").parse().expect("generation");
        let keys =
            field(&line, "keys=").split(',').filter(|k| !k.is_empty()).map(str::to_owned).collect();
        (generation, keys)
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn keys(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|k| (*k).to_owned()).collect()
}

/// libiscsi's persistent-reservation tests (PR IN and OUT families) through `url`; returns
/// the tool's totals line.
fn pr_conformance(url: &str) -> String {
    let tool = tests::require_tool("iscsi-test-cu", "libiscsi-bin");
    let output = run_with_timeout(
        Command::new(tool).args(["-d", "-t", "SCSI.Pr*", url]),
        Duration::from_secs(300),
    );
    let log = text(&output);
    let totals = log
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .unwrap_or_else(|| panic!("iscsi-test-cu did not finish:\n{log}"))
        .trim()
        .to_owned();
    // "tests  <total> <ran> <passed> <failed> ..."
    let numbers: Vec<u64> =
        totals.split_whitespace().skip(1).filter_map(|n| n.parse().ok()).collect();
    assert!(numbers.len() >= 4, "unexpected totals line {totals:?}");
    assert!(numbers[1] >= 20, "too few PR tests ran: {totals}\n{log}");
    assert_eq!(numbers[3], 0, "PR conformance failures through {url}:\n{log}");
    println!("iscsi-test-cu -t 'SCSI.Pr*' {url}: {totals}");
    totals
}

#[test]
fn reservations_survive_failover_restart_and_switch_back() {
    tests::require_slow!();
    let cluster = StoragePair::new(VOLUME_BYTES);
    let client = Client { binary: build_client(cluster.dir.path()) };
    let mut alpha = cluster.start(0);
    let mut beta = cluster.start(1);
    cluster.bring_up(0);
    let (a, b) = (cluster.url(0), cluster.url(1));

    // libiscsi's PR suite through the replicated LUN (it clears what it registers), on the
    // primary's port and on the secondary's (forwarded to the primary's logical unit).
    pr_conformance(&a);
    let forwarding = tests::wait_until(Duration::from_secs(20), || {
        client.run(STRANGER, &b, &["rtpg"]).contains("group=2 state=1")
    });
    assert!(forwarding, "beta's port never became a remote port of alpha's logical unit");
    pr_conformance(&b);

    // What a replicated PERSISTENT RESERVE OUT costs (each one a replicated FUA write).
    println!(
        "PR OUT REGISTER through alpha: {}",
        client.run(STRANGER, &a, &["bench-register", "200", "0x77"])
    );

    // Two initiators register, the holder reserves (WERO), through alpha.
    assert_eq!(client.run(HOLDER, &a, &["register", HOLDER_KEY]), "status=GOOD");
    assert_eq!(client.run(OTHER, &a, &["register", OTHER_KEY]), "status=GOOD");
    assert_eq!(client.run(HOLDER, &a, &["reserve", HOLDER_KEY, TYPE_WERO]), "status=GOOD");
    let (generation_before, keys_before) = client.read_keys(&a);
    assert_eq!(keys_before, keys(&[HOLDER_KEY, OTHER_KEY]));
    let reservation = format!("key={HOLDER_KEY} type={TYPE_WERO}");
    assert!(client.run(OTHER, &a, &["read-reservation"]).ends_with(&reservation));
    assert_eq!(client.run(STRANGER, &a, &["write", "8"]), "status=RESERVATION_CONFLICT");
    assert_eq!(client.run(HOLDER, &a, &["write", "8"]), "status=GOOD");

    // kill -9 the primary, promote the secondary.
    alpha.kill9();
    cluster.promote_after_peer_death(1);
    beta.wait_for_log("persistent reservations loaded", Duration::from_secs(10));

    let (generation_after, keys_after) = client.read_keys(&b);
    assert_eq!(keys_after, keys_before, "the same keys through the new primary");
    assert!(
        generation_after >= generation_before,
        "PRgeneration went back: {generation_before} -> {generation_after}"
    );
    let line = client.run(OTHER, &b, &["read-reservation"]);
    assert!(line.ends_with(&reservation), "holder and type after failover: {line}");
    assert_eq!(client.run(STRANGER, &b, &["write", "8"]), "status=RESERVATION_CONFLICT");
    assert_eq!(client.run(HOLDER, &b, &["write", "8"]), "status=GOOD");
    assert_eq!(client.run(OTHER, &b, &["write", "16"]), "status=GOOD", "a registrant under WERO");
    // The new primary's port group is active/optimized, the dead one's standby.
    let groups = client.run(STRANGER, &b, &["rtpg"]);
    println!("REPORT TARGET PORT GROUPS through beta after failover:\n{groups}");
    assert!(groups.lines().any(|l| l.starts_with("group=2 state=0 pref=1")), "{groups}");
    assert!(groups.lines().any(|l| l.starts_with("group=1 state=2")), "{groups}");

    // A change on the new primary while alpha is away: a third initiator registers.
    assert_eq!(client.run(THIRD, &b, &["register", THIRD_KEY]), "status=GOOD");
    let (generation_changed, keys_changed) = client.read_keys(&b);
    assert_eq!(keys_changed, keys(&[HOLDER_KEY, OTHER_KEY, THIRD_KEY]));
    assert!(generation_changed > generation_after);

    // A restart of the new primary keeps it (read back from the replicated device).
    beta.kill9();
    let mut beta = cluster.start(1);
    // Alone after a crash its disk is Consistent, not UpToDate: DRBD's operator forces.
    cluster.adm(1, &["primary", "--force", "r0"]);
    beta.wait_for_log("persistent reservations loaded", Duration::from_secs(10));
    assert_eq!(client.read_keys(&b), (generation_changed, keys_changed.clone()));

    // alpha comes back as secondary, resyncs, and takes over again.
    let _alpha = cluster.start(0);
    cluster.adm(0, &["wait-sync", "--timeout", "60", "r0"]);
    cluster.adm(1, &["secondary", "r0"]);
    cluster.adm(0, &["primary", "r0"]);
    assert_eq!(client.read_keys(&a), (generation_changed, keys_changed));
    assert!(client.run(STRANGER, &a, &["read-reservation"]).ends_with(&reservation));
    assert_eq!(client.run(STRANGER, &a, &["write", "8"]), "status=RESERVATION_CONFLICT");
    assert_eq!(client.run(HOLDER, &a, &["write", "8"]), "status=GOOD");

    // Clear everything, then the suite again through the node that failed over twice.
    assert_eq!(client.run(HOLDER, &a, &["release", HOLDER_KEY, TYPE_WERO]), "status=GOOD");
    assert_eq!(client.run(HOLDER, &a, &["register", "0"]), "status=GOOD");
    assert_eq!(client.run(OTHER, &a, &["register", "0"]), "status=GOOD");
    // The third initiator registered through beta's port; alpha's takeover extended it to
    // alpha's port. It unregisters both: through beta's port (forwarded to alpha's logical
    // unit once beta forwards again) and through alpha's.
    let forwarding = tests::wait_until(Duration::from_secs(20), || {
        client.run(STRANGER, &b, &["rtpg"]).contains("group=2 state=1")
    });
    assert!(forwarding, "beta's port never forwarded to alpha again");
    assert_eq!(client.run(THIRD, &b, &["register", "0"]), "status=GOOD");
    assert_eq!(client.run(THIRD, &a, &["register", "0"]), "status=GOOD");
    pr_conformance(&a);
}
