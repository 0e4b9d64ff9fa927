//! The promoter's driver: one task per resource named by a `promoter` line (node file or
//! `--promoter`), feeding the pure [`crate::promoter::Promoter`] with the engine's view and
//! carrying out what it decides (drbd-reactor's promoter, decided in pure code, acted on here).
//!
//! ```text
//! # node file
//! promoter r0 preferred-nodes alpha,beta
//! ```
//!
//! It runs only where the resource has quorum (`options { quorum majority; }` in the resource
//! file): a promotion needs quorum and a primary without it stops, so a partition never yields
//! two writers. Two-node resources without quorum fail over only by `tandemadm primary`, as
//! DRBD without fencing. A diskless tiebreaker never promotes.
//!
//! - `Action::Promote`: `primary` (never `--force`), then the services: the LUN turns ALUA
//!   active/optimized and the service IP comes up (with gratuitous ARP).
//! - `Action::Demote` (a primary that lost quorum): the services stop at once (ALUA standby,
//!   service IP removed) and the engine is asked to demote; under `on-no-quorum suspend-io`
//!   that completes only once quorum is back (or the engine steps down when it meets the new
//!   primary), under `io-error` as soon as the failed requests are out.
//! - A refusal the engine lifts by itself (a peer still reports the lost primary during its
//!   grace period, or quorum is not there yet) is retried every `DEFERRED_RETRY_MS`.

use crate::constants::{
    PROMOTER_DEMOTE_WAIT_MS_MAX, PROMOTER_POLL_INTERVAL_MS, PROMOTER_PREFERRED_NODES_MAX,
};
use crate::host::{Host, Plan};
use crate::promoter::{Action, Observation, Promoter};
use drbd_engine::driver::DeviceError;
use drbd_engine::protocol::Role;
use drbd_engine::protocol::node::StateError;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One `promoter RESOURCE [preferred-nodes NODE,NODE...]` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoterSettings {
    pub resource: String,
    /// Nodes in the order they should win (drbd-reactor's `preferred-nodes`); nodes not named
    /// come after them, ordered by their data (promotion score).
    pub preferred_nodes: Vec<String>,
}

impl PromoterSettings {
    pub fn parse(value: &str) -> Result<PromoterSettings, String> {
        let usage =
            || format!("promoter wants 'RESOURCE [preferred-nodes NODE[,NODE...]]', got '{value}'");
        let words: Vec<&str> = value.split_whitespace().collect();
        let (resource, nodes) = match words.as_slice() {
            [resource] => (*resource, ""),
            [resource, "preferred-nodes", nodes] => (*resource, *nodes),
            _ => return Err(usage()),
        };
        let preferred_nodes: Vec<String> =
            nodes.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect();
        if preferred_nodes.len() > PROMOTER_PREFERRED_NODES_MAX {
            return Err(format!(
                "promoter: more than {PROMOTER_PREFERRED_NODES_MAX} preferred nodes"
            ));
        }
        if !nodes.is_empty() && preferred_nodes.is_empty() {
            return Err(usage());
        }
        Ok(PromoterSettings { resource: resource.to_owned(), preferred_nodes })
    }
}

/// Whether a resource's services (ALUA active/optimized, service IP) run on this node: only
/// on a primary that holds quorum (always true where quorum is off).
pub fn serves(role: Role, quorum: bool) -> bool {
    role == Role::Primary && quorum
}

/// Why the promoter stays off for a resource on this node, if it does.
pub fn disabled_reason(plan: &Plan) -> Option<&'static str> {
    if plan.diskless {
        return Some("this node is diskless (a tiebreaker votes, it never promotes)");
    }
    if !plan.driver.quorum.enabled() {
        return Some(
            "the resource has no quorum (set 'options { quorum majority; }' with a third node); \
             without it only 'tandemadm primary' fails over, as DRBD without fencing",
        );
    }
    None
}

/// Refusals the engine lifts by itself, without anything changing on this node (a peer that
/// refused a cluster-wide promotion, or this node's grant to another's, ends by itself).
pub fn is_deferral(error: &DeviceError) -> bool {
    matches!(
        error,
        DeviceError::State(
            StateError::PeerIsPrimary(_)
                | StateError::NoQuorum(_)
                | StateError::PeerRefused(_)
                | StateError::PeerPromoting(_)
                | StateError::PromotionPending
        )
    )
}

/// Starts the promoter of every resource named in the node settings, and of every
/// API-created resource whose create request asked for one (`auto_promote`, recorded in
/// `STATE/resources/NAME.promoter` so a restarted tandemd keeps it).
pub fn start(host: &Arc<Host>) {
    for settings in &host.settings.promoters {
        tokio::spawn(run(host.clone(), settings.clone(), None));
    }
    let Ok(entries) = std::fs::read_dir(crate::host::api_resource_directory(&host.settings)) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some(API_PROMOTER_EXTENSION) {
            continue;
        }
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| PromoterSettings::parse(text.trim()))
        {
            Ok(settings) => start_api_promoter(host, settings),
            Err(error) => {
                tracing::error!(file = %path.display(), "unreadable promoter file: {error}")
            }
        }
    }
}

