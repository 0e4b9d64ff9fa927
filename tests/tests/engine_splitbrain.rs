//! Split brain and peer authentication between two real replication engines
//! (`tandem-replica`) over loopback TCP with file backing.
//!
//! Every split-brain case starts from a synced pair with node a primary, disconnects both
//! sides (each StandAlone), writes on a (blocks 0..30, generation 2) and, in most cases, on b
//! after promoting it there (blocks 40..50, generation 3), demotes both and reconnects. Then,
//! by the after-sb-0pri policy both run with:
//! - `disconnect`: both stay StandAlone and report split brain; `connect --discard-my-data` on
//!   the victim resyncs only the blocks either side changed (the union of both bitmaps: 40);
//! - `discard-least-changes` / `discard-younger-primary`: b (fewer changes, promoted after the
//!   split) is discarded automatically; `discard-older-primary`: a is;
//! - `discard-zero-changes`: with only a having written it resolves by itself; with both
//!   having written it disconnects.
//!
//! In each case the victim ends byte-for-byte equal to the survivor on every block touched,
//! and the number of blocks resynced is counted.
//!
//! Authentication: a peer with a wrong `shared-secret` never connects (and the refusal is
//! logged with its reason); with the right secret it connects.
//!
//! Run: `TANDEM_SLOW_TESTS=1 cargo test -p tests --test engine_splitbrain -- --nocapture`

use std::path::Path;
use std::time::Duration;

use tests::replica::{Node, Replica, loopback_pair};

const LONG: Duration = Duration::from_secs(30);

/// `check` needs the primary role (reads are served by a primary).
fn check_as_primary(replica: &mut Replica, ranges: &[(u64, u64, u64)]) {
    replica.promote();
    for (first, count, generation) in ranges {
        let reply = replica.cmd(&format!("check {first} {count} {generation}"), LONG);
        assert_eq!(reply, "ok", "{}: blocks {first}+{count} gen {generation}", replica.name());
    }
    replica.ok("secondary", LONG);
}

/// The pair on loopback, 16 MiB each.
fn pair(dir: &Path) -> (Node, Node) {
    loopback_pair(dir, 16 * 1024 * 1024)
}

/// Who keeps its data after the reconnect.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Resolved automatically: the named node is the victim.
    Victim(char),
    /// Not a split brain at all: only a wrote, b resyncs a's blocks.
    PlainResync,
    /// Stays StandAlone with split brain reported; b is then discarded by hand.
    StandAlone,
}

/// Runs one scenario; returns the blocks the victim received by resync.
fn split_brain_case(policy: &str, b_writes: bool, expect: Expect) -> u64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (node_a, node_b) = pair(dir.path());
    let flags = ["--after-sb-0pri", policy];
    let mut a = Replica::start("a", &node_a, dir.path(), &flags);
    let mut b = Replica::start("b", &node_b, dir.path(), &flags);
    a.ok("wait-connected 20000", LONG);
    a.ok("new-current-uuid", LONG);
    a.ok("primary", LONG);
    a.ok("write 0 64 1", LONG);
    a.ok("flush", LONG);
    b.ok("wait-synced 20000", LONG);

    // The split: each side leaves the other (StandAlone), then both write apart.
    a.ok("disconnect 1", LONG);
    b.ok("disconnect 0", LONG);
    a.ok("write 0 30 2", LONG);
    a.ok("secondary", LONG);
    if b_writes {
        b.promote();
        b.ok("write 40 10 3", LONG);
        b.ok("secondary", LONG);
    }
    a.ok("connect 1", LONG);
    b.ok("connect 0", LONG);

    let (victim_received, survivor_sent) = match expect {
        Expect::StandAlone => {
            a.wait_status_containing(&["peer1=StandAlone", "split_brain=true"], LONG);
            b.wait_status_containing(&["peer0=StandAlone", "split_brain=true"], LONG);
            // It stays so: nothing is merged behind the operator's back.
            std::thread::sleep(Duration::from_millis(500));
            a.wait_status_containing(&["peer1=StandAlone"], LONG);
            // Manual recovery: b discards its changes.
            b.ok("connect 0 --discard-my-data", LONG);
            a.ok("connect 1", LONG);
            b.ok("wait-synced 20000", LONG);
            a.ok("wait-synced 20000", LONG);
            (b.status_field("resync_received"), a.status_field("resync_sent"))
        }
        Expect::PlainResync | Expect::Victim('b') => {
            b.ok("wait-synced 20000", LONG);
            a.ok("wait-synced 20000", LONG);
            (b.status_field("resync_received"), a.status_field("resync_sent"))
        }
        Expect::Victim(_) => {
            a.ok("wait-synced 20000", LONG);
            b.ok("wait-synced 20000", LONG);
            (a.status_field("resync_received"), b.status_field("resync_sent"))
        }
    };
    assert_eq!(victim_received, survivor_sent, "{policy}: blocks sent and received differ");
    // Both replicas hold the survivor's data on every block either side touched.
    let survivor_view: Vec<(u64, u64, u64)> = match expect {
        Expect::Victim('a') => vec![(0, 30, 1), (30, 10, 1), (40, 10, 3), (50, 14, 1)],
        _ => vec![(0, 30, 2), (30, 34, 1)],
    };
    check_as_primary(&mut a, &survivor_view);
    check_as_primary(&mut b, &survivor_view);
    let a_log = a.log_text();
    let resolved = a_log.contains("SplitBrainResolved");
    assert_eq!(resolved, matches!(expect, Expect::Victim(_)), "{policy}: log:\n{a_log}");
    victim_received
}

