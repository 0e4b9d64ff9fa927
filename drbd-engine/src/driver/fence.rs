//! The `fence-peer` handler (DRBD's `handlers { fence-peer "CMD"; }`): when a primary with
//! fencing loses a peer that may hold UpToDate data, the state machine freezes I/O and asks for
//! the peer to be fenced (`Event::FencePeer`); the driver runs the handler and reports its exit
//! code back (`Node::handle_fence_outcome`).
//!
//! As DRBD, the command runs through `/bin/sh -c` with the resource and the peer in its
//! environment (`DRBD_RESOURCE`, `DRBD_PEER_NODE_ID`, `DRBD_PEER_ADDRESS`, `DRBD_PEER_AF`,
//! `DRBD_MY_NODE_ID`, `DRBD_MY_ADDRESS`, `DRBD_MY_AF`, `DRBD_VOLUME`), and its exit code says
//! what happened to the peer: 3 its disk is Inconsistent, 4 it is now Outdated, 5 unreachable,
//! 6 it refused because it is Primary, 7 it was shot (STONITH); anything else means the handler
//! is broken and I/O stays frozen. Unlike DRBD, a handler that does not answer within its
//! timeout is killed and counts as broken, so a hung script is visible in the log instead of an
//! unexplained freeze.

use crate::NodeId;
use crate::protocol::FenceOutcome;
use std::net::SocketAddr;
use std::time::Duration;

/// How to run the handler; set with `ReplicatedDevice::set_fence_handler`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceHandler {
    /// The shell command, as in drbd.conf.
    pub command: String,
    /// `DRBD_RESOURCE` for the handler.
    pub resource: String,
    /// `DRBD_VOLUME` for the handler.
    pub volume: u32,
    /// After this, the handler is killed and counts as failed.
    pub timeout_ms: u64,
}

/// The verdict for an exit code (`None`: killed by a signal or not started).
pub fn outcome_of_exit_code(code: Option<i32>) -> FenceOutcome {
    match code {
        Some(3) => FenceOutcome::PeerInconsistent,
        Some(4) => FenceOutcome::PeerOutdated,
        Some(5) => FenceOutcome::PeerUnreachable,
        Some(6) => FenceOutcome::PeerIsPrimary,
        Some(7) => FenceOutcome::PeerStonithed,
        _ => FenceOutcome::Failed,
    }
}

fn address_family(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "ipv4" } else { "ipv6" }
}

/// The handler's environment, DRBD's variable names.
pub fn environment(
    handler: &FenceHandler,
    me: (NodeId, SocketAddr),
    peer: (NodeId, Option<SocketAddr>),
) -> Vec<(String, String)> {
    let mut env = vec![
        ("DRBD_RESOURCE".to_owned(), handler.resource.clone()),
        ("DRBD_VOLUME".to_owned(), handler.volume.to_string()),
        ("DRBD_MY_NODE_ID".to_owned(), me.0.0.to_string()),
        ("DRBD_MY_ADDRESS".to_owned(), me.1.ip().to_string()),
        ("DRBD_MY_AF".to_owned(), address_family(&me.1).to_owned()),
        ("DRBD_PEER_NODE_ID".to_owned(), peer.0.0.to_string()),
    ];
    if let Some(addr) = peer.1 {
        env.push(("DRBD_PEER_ADDRESS".to_owned(), addr.ip().to_string()));
        env.push(("DRBD_PEER_AF".to_owned(), address_family(&addr).to_owned()));
    }
    env
}

/// Runs the handler to its end (or its timeout) and returns the verdict.
pub async fn run(handler: FenceHandler, env: Vec<(String, String)>, peer: NodeId) -> FenceOutcome {
    let mut command = tokio::process::Command::new("/bin/sh");
    command.arg("-c").arg(&handler.command).envs(env).kill_on_drop(true);
    command.stdin(std::process::Stdio::null());
    tracing::info!(%peer, command = %handler.command, "running the fence-peer handler");
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            tracing::error!(%peer, %error, "fence-peer handler did not start; I/O stays frozen");
            return FenceOutcome::Failed;
        }
    };
    let timeout = Duration::from_millis(handler.timeout_ms);
    let code = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status.code(),
        Ok(Err(error)) => {
            tracing::error!(%peer, %error, "waiting for the fence-peer handler failed");
            None
        }
        Err(_) => {
            tracing::error!(
                %peer,
                timeout_ms = handler.timeout_ms,
                "fence-peer handler timed out; killed, I/O stays frozen"
            );
            let _ = child.kill().await;
            None
        }
    };
    let outcome = outcome_of_exit_code(code);
    tracing::info!(%peer, ?code, ?outcome, "fence-peer handler finished");
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_mean_what_they_mean_in_drbd() {
        let cases = [
            (Some(3), FenceOutcome::PeerInconsistent),
            (Some(4), FenceOutcome::PeerOutdated),
            (Some(5), FenceOutcome::PeerUnreachable),
            (Some(6), FenceOutcome::PeerIsPrimary),
            (Some(7), FenceOutcome::PeerStonithed),
            (Some(0), FenceOutcome::Failed),
            (Some(1), FenceOutcome::Failed),
            (Some(8), FenceOutcome::Failed),
            (Some(126), FenceOutcome::Failed),
            (None, FenceOutcome::Failed),
        ];
        for (code, outcome) in cases {
            assert_eq!(outcome_of_exit_code(code), outcome, "exit code {code:?}");
        }
    }

    #[test]
    fn environment_uses_drbd_names() {
        let handler = FenceHandler {
            command: "true".into(),
            resource: "r0".into(),
            volume: 0,
            timeout_ms: 1000,
        };
        let env = environment(
            &handler,
            (NodeId(0), "127.0.0.1:7789".parse().unwrap()),
            (NodeId(1), Some("[::1]:7790".parse().unwrap())),
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("DRBD_RESOURCE"), Some("r0"));
        assert_eq!(get("DRBD_PEER_NODE_ID"), Some("1"));
        assert_eq!(get("DRBD_PEER_ADDRESS"), Some("::1"));
        assert_eq!(get("DRBD_PEER_AF"), Some("ipv6"));
        assert_eq!(get("DRBD_MY_NODE_ID"), Some("0"));
        assert_eq!(get("DRBD_MY_AF"), Some("ipv4"));
    }

    #[tokio::test]
    async fn a_hung_handler_is_killed_at_its_timeout() {
        let handler = FenceHandler {
            command: "sleep 30".into(),
            resource: "r0".into(),
            volume: 0,
            timeout_ms: 200,
        };
        let start = std::time::Instant::now();
        assert_eq!(run(handler, Vec::new(), NodeId(1)).await, FenceOutcome::Failed);
        assert!(start.elapsed() < Duration::from_secs(5));
        let handler = FenceHandler {
            command: "test \"$DRBD_PEER_NODE_ID\" = 1 && exit 4".into(),
            resource: "r0".into(),
            volume: 0,
            timeout_ms: 5000,
        };
        let env = vec![("DRBD_PEER_NODE_ID".to_owned(), "1".to_owned())];
        assert_eq!(run(handler, env, NodeId(1)).await, FenceOutcome::PeerOutdated);
    }
}