/// The file name extension of an API-created resource's promoter line.
const API_PROMOTER_EXTENSION: &str = "promoter";

/// Where an API-created resource's promoter line is kept (beside its `.res` file).
pub fn api_promoter_path(host: &Host, resource: &str) -> std::path::PathBuf {
    crate::host::api_resource_directory(&host.settings)
        .join(format!("{resource}.{API_PROMOTER_EXTENSION}"))
}

/// The running promoters of API-created resources, by host (its address: tests run several
/// hosts in one process) and resource, with the flag that stops each.
type ApiPromoters = std::collections::BTreeMap<(usize, String), Arc<AtomicBool>>;
static API_PROMOTERS: std::sync::Mutex<ApiPromoters> = std::sync::Mutex::new(ApiPromoters::new());

/// Records the promoter line of an API-created resource and starts its promoter (once: a
/// repeated create finds it running).
pub fn enable_api_promoter(host: &Arc<Host>, settings: PromoterSettings) -> std::io::Result<()> {
    let mut line = settings.resource.clone();
    if !settings.preferred_nodes.is_empty() {
        line.push_str(&format!(" preferred-nodes {}", settings.preferred_nodes.join(",")));
    }
    let path = api_promoter_path(host, &settings.resource);
    let temporary = path.with_extension("promoter.tmp");
    std::fs::write(&temporary, format!("{line}\n"))?;
    std::fs::rename(&temporary, &path)?;
    start_api_promoter(host, settings);
    Ok(())
}

fn start_api_promoter(host: &Arc<Host>, settings: PromoterSettings) {
    if host.settings.promoters.iter().any(|p| p.resource == settings.resource) {
        return; // the node file's line runs it already
    }
    let key = (Arc::as_ptr(host).addr(), settings.resource.clone());
    let mut running = API_PROMOTERS.lock().unwrap_or_else(|p| p.into_inner());
    if running.contains_key(&key) {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    running.insert(key, stop.clone());
    tokio::spawn(run(host.clone(), settings, Some(stop)));
}

/// Stops an API-created resource's promoter and forgets its line (the resource is deleted).
pub fn disable_api_promoter(host: &Arc<Host>, resource: &str) {
    let _ = std::fs::remove_file(api_promoter_path(host, resource));
    let key = (Arc::as_ptr(host).addr(), resource.to_owned());
    let stopped = API_PROMOTERS.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    if let Some(stop) = stopped {
        stop.store(true, Ordering::Release);
    }
}

async fn run(host: Arc<Host>, settings: PromoterSettings, stop: Option<Arc<AtomicBool>>) {
    let resource = settings.resource.clone();
    let mut promoter = Promoter::new(&host.node_name, &settings.preferred_nodes);
    let clock = Instant::now();
    let mut state_logged = String::new();
    let mut deferrals = 0u32;
    let demoting = Arc::new(AtomicBool::new(false));
    let mut note = |state: String| {
        if state != state_logged {
            tracing::info!(%resource, "promoter {resource}: {state}");
            state_logged = state;
        }
    };
    loop {
        tokio::time::sleep(Duration::from_millis(PROMOTER_POLL_INTERVAL_MS)).await;
        if stop.as_ref().is_some_and(|stop| stop.load(Ordering::Acquire)) {
            tracing::info!(%resource, "promoter {resource}: stopped (resource deleted)");
            return;
        }
        let Some(slot) = host.slot(&resource) else {
            note("off: not a resource of this node".into());
            continue;
        };
        match slot.plan() {
            Ok(plan) => {
                if let Some(reason) = disabled_reason(&plan) {
                    note(format!("off: {reason}"));
                    continue;
                }
            }
            Err(error) => {
                note(format!("off: {error}"));
                continue;
            }
        }
        let Some((view, status)) = host.sample(&slot).await else {
            note("waiting for 'tandemadm up'".into());
            continue;
        };
        note(format!("on (preferred nodes: {})", preferred_text(&settings)));
        let now_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        let observation = Observation {
            now_ms,
            role: view.role,
            may_promote: view.may_promote(),
            promotion_score: view.promotion_score(),
            quorum: status.quorum,
            rivals: rivals(&view),
        };
        match promoter.observe(&observation) {
            None => {}
            Some(Action::Promote) => {
                let started = Instant::now();
                match host.promote_automatically(&slot).await {
                    Ok(()) => {
                        tracing::info!(%resource,
                            "promoter {resource}: role:Primary (no Primary visible, disk:{}, \
                             quorum:yes, promotion_score:{}, {} deferred attempts; primary took \
                             {} us)",
                            status.disk, observation.promotion_score, deferrals,
                            started.elapsed().as_micros());
                        deferrals = 0;
                        promoter.promotion_finished(now_ms, true);
                    }
                    Err(error) if is_deferral(&error) => {
                        if deferrals == 0 {
                            tracing::info!(%resource,
                                "promoter {resource}: primary deferred ({error}); retrying every \
                                 {} ms", crate::promoter::DEFERRED_RETRY_MS);
                        }
                        deferrals = deferrals.saturating_add(1);
                        promoter.promotion_deferred(now_ms);
                    }
                    Err(error) => {
                        tracing::warn!(%resource, "promoter {resource}: primary refused: {error}");
                        deferrals = 0;
                        promoter.promotion_finished(now_ms, false);
                    }
                }
            }
            Some(Action::Demote { reason }) => {
                host.stop_services(&slot);
                if demoting.swap(true, Ordering::AcqRel) {
                    continue; // one demotion at a time; the services are down meanwhile
                }
                tracing::warn!(%resource,
                    "promoter {resource}: {reason} as Primary (quorum:no): services stopped (ALUA \
                     standby, service IP removed), demoting to Secondary");
                let device = slot.device();
                let done = demoting.clone();
                let name = resource.clone();
                tokio::spawn(async move {
                    demote(&name, device).await;
                    done.store(false, Ordering::Release);
                });
            }
        }
    }
}

async fn demote(resource: &str, device: Option<drbd_engine::driver::ReplicatedDevice>) {
    let Some(device) = device else { return };
    let wait = Duration::from_millis(PROMOTER_DEMOTE_WAIT_MS_MAX);
    let demotion = device.demote();
    tokio::pin!(demotion);
    let result = match tokio::time::timeout(wait, &mut demotion).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                resource,
                "promoter {resource}: still Primary after {} s: the engine holds I/O until \
                 quorum returns (on-no-quorum suspend-io), then steps down",
                wait.as_secs()
            );
            demotion.await
        }
    };
    match result {
        Ok(()) | Err(DeviceError::State(StateError::Already(_))) => {
            tracing::info!(resource, "promoter {resource}: role:Secondary")
        }
        Err(error) => tracing::warn!(resource, "promoter {resource}: secondary refused: {error}"),
    }
}