#[test]
fn split_brain_policies_resolve_or_refuse_and_resync_only_changed_blocks() {
    tests::require_slow!();
    let rows = [
        // (after-sb-0pri, b writes too, expected outcome, blocks resynced)
        ("disconnect", true, Expect::StandAlone, 40),
        ("discard-least-changes", true, Expect::Victim('b'), 40),
        ("discard-younger-primary", true, Expect::Victim('b'), 40),
        ("discard-older-primary", true, Expect::Victim('a'), 40),
        ("discard-zero-changes", false, Expect::PlainResync, 30),
        ("discard-zero-changes", true, Expect::StandAlone, 40),
    ];
    for (policy, b_writes, expect, blocks) in rows {
        let received = split_brain_case(policy, b_writes, expect);
        println!(
            "after-sb-0pri {policy}, b wrote: {b_writes}: {expect:?}, victim resynced {received} \
             of 4096 blocks (a changed 30, b changed {})",
            if b_writes { 10 } else { 0 }
        );
        assert_eq!(received, blocks, "{policy}: only the changed blocks travel");
    }
}

#[test]
fn a_wrong_shared_secret_never_connects() {
    tests::require_slow!();
    let dir = tempfile::tempdir().expect("temp dir");
    let (node_a, node_b) = pair(dir.path());
    let right = ["--cram-hmac-alg", "sha256", "--shared-secret", "correct horse"];
    let wrong = ["--cram-hmac-alg", "sha256", "--shared-secret", "battery staple"];
    let mut a = Replica::start("a", &node_a, dir.path(), &right);
    let mut b = Replica::start("b", &node_b, dir.path(), &wrong);
    let reply = a.cmd("wait-connected 3000", LONG);
    assert!(!reply.starts_with("ok"), "connected with a wrong secret: {reply}");
    let status = a.status();
    assert!(status.contains("peer1=Connecting/Off/DUnknown"), "{status}");
    let status = b.status();
    assert!(status.contains("peer0=Connecting/Off/DUnknown"), "{status}");
    // Both sides say why, and keep retrying (more than one refusal each).
    for replica in [&a, &b] {
        let log = replica.log_text();
        let refusals = log.matches("peer authentication failed").count();
        assert!(refusals >= 2, "{}: {refusals} refusals logged:\n{log}", replica.name());
    }
    assert!(a.log_text().contains("shared-secret differs"), "{}", a.log_text());
    // No secret at all is refused too (a mismatch of cram-hmac-alg).
    drop(b);
    let b = Replica::start("b-none", &node_b, dir.path(), &[]);
    let reply = a.cmd("wait-connected 2000", LONG);
    assert!(!reply.starts_with("ok"), "connected without a secret: {reply}");
    assert!(b.log_text().contains("algorithms differ"), "{}", b.log_text());
    // The right secret connects.
    drop(b);
    let mut b = Replica::start("b-right", &node_b, dir.path(), &right);
    a.ok("wait-connected 20000", LONG);
    a.ok("new-current-uuid", LONG);
    b.ok("wait-synced 20000", LONG);
}
