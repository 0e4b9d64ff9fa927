//! A resource's state as tandemadm shows it, and DRBD's text formats for it: the
//! `drbdadm status` tree and `drbdsetup events2` lines (exists / create / change / destroy).
//!
//! Pure: the daemon samples the engine into a [`ResourceView`]; everything here turns views
//! into text or compares two views. Formats follow drbd-utils 9: fields at their default
//! (connection:Connected, replication:Established, suspended:no) are left out of the short
//! status, the volume number is left out of a resource with the single volume 0, and every
//! resource ends with an empty line.

use drbd_engine::protocol::{ConnectionState, DiskState, ReplicationState, Role};
use std::fmt::Write;

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceView {
    pub name: String,
    pub node_id: u32,
    pub role: Role,
    pub suspended: bool,
    pub volumes: Vec<VolumeView>,
    pub peers: Vec<PeerView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeView {
    pub number: u32,
    pub minor: u32,
    pub disk: DiskState,
    pub backing_dev: String,
    pub size_kib: u64,
    pub read_kib: u64,
    pub written_kib: u64,
    /// DRBD's `quorum:` (yes also with quorum off).
    pub quorum: bool,
    /// Requests the LUN has taken and not yet answered.
    pub upper_pending: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub name: String,
    pub node_id: u32,
    pub connection: ConnectionState,
    /// The peer's role when the engine reports it; shown as `Unknown` otherwise.
    pub role: Role,
    pub volumes: Vec<PeerVolumeView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerVolumeView {
    pub number: u32,
    pub replication: ReplicationState,
    pub peer_disk: DiskState,
    pub out_of_sync_kib: u64,
    /// Resync progress in percent while a resync runs.
    pub done_percent: Option<f64>,
    pub received_kib: u64,
    pub sent_kib: u64,
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

impl ResourceView {
    fn single_volume_zero(&self) -> bool {
        self.volumes.len() == 1 && self.volumes[0].number == 0
    }

    fn any_peer_primary(&self) -> bool {
        self.peers.iter().any(|p| p.role == Role::Primary)
    }

    /// Whether `primary` (without --force) would be accepted, as events2's may_promote says.
    pub fn may_promote(&self) -> bool {
        self.role == Role::Secondary
            && !self.any_peer_primary()
            && !self.volumes.is_empty()
            && self.volumes.iter().all(|v| v.disk == DiskState::UpToDate)
    }

    /// Like DRBD's promotion_score: 0 when promotion is impossible, higher for better data and
    /// more connected UpToDate peers (drbd-reactor's promoter compares it across nodes).
    pub fn promotion_score(&self) -> u32 {
        if self.volumes.is_empty() || self.any_peer_primary() {
            return 0;
        }
        let worst = self.volumes.iter().map(|v| v.disk).min().unwrap_or(DiskState::Diskless);
        let base = match worst {
            DiskState::UpToDate => 10_100,
            DiskState::Consistent => 10_000,
            _ => return 0,
        };
        let peers_up = self
            .peers
            .iter()
            .filter(|p| {
                p.connection == ConnectionState::Connected
                    && p.volumes.iter().all(|v| v.peer_disk == DiskState::UpToDate)
            })
            .count();
        base + u32::try_from(peers_up).unwrap_or(u32::MAX - base).min(99)
    }
}

fn done(percent: f64) -> String {
    format!("done:{percent:.2}")
}

fn is_syncing(replication: ReplicationState) -> bool {
    matches!(
        replication,
        ReplicationState::SyncSource
            | ReplicationState::SyncTarget
            | ReplicationState::PausedSyncS
            | ReplicationState::PausedSyncT
            | ReplicationState::VerifyS
            | ReplicationState::VerifyT
    )
}

/// `drbdadm status` for one resource, ending with the empty line drbd-utils prints.
pub fn format_status(view: &ResourceView, verbose: bool, statistics: bool) -> String {
    let mut out = String::new();
    let show_volume = verbose || !view.single_volume_zero();
    if verbose {
        let _ = write!(
            out,
            "{} node-id:{} role:{} suspended:{}",
            view.name,
            view.node_id,
            view.role,
            if view.suspended { "user" } else { "no" }
        );
    } else {
        let _ = write!(out, "{} role:{}", view.name, view.role);
        if view.suspended {
            out.push_str(" suspended:user");
        }
    }
    out.push('\n');
    if statistics {
        out.push_str("    write-ordering:flush\n");
    }
    for volume in &view.volumes {
        out.push_str("  ");
        if show_volume {
            let _ = write!(out, "volume:{} ", volume.number);
        }
        if verbose {
            let _ = write!(out, "minor:{} ", volume.minor);
        }
        let _ = write!(out, "disk:{}", volume.disk);
        // As drbdsetup: `quorum:no` whenever it is lost, `quorum:yes` only when verbose.
        if !volume.quorum {
            out.push_str(" quorum:no");
        } else if verbose {
            out.push_str(" quorum:yes");
        }
        out.push('\n');
        if statistics {
            let _ = writeln!(
                out,
                "      size:{} read:{} written:{} al-writes:0 bm-writes:0 upper-pending:{} \
                 lower-pending:0 al-suspended:no blocked:no",
                volume.size_kib, volume.read_kib, volume.written_kib, volume.upper_pending
            );
        }
    }
    for peer in &view.peers {
        let _ = write!(out, "  {}", peer.name);
        if verbose {
            let _ = write!(
                out,
                " node-id:{} connection:{} role:{} congested:no ap-in-flight:0 rs-in-flight:0",
                peer.node_id, peer.connection, peer.role
            );
        } else if peer.connection == ConnectionState::Connected {
            let _ = write!(out, " role:{}", peer.role);
        } else {
            let _ = write!(out, " connection:{}", peer.connection);
        }
        out.push('\n');
        if !verbose && peer.connection != ConnectionState::Connected && !statistics {
            // drbd-utils shows no peer devices for a peer it is not connected to.
            continue;
        }
        for volume in &peer.volumes {
            let mut fields = Vec::new();
            if show_volume {
                fields.push(format!("volume:{}", volume.number));
            }
            if verbose || volume.replication != ReplicationState::Established {
                fields.push(format!("replication:{}", volume.replication));
            }
            fields.push(format!("peer-disk:{}", volume.peer_disk));
            if let Some(percent) = volume.done_percent.filter(|_| is_syncing(volume.replication)) {
                fields.push(done(percent));
            }
            if verbose {
                fields.push("resync-suspended:no".into());
            }
            let _ = writeln!(out, "    {}", fields.join(" "));
            if statistics {
                let _ = writeln!(
                    out,
                    "        received:{} sent:{} out-of-sync:{} pending:0 unacked:0",
                    volume.received_kib, volume.sent_kib, volume.out_of_sync_kib
                );
            }
        }
    }
    out.push('\n');
    out
}

fn resource_fields(view: &ResourceView, statistics: bool) -> String {
    let mut line = format!(
        "name:{} role:{} suspended:{} force-io-failures:no may_promote:{} promotion_score:{}",
        view.name,
        view.role,
        if view.suspended { "user" } else { "no" },
        yes_no(view.may_promote()),
        view.promotion_score()
    );
    if statistics {
        line.push_str(" write-ordering:flush");
    }
    line
}

fn connection_fields(view: &ResourceView, peer: &PeerView) -> String {
    format!(
        "name:{} peer-node-id:{} conn-name:{} connection:{} role:{}",
        view.name, peer.node_id, peer.name, peer.connection, peer.role
    )
}

fn device_prefix(view: &ResourceView, volume: &VolumeView) -> String {
    format!("name:{} volume:{} minor:{}", view.name, volume.number, volume.minor)
}

fn device_statistics(volume: &VolumeView) -> String {
    format!(
        " size:{} read:{} written:{} al-writes:0 bm-writes:0 upper-pending:{} lower-pending:0 \
         al-suspended:no blocked:no",
        volume.size_kib, volume.read_kib, volume.written_kib, volume.upper_pending
    )
}

fn peer_device_prefix(view: &ResourceView, peer: &PeerView, volume: &PeerVolumeView) -> String {
    format!(
        "name:{} peer-node-id:{} conn-name:{} volume:{}",
        view.name, peer.node_id, peer.name, volume.number
    )
}

fn peer_device_statistics(volume: &PeerVolumeView) -> String {
    format!(
        " received:{} sent:{} out-of-sync:{} pending:0 unacked:0",
        volume.received_kib, volume.sent_kib, volume.out_of_sync_kib
    )
}

/// Every object of a resource as events2 lines with `kind` ("exists" for `--now`, "create"
/// when a resource comes up).
pub fn events2_lines(view: &ResourceView, kind: &str, statistics: bool) -> Vec<String> {
    let mut lines = vec![format!("{kind} resource {}", resource_fields(view, statistics))];
    for peer in &view.peers {
        lines.push(format!("{kind} connection {}", connection_fields(view, peer)));
    }
    for volume in &view.volumes {
        let mut line = format!(
            "{kind} device {} backing_dev:{} disk:{} client:no quorum:{}",
            device_prefix(view, volume),
            volume.backing_dev,
            volume.disk,
            if volume.quorum { "yes" } else { "no" }
        );
        if statistics {
            line.push_str(&device_statistics(volume));
        }
        lines.push(line);
    }
    for peer in &view.peers {
        for volume in &peer.volumes {
            let mut line = format!(
                "{kind} peer-device {} replication:{} peer-disk:{} peer-client:no \
                 resync-suspended:no",
                peer_device_prefix(view, peer, volume),
                volume.replication,
                volume.peer_disk
            );
            if let Some(percent) = volume.done_percent.filter(|_| is_syncing(volume.replication)) {
                line.push(' ');
                line.push_str(&done(percent));
            }
            if statistics {
                line.push_str(&peer_device_statistics(volume));
            }
            lines.push(line);
        }
    }
    lines
}

/// The events2 lines for a resource going away (in DRBD's order: peer devices, devices,
/// connections, then the resource).
pub fn destroy_lines(view: &ResourceView) -> Vec<String> {
    let mut lines = Vec::new();
    for peer in &view.peers {
        for volume in &peer.volumes {
            lines.push(format!("destroy peer-device {}", peer_device_prefix(view, peer, volume)));
        }
    }
    for volume in &view.volumes {
        lines.push(format!("destroy device {}", device_prefix(view, volume)));
    }
    for peer in &view.peers {
        lines.push(format!(
            "destroy connection name:{} peer-node-id:{} conn-name:{}",
            view.name, peer.node_id, peer.name
        ));
    }
    lines.push(format!("destroy resource name:{}", view.name));
    lines
}

/// events2 `change` lines from `before` to `after`: one line per changed object, naming only
/// the fields that changed. These are also the daemon's state-change log lines.
pub fn change_lines(before: &ResourceView, after: &ResourceView) -> Vec<String> {
    let mut lines = Vec::new();
    if before.role != after.role
        || before.suspended != after.suspended
        || before.may_promote() != after.may_promote()
        || before.promotion_score() != after.promotion_score()
    {
        let mut fields = format!("name:{}", after.name);
        if before.role != after.role {
            let _ = write!(fields, " role:{}", after.role);
        }
        if before.suspended != after.suspended {
            let _ = write!(fields, " suspended:{}", if after.suspended { "user" } else { "no" });
        }
        let _ = write!(
            fields,
            " may_promote:{} promotion_score:{}",
            yes_no(after.may_promote()),
            after.promotion_score()
        );
        lines.push(format!("change resource {fields}"));
    }
    for peer in &after.peers {
        let Some(old) = before.peers.iter().find(|p| p.node_id == peer.node_id) else { continue };
        let mut fields = Vec::new();
        if old.connection != peer.connection {
            fields.push(format!("connection:{}", peer.connection));
        }
        if old.role != peer.role {
            fields.push(format!("role:{}", peer.role));
        }
        if !fields.is_empty() {
            lines.push(format!(
                "change connection name:{} peer-node-id:{} conn-name:{} {}",
                after.name,
                peer.node_id,
                peer.name,
                fields.join(" ")
            ));
        }
    }
    for volume in &after.volumes {
        let Some(old) = before.volumes.iter().find(|v| v.number == volume.number) else { continue };
        if old.disk != volume.disk {
            lines.push(format!(
                "change device {} disk:{}",
                device_prefix(after, volume),
                volume.disk
            ));
        }
    }
    for peer in &after.peers {
        let Some(old_peer) = before.peers.iter().find(|p| p.node_id == peer.node_id) else {
            continue;
        };
        for volume in &peer.volumes {
            let Some(old) = old_peer.volumes.iter().find(|v| v.number == volume.number) else {
                continue;
            };
            let mut fields = Vec::new();
            if old.replication != volume.replication {
                fields.push(format!("replication:{}", volume.replication));
            }
            if old.peer_disk != volume.peer_disk {
                fields.push(format!("peer-disk:{}", volume.peer_disk));
            }
            if !fields.is_empty() {
                lines.push(format!(
                    "change peer-device {} {}",
                    peer_device_prefix(after, peer, volume),
                    fields.join(" ")
                ));
            }
        }
    }
    lines
}

/// Width of the resync progress bar, in characters.
const PROGRESS_BAR_WIDTH: u64 = 20;

/// One resync progress line: `r0 beta: SyncTarget 45.20% [#########...........] 10240 KiB/s eta 0:05`.
pub fn progress_line(
    resource: &str,
    peer: &str,
    replication: ReplicationState,
    blocks_total: u64,
    blocks_remaining: u64,
    rate_kib_per_s: u64,
    eta_s: Option<u64>,
) -> String {
    let done = blocks_total.saturating_sub(blocks_remaining);
    let percent = if blocks_total == 0 { 100.0 } else { done as f64 * 100.0 / blocks_total as f64 };
    let filled =
        (done * PROGRESS_BAR_WIDTH).checked_div(blocks_total).unwrap_or(PROGRESS_BAR_WIDTH);
    let bar: String = (0..PROGRESS_BAR_WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
    let eta = match eta_s {
        Some(s) => format!("{}:{:02}", s / 60, s % 60),
        None => "?".into(),
    };
    format!(
        "{resource} {peer}: {replication} {percent:.2}% [{bar}] {rate_kib_per_s} KiB/s eta {eta}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: Role, disk: DiskState, connection: ConnectionState) -> ResourceView {
        ResourceView {
            name: "r0".into(),
            node_id: 0,
            role,
            suspended: false,
            volumes: vec![VolumeView {
                number: 0,
                minor: 0,
                disk,
                backing_dev: "/var/lib/tandem/r0.img".into(),
                size_kib: 65_536,
                read_kib: 8,
                written_kib: 12,
                quorum: true,
                upper_pending: 0,
            }],
            peers: vec![PeerView {
                name: "node-b".into(),
                node_id: 1,
                connection,
                role: if connection == ConnectionState::Connected {
                    Role::Secondary
                } else {
                    Role::Unknown
                },
                volumes: vec![PeerVolumeView {
                    number: 0,
                    replication: if connection == ConnectionState::Connected {
                        ReplicationState::Established
                    } else {
                        ReplicationState::Off
                    },
                    peer_disk: if connection == ConnectionState::Connected {
                        DiskState::UpToDate
                    } else {
                        DiskState::DUnknown
                    },
                    out_of_sync_kib: 0,
                    done_percent: None,
                    received_kib: 0,
                    sent_kib: 4,
                }],
            }],
        }
    }

    #[test]
    fn short_status_matches_drbd_utils() {
        let cases: Vec<(ResourceView, &str)> = vec![
            (
                view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected),
                "r0 role:Primary\n  disk:UpToDate\n  node-b role:Secondary\n    peer-disk:UpToDate\n\n",
            ),
            (
                view(Role::Secondary, DiskState::UpToDate, ConnectionState::Connecting),
                "r0 role:Secondary\n  disk:UpToDate\n  node-b connection:Connecting\n\n",
            ),
            (
                {
                    let mut v =
                        view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected);
                    v.peers[0].volumes[0].replication = ReplicationState::SyncSource;
                    v.peers[0].volumes[0].peer_disk = DiskState::Inconsistent;
                    v.peers[0].volumes[0].done_percent = Some(45.2);
                    v
                },
                "r0 role:Primary\n  disk:UpToDate\n  node-b role:Secondary\n    \
                 replication:SyncSource peer-disk:Inconsistent done:45.20\n\n",
            ),
            (
                {
                    let mut v =
                        view(Role::Secondary, DiskState::UpToDate, ConnectionState::Connected);
                    v.volumes[0].number = 1;
                    v.peers[0].volumes[0].number = 1;
                    v
                },
                "r0 role:Secondary\n  volume:1 disk:UpToDate\n  node-b role:Secondary\n    \
                 volume:1 peer-disk:UpToDate\n\n",
            ),
            (
                {
                    let mut v =
                        view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected);
                    v.peers[0].volumes[0].replication = ReplicationState::VerifyS;
                    v.peers[0].volumes[0].done_percent = Some(12.345);
                    v
                },
                "r0 role:Primary\n  disk:UpToDate\n  node-b role:Secondary\n    \
                 replication:VerifyS peer-disk:UpToDate done:12.35\n\n",
            ),
        ];
        for (view, expected) in cases {
            assert_eq!(format_status(&view, false, false), expected);
        }
    }

    #[test]
    fn upper_pending_shows_requests_in_flight() {
        let mut view = view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected);
        view.volumes[0].upper_pending = 3;
        assert!(format_status(&view, false, true).contains(" upper-pending:3 "));
        let lines = events2_lines(&view, "exists", true);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("exists device ") && l.contains(" upper-pending:3 "))
        );
    }

    #[test]
    fn verbose_statistics_status_has_drbd_fields() {
        let text = format_status(
            &view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected),
            true,
            true,
        );
        let expected = "r0 node-id:0 role:Primary suspended:no\n    write-ordering:flush\n  \
            volume:0 minor:0 disk:UpToDate quorum:yes\n      size:65536 read:8 written:12 \
            al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no\n  \
            node-b node-id:1 connection:Connected role:Secondary congested:no ap-in-flight:0 \
            rs-in-flight:0\n    volume:0 replication:Established peer-disk:UpToDate \
            resync-suspended:no\n        received:0 sent:4 out-of-sync:0 pending:0 unacked:0\n\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn events2_exists_and_changes() {
        let secondary = view(Role::Secondary, DiskState::UpToDate, ConnectionState::Connecting);
        assert_eq!(
            events2_lines(&secondary, "exists", false),
            vec![
                "exists resource name:r0 role:Secondary suspended:no force-io-failures:no \
                 may_promote:yes promotion_score:10100",
                "exists connection name:r0 peer-node-id:1 conn-name:node-b connection:Connecting \
                 role:Unknown",
                "exists device name:r0 volume:0 minor:0 backing_dev:/var/lib/tandem/r0.img \
                 disk:UpToDate client:no quorum:yes",
                "exists peer-device name:r0 peer-node-id:1 conn-name:node-b volume:0 \
                 replication:Off peer-disk:DUnknown peer-client:no resync-suspended:no",
            ]
        );
        let primary = view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected);
        assert_eq!(
            change_lines(&secondary, &primary),
            vec![
                "change resource name:r0 role:Primary may_promote:no promotion_score:10101",
                "change connection name:r0 peer-node-id:1 conn-name:node-b connection:Connected \
                 role:Secondary",
                "change peer-device name:r0 peer-node-id:1 conn-name:node-b volume:0 \
                 replication:Established peer-disk:UpToDate",
            ]
        );
        assert!(change_lines(&primary, &primary).is_empty());
        assert_eq!(
            destroy_lines(&primary).last().map(String::as_str),
            Some("destroy resource name:r0")
        );
    }

    #[test]
    fn progress_lines_show_bar_rate_and_eta() {
        assert_eq!(
            progress_line("r0", "beta", ReplicationState::SyncTarget, 1000, 548, 10240, Some(65)),
            "r0 beta: SyncTarget 45.20% [#########...........] 10240 KiB/s eta 1:05"
        );
        assert_eq!(
            progress_line("r0", "beta", ReplicationState::SyncSource, 0, 0, 0, None),
            "r0 beta: SyncSource 100.00% [####################] 0 KiB/s eta ?"
        );
    }

    #[test]
    fn promotion_needs_up_to_date_data() {
        let v = view(Role::Secondary, DiskState::Inconsistent, ConnectionState::Connected);
        assert!(!v.may_promote());
        assert_eq!(v.promotion_score(), 0);
        let mut v = view(Role::Secondary, DiskState::UpToDate, ConnectionState::Connected);
        v.peers[0].role = Role::Primary;
        assert!(!v.may_promote(), "a primary peer blocks promotion");
    }
}
