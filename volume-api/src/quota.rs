//! Per-project quotas: Cinder's resources, defaults and the over-limit check. Pure: usage is
//! counted by the caller from the database, limits come from the quota table or the defaults.

use std::collections::BTreeMap;

/// Cinder's quota resources and their default hard limits (-1 is unlimited).
pub const DEFAULTS: [(&str, i64); 7] = [
    ("volumes", 10),
    ("snapshots", 10),
    ("gigabytes", 1000),
    ("backups", 10),
    ("backup_gigabytes", 1000),
    ("per_volume_gigabytes", -1),
    ("groups", 10),
];

pub fn is_resource(name: &str) -> bool {
    DEFAULTS.iter().any(|(n, _)| *n == name)
}

/// Hard limits with overrides applied.
pub fn limits(overrides: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    DEFAULTS
        .iter()
        .map(|(name, default)| (name.to_string(), *overrides.get(*name).unwrap_or(default)))
        .collect()
}

/// What a project uses now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub volumes: i64,
    pub gigabytes: i64,
    pub snapshots: i64,
}

impl Usage {
    pub fn in_use(&self, resource: &str) -> i64 {
        match resource {
            "volumes" => self.volumes,
            "gigabytes" => self.gigabytes,
            "snapshots" => self.snapshots,
            _ => 0,
        }
    }
}

/// What a request adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub volumes: i64,
    pub gigabytes: i64,
    pub snapshots: i64,
    /// Size of the one volume being created or extended, for `per_volume_gigabytes`.
    pub volume_size_gib: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error(
        "VolumeSizeExceedsLimit: Requested volume size {size}G is larger than maximum allowed limit {limit}G."
    )]
    PerVolume { size: i64, limit: i64 },
    #[error(
        "VolumeLimitExceeded: Maximum number of volumes allowed ({limit}) exceeded for quota 'volumes'."
    )]
    Volumes { limit: i64 },
    #[error("SnapshotLimitExceeded: Maximum number of snapshots allowed ({limit}) exceeded.")]
    Snapshots { limit: i64 },
    #[error(
        "VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed gigabytes quota. Requested {requested}G, quota is {limit}G and {in_use}G has been consumed."
    )]
    Gigabytes { requested: i64, limit: i64, in_use: i64 },
}

/// Refuses `delta` when it would take `usage` past `limits`.
pub fn check(
    limits: &BTreeMap<String, i64>,
    usage: Usage,
    delta: Delta,
) -> Result<(), QuotaExceeded> {
    let limit = |name: &str| limits.get(name).copied().unwrap_or(-1);
    let over = |name: &str, used: i64, add: i64| {
        let l = limit(name);
        add > 0 && l >= 0 && used.saturating_add(add) > l
    };
    let per_volume = limit("per_volume_gigabytes");
    if per_volume >= 0 && delta.volume_size_gib > per_volume {
        return Err(QuotaExceeded::PerVolume { size: delta.volume_size_gib, limit: per_volume });
    }
    if over("volumes", usage.volumes, delta.volumes) {
        return Err(QuotaExceeded::Volumes { limit: limit("volumes") });
    }
    if over("snapshots", usage.snapshots, delta.snapshots) {
        return Err(QuotaExceeded::Snapshots { limit: limit("snapshots") });
    }
    if over("gigabytes", usage.gigabytes, delta.gigabytes) {
        return Err(QuotaExceeded::Gigabytes {
            requested: delta.gigabytes,
            limit: limit("gigabytes"),
            in_use: usage.gigabytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits_with(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        limits(&pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn check_table() {
        let one = Delta { volumes: 1, gigabytes: 5, snapshots: 0, volume_size_gib: 5 };
        type Case<'a> = (&'a [(&'a str, i64)], Usage, Delta, bool);
        let cases: &[Case] = &[
            (&[], Usage::default(), one, true),
            (&[], Usage { volumes: 9, gigabytes: 0, snapshots: 0 }, one, true),
            (&[], Usage { volumes: 10, gigabytes: 0, snapshots: 0 }, one, false),
            (&[("volumes", -1)], Usage { volumes: 10_000, gigabytes: 0, snapshots: 0 }, one, true),
            (&[("gigabytes", 5)], Usage::default(), one, true),
            (&[("gigabytes", 5)], Usage { volumes: 0, gigabytes: 1, snapshots: 0 }, one, false),
            (&[("per_volume_gigabytes", 4)], Usage::default(), one, false),
            (
                &[("snapshots", 0)],
                Usage::default(),
                Delta { snapshots: 1, ..Delta::default() },
                false,
            ),
            // Shrinking nothing and adding nothing is always allowed, even over the limit.
            (
                &[("volumes", 0)],
                Usage { volumes: 3, gigabytes: 0, snapshots: 0 },
                Delta::default(),
                true,
            ),
        ];
        for (overrides, usage, delta, ok) in cases {
            let result = check(&limits_with(overrides), *usage, *delta);
            assert_eq!(result.is_ok(), *ok, "{overrides:?} {usage:?} {delta:?}: {result:?}");
        }
    }

    #[test]
    fn messages_name_the_quota() {
        let err = check(
            &limits_with(&[("volumes", 1)]),
            Usage { volumes: 1, ..Usage::default() },
            Delta { volumes: 1, ..Delta::default() },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "VolumeLimitExceeded: Maximum number of volumes allowed (1) exceeded for quota 'volumes'."
        );
    }
}