/// A connected peer that could promote as well: UpToDate data and not primary (a diskless
/// tiebreaker never can).
pub fn rivals(view: &crate::status::ResourceView) -> bool {
    use drbd_engine::protocol::{ConnectionState, DiskState};
    view.peers.iter().any(|p| {
        p.connection == ConnectionState::Connected
            && p.role != Role::Primary
            && !p.volumes.is_empty()
            && p.volumes.iter().all(|v| v.peer_disk == DiskState::UpToDate)
    })
}

fn preferred_text(settings: &PromoterSettings) -> String {
    if settings.preferred_nodes.is_empty() {
        "none".into()
    } else {
        settings.preferred_nodes.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promoter_lines_parse_or_say_what_is_wrong() {
        assert_eq!(
            PromoterSettings::parse("r0").expect("valid"),
            PromoterSettings { resource: "r0".into(), preferred_nodes: vec![] }
        );
        assert_eq!(
            PromoterSettings::parse("r0 preferred-nodes alpha,beta").expect("valid"),
            PromoterSettings {
                resource: "r0".into(),
                preferred_nodes: vec!["alpha".into(), "beta".into()]
            }
        );
        for bad in ["", "r0 alpha", "r0 preferred-nodes", "r0 preferred-nodes ,", "r0 x y z"] {
            let error = PromoterSettings::parse(bad).expect_err(bad);
            assert!(error.contains("promoter wants"), "{bad}: {error}");
        }
    }

    #[test]
    fn services_run_only_on_a_primary_with_quorum() {
        for (role, quorum, serving) in [
            (Role::Primary, true, true),
            (Role::Primary, false, false),
            (Role::Secondary, true, false),
            (Role::Secondary, false, false),
        ] {
            assert_eq!(serves(role, quorum), serving, "{role:?} quorum {quorum}");
        }
    }

    #[test]
    fn only_refusals_that_pass_by_themselves_are_deferrals() {
        use drbd_engine::NodeId;
        use drbd_engine::protocol::DiskState;
        let peer = NodeId::new(1).expect("id");
        assert!(is_deferral(&DeviceError::State(StateError::PeerIsPrimary(peer))));
        assert!(is_deferral(&DeviceError::State(StateError::NoQuorum("1 of 3".into()))));
        assert!(is_deferral(&DeviceError::State(StateError::PeerRefused(peer))));
        assert!(!is_deferral(&DeviceError::State(StateError::NoUpToDateData(DiskState::Outdated))));
        assert!(!is_deferral(&DeviceError::State(StateError::SyncTarget)));
        assert!(!is_deferral(&DeviceError::Stopped));
    }
}
