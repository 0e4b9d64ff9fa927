//! Cluster-wide promotion through the driver (`ReplicatedDevice::promote`): with quorum on, a
//! promotion asks the connected peers first and the caller waits for the outcome. A second
//! promotion asked while the first one waits for its peers is refused at once
//! (`StateError::PromotionPending`) instead of asking again; the first one commits, and the
//! peer then refuses to become a second primary.

mod common;

use common::driver::{sidecar_config, start_pair, wait_connected};
use drbd_engine::driver::{DeviceError, DriverConfig};
use drbd_engine::protocol::quorum::{QuorumConfig, QuorumPolicy};
use drbd_engine::protocol::{Role, StateError};

const SIZE_BYTES: u64 = 4 * 1024 * 1024;

#[test]
fn a_second_promote_while_the_peers_are_asked_is_refused_and_the_first_commits() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [common::driver::free_port(), common::driver::free_port()];
    let config = |node: u8| DriverConfig {
        quorum: QuorumConfig { quorum: QuorumPolicy::Majority, ..Default::default() },
        ..sidecar_config(dir.path(), node, ports, SIZE_BYTES)
    };
    // One thread: both calls below are queued before the driver task runs, so they reach the
    // engine in one round, while the peer's answer to the first cannot have arrived yet.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let devices = start_pair(config).await;
        wait_connected(&devices).await;
        devices[0].new_current_uuid_clear_bitmap().await.unwrap();

        let (first, second) = tokio::join!(devices[0].promote(false), devices[0].promote(false));
        assert!(first.is_ok(), "the first promotion commits: {first:?}");
        assert!(
            matches!(second, Err(DeviceError::State(StateError::PromotionPending))),
            "the second is refused while the first waits for its peer: {second:?}"
        );
        assert_eq!(devices[0].status().await.unwrap().role, Role::Primary);

        // The peer granted the first promotion: it does not become a second primary.
        let refused = devices[1].promote(false).await;
        assert!(refused.is_err(), "the peer of a primary is not promoted: {refused:?}");
        assert_eq!(devices[1].status().await.unwrap().role, Role::Secondary);

        // Once node 0 stepped down and node 1 heard of it (its role, then its quorum report
        // naming no primary: a frame behind, so the first attempts may still be refused),
        // node 1's promotion asks node 0 and commits.
        devices[0].demote().await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(e) = devices[1].promote(false).await {
            assert!(
                matches!(e, DeviceError::State(StateError::PeerIsPrimary(_))),
                "only the report of the old primary may hold it up: {e}"
            );
            assert!(std::time::Instant::now() < deadline, "node 1 never saw node 0 demoted");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(devices[1].status().await.unwrap().role, Role::Primary);
        assert_eq!(devices[0].status().await.unwrap().role, Role::Secondary);
    });
}
