//! Placement: filter the registered storage nodes, weigh the survivors, pick one node per
//! replica (never two replicas on one node). Pure: the registry's view and `now` come in.

use crate::constants::{HEARTBEAT_TIMEOUT_MS_MAX, REPLICA_COUNT_MAX};
use crate::model::Node;
use std::collections::BTreeMap;

/// Replication settings a volume type's extra specs ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replication {
    pub replica_count: u32,
    /// DRBD's protocol letter: A (async), B (memory sync), C (sync).
    pub protocol: char,
}

pub const SPEC_REPLICA_COUNT: &str = "tandem:replica_count";
pub const SPEC_PROTOCOL: &str = "tandem:protocol";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{SPEC_REPLICA_COUNT} must be an integer from 1 to {REPLICA_COUNT_MAX}, not {0:?}")]
    ReplicaCount(String),
    #[error("{SPEC_PROTOCOL} must be A, B or C, not {0:?}")]
    Protocol(String),
}

/// Checks one extra spec; unknown keys are accepted and ignored, as Cinder does.
pub fn validate_spec(key: &str, value: &str) -> Result<(), SpecError> {
    match key {
        SPEC_REPLICA_COUNT => match value.trim().parse::<u32>() {
            Ok(n) if (1..=REPLICA_COUNT_MAX).contains(&n) => Ok(()),
            _ => Err(SpecError::ReplicaCount(value.into())),
        },
        SPEC_PROTOCOL => match value.trim() {
            "A" | "B" | "C" => Ok(()),
            _ => Err(SpecError::Protocol(value.into())),
        },
        _ => Ok(()),
    }
}

/// The replication a type's extra specs ask for, falling back to `default_replica_count` and
/// protocol C.
pub fn replication(specs: &BTreeMap<String, String>, default_replica_count: u32) -> Replication {
    let replica_count = specs
        .get(SPEC_REPLICA_COUNT)
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| (1..=REPLICA_COUNT_MAX).contains(n))
        .unwrap_or(default_replica_count);
    let protocol = specs
        .get(SPEC_PROTOCOL)
        .and_then(|v| v.trim().chars().next())
        .filter(|c| matches!(c, 'A' | 'B' | 'C'))
        .unwrap_or('C');
    Replication { replica_count, protocol }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("No valid backend was found. {0}")]
pub struct NoValidBackend(pub String);

/// True when the node heartbeated recently enough to take work.
pub fn is_up(node: &Node, now_ms: u64) -> bool {
    now_ms.saturating_sub(node.heartbeat_ms) <= HEARTBEAT_TIMEOUT_MS_MAX
}

/// Picks `replica_count` distinct nodes for a volume of `size_bytes`, the primary first:
/// filters (enabled, up, in the zone, room for the volume), then weighs by free capacity
/// (most free first; name breaks ties so placement is deterministic).
pub fn choose(
    nodes: &[Node],
    now_ms: u64,
    size_bytes: u64,
    replica_count: u32,
    availability_zone: Option<&str>,
) -> Result<Vec<String>, NoValidBackend> {
    assert!((1..=REPLICA_COUNT_MAX).contains(&replica_count));
    let mut candidates: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.enabled)
        .filter(|n| is_up(n, now_ms))
        .filter(|n| availability_zone.is_none_or(|az| n.availability_zone == az))
        .filter(|n| n.free_bytes >= size_bytes)
        .collect();
    candidates.sort_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then_with(|| a.name.cmp(&b.name)));
    candidates.dedup_by(|a, b| a.name == b.name);
    let wanted = usize::try_from(replica_count).unwrap_or(usize::MAX);
    if candidates.len() < wanted {
        return Err(NoValidBackend(format!(
            "{} of {} nodes can hold {} bytes in zone {}; {} replicas needed.",
            candidates.len(),
            nodes.len(),
            size_bytes,
            availability_zone.unwrap_or("(any)"),
            replica_count
        )));
    }
    let chosen: Vec<String> = candidates[..wanted].iter().map(|n| n.name.clone()).collect();
    assert!(chosen.iter().enumerate().all(|(i, a)| chosen[i + 1..].iter().all(|b| a != b)));
    Ok(chosen)
}

/// The diskless tiebreaker of a volume placed on `chosen`: with exactly two replicas, a
/// third node (enabled, up, in the zone; it needs no room, it holds no data) gives the
/// resource a quorum majority so a surviving replica promotes itself. The node with the most
/// free space is taken (name breaks ties). `None`: only two nodes, failover stays manual.
pub fn choose_tiebreaker(
    nodes: &[Node],
    now_ms: u64,
    chosen: &[String],
    availability_zone: Option<&str>,
) -> Option<String> {
    if chosen.len() != 2 {
        return None;
    }
    nodes
        .iter()
        .filter(|n| n.enabled && is_up(n, now_ms))
        .filter(|n| availability_zone.is_none_or(|az| n.availability_zone == az))
        .filter(|n| !chosen.contains(&n.name))
        .min_by(|a, b| b.free_bytes.cmp(&a.free_bytes).then_with(|| a.name.cmp(&b.name)))
        .map(|n| n.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, az: &str, free_gib: u64, heartbeat_ms: u64, enabled: bool) -> Node {
        Node {
            name: name.into(),
            url: format!("http://{name}"),
            availability_zone: az.into(),
            total_bytes: 100 << 30,
            free_bytes: free_gib << 30,
            heartbeat_ms,
            enabled,
        }
    }

    #[test]
    fn filters_and_weighs() {
        let now = 1_000_000;
        let nodes = vec![
            node("a", "nova", 10, now, true),
            node("b", "nova", 50, now, true),
            node("c", "nova", 30, now, true),
            node("down", "nova", 99, now - HEARTBEAT_TIMEOUT_MS_MAX - 1, true),
            node("off", "nova", 99, now, false),
            node("elsewhere", "az2", 98, now, true),
        ];
        assert_eq!(choose(&nodes, now, 1 << 30, 2, Some("nova")), Ok(vec!["b".into(), "c".into()]));
        assert_eq!(
            choose(&nodes, now, 20 << 30, 2, Some("nova")),
            Ok(vec!["b".into(), "c".into()])
        );
        assert!(choose(&nodes, now, 40 << 30, 2, Some("nova")).is_err());
        assert_eq!(choose(&nodes, now, 1 << 30, 1, None), Ok(vec!["elsewhere".into()]));
        assert!(choose(&nodes, now, 1 << 30, 3, Some("az2")).is_err());
        assert_eq!(choose(&nodes, now, 1 << 30, 3, Some("nova")).unwrap().len(), 3);
    }

    #[test]
    fn a_third_node_becomes_the_tiebreaker_of_two_replicas() {
        let now = 1_000_000;
        let mut nodes = vec![
            node("a", "nova", 10, now, true),
            node("b", "nova", 50, now, true),
            node("c", "nova", 30, now, true),
            node("down", "nova", 99, now - HEARTBEAT_TIMEOUT_MS_MAX - 1, true),
            node("off", "nova", 99, now, false),
            node("elsewhere", "az2", 98, now, true),
        ];
        let pair = ["b".to_owned(), "c".to_owned()];
        assert_eq!(choose_tiebreaker(&nodes, now, &pair, Some("nova")), Some("a".into()));
        // A full node still votes: a tiebreaker holds no data.
        nodes[0].free_bytes = 0;
        assert_eq!(choose_tiebreaker(&nodes, now, &pair, Some("nova")), Some("a".into()));
        // Only two usable nodes, or three replicas already: none.
        nodes[0].enabled = false;
        assert_eq!(choose_tiebreaker(&nodes, now, &pair, Some("nova")), None);
        let three = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(choose_tiebreaker(&nodes, now, &three, None), None);
    }

    #[test]
    fn never_two_replicas_on_one_node() {
        let now = 5;
        let nodes = vec![node("a", "nova", 10, now, true), node("a", "nova", 10, now, true)];
        assert!(choose(&nodes, now, 1, 2, None).is_err());
    }

    #[test]
    fn extra_specs() {
        let specs = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(replication(&specs(&[]), 2), Replication { replica_count: 2, protocol: 'C' });
        assert_eq!(
            replication(&specs(&[(SPEC_REPLICA_COUNT, "3"), (SPEC_PROTOCOL, "A")]), 2),
            Replication { replica_count: 3, protocol: 'A' }
        );
        assert!(validate_spec(SPEC_REPLICA_COUNT, "0").is_err());
        assert!(validate_spec(SPEC_REPLICA_COUNT, "4").is_err());
        assert!(validate_spec(SPEC_PROTOCOL, "D").is_err());
        assert!(validate_spec("volume_backend_name", "anything").is_ok());
    }
}
