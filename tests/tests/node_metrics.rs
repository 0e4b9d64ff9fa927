//! tandemd's Prometheus metrics end to end: two tandemd on loopback with `--metrics-listen`,
//! a replicated resource brought up and promoted with tandemadm, qemu-io writing and reading
//! through the primary's portal. Both nodes' `/metrics` must parse as the Prometheus text
//! format (a small parser below checks the grammar, TYPE lines, histogram buckets), show the
//! roles and states tandemadm shows, count the requests and bytes qemu-io sent (on the
//! primary only), and track out-of-sync bytes while the peer is disconnected and the resync
//! traffic after it reconnects. The API port serves the same metrics only with the token.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::clients::qemu_io_ok;
use tests::storage_pair::{PairOptions, StoragePair};
use tests::{Daemon, free_port};

const VOLUME_BYTES: u64 = 64 * 1024 * 1024;
const TOKEN: &str = "metrics-test-token-0123";

/// What each tandemd serves besides its portal: `/metrics`, and the control API (which
/// serves them too, with the token).
struct Endpoints {
    metrics: SocketAddr,
    api: SocketAddr,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// One scrape, parsed: series (`name{labels}` with labels in their order) -> value.
#[derive(Debug)]
struct Scrape {
    text: String,
    values: BTreeMap<String, f64>,
}

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self.values.get(series).unwrap_or_else(|| panic!("no series {series}\n{}", self.text))
    }
}

/// Checks the Prometheus text format (0.0.4) line by line and returns the samples. Grammar:
/// `# HELP name text`, `# TYPE name type` (once per family, before its samples), samples
/// `name{k="v",...} value` with metric and label names `[a-zA-Z_:][a-zA-Z0-9_:]*` and
/// escaped label values; histogram buckets cumulative, ending at `+Inf` equal to `_count`.
fn parse_exposition(text: &str) -> Scrape {
    let name_ok = |name: &str| {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut values = BTreeMap::new();
    let mut seen_families = BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (keyword, name) = (words.next().expect("keyword"), words.next().expect("name"));
            assert!(name_ok(name), "bad metric name in {line:?}");
            if keyword == "TYPE" {
                let kind = words.next().expect("type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line:?}"
                );
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "twice: {line}");
            } else {
                assert_eq!(keyword, "HELP", "{line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        // Labels: k="v" pairs separated by commas; values may hold escaped quotes.
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
            assert!(name_ok(key), "bad label name in {line:?}");
            let mut end = None;
            let mut escaped = false;
            for (i, c) in after.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
            rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} appears before (or without) its TYPE line");
        seen_families.insert(family.to_owned());
        assert!(values.insert(series.to_owned(), value).is_none(), "duplicate series {series}");
    }
    // Histograms: cumulative buckets, +Inf == _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut by_labels: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (series, value) in &values {
            let Some(labels) = series.strip_prefix(&format!("{family}_bucket{{")) else {
                continue;
            };
            let (other, le) = labels.rsplit_once(",le=\"").expect("le label last");
            let le = le.trim_end_matches("\"}");
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le") };
            by_labels.entry(other.to_owned()).or_default().push((le, *value));
        }
        for (labels, mut buckets) in by_labels {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}{{{labels}}} buckets");
            let last = buckets.last().expect("buckets");
            assert!(last.0.is_infinite(), "{family}{{{labels}}} has no +Inf bucket");
            assert_eq!(last.1, values[&format!("{family}_count{{{labels}}}")]);
        }
    }
    Scrape { text: text.to_owned(), values }
}

fn scrape(n: &Endpoints) -> Scrape {
    let reply = tests::http::request(n.metrics, "GET", "/metrics", &[], None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.headers.contains("content-type: text/plain; version=0.0.4"), "{}", reply.headers);
    parse_exposition(&reply.text)
}

const WRITE: &str = "tandem_device_requests_total{resource=\"r0\",volume=\"0\",op=\"write\"}";
const WRITE_BYTES: &str =
    "tandem_device_request_bytes_total{resource=\"r0\",volume=\"0\",op=\"write\"}";
const WRITE_COUNT: &str =
    "tandem_device_request_duration_seconds_count{resource=\"r0\",volume=\"0\",op=\"write\"}";
const READ: &str = "tandem_device_requests_total{resource=\"r0\",volume=\"0\",op=\"read\"}";
const READ_BYTES: &str =
    "tandem_device_request_bytes_total{resource=\"r0\",volume=\"0\",op=\"read\"}";

fn role(scrape: &Scrape, role: &str) -> f64 {
    scrape.get(&format!("tandem_resource_role{{resource=\"r0\",role=\"{role}\"}}"))
}

fn peer_series(name: &str, peer: &str, id: u32) -> String {
    format!("{name}{{resource=\"r0\",peer=\"{peer}\",peer_node_id=\"{id}\",volume=\"0\"}}")
}

#[test]
fn metrics_follow_roles_requests_and_resync() {
    tests::require_slow!();
    let pair = StoragePair::with_options(PairOptions {
        volume_bytes: VOLUME_BYTES,
        forward_links: false,
        ..PairOptions::default()
    });
    let endpoints = [0, 1].map(|_| Endpoints { metrics: loopback(), api: loopback() });
    let _daemons: Vec<Daemon> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (metrics, api) = (e.metrics.to_string(), e.api.to_string());
            let extra = ["--metrics-listen", &metrics, "--api-listen", &api, "--api-token", TOKEN];
            pair.start_with(i, &extra)
        })
        .collect();
    let (alpha, beta) = (&endpoints[0], &endpoints[1]);

    let down = scrape(alpha);
    assert_eq!(down.get("tandem_resource_up{resource=\"r0\"}"), 0.0);
    assert_eq!(down.get(WRITE), 0.0);
    assert_eq!(down.get("tandem_node_info{node=\"alpha\",version=\"0.1.0\"}"), 1.0);

    pair.bring_up(0);

    let (a, b) = (scrape(alpha), scrape(beta));
    assert_eq!((role(&a, "Primary"), role(&a, "Secondary")), (1.0, 0.0));
    assert_eq!((role(&b, "Primary"), role(&b, "Secondary")), (0.0, 1.0));
    for (s, peer, id) in [(&a, "beta", 1), (&b, "alpha", 0)] {
        assert_eq!(s.get("tandem_resource_up{resource=\"r0\"}"), 1.0);
        assert_eq!(
            s.get("tandem_device_disk_state{resource=\"r0\",volume=\"0\",disk_state=\"UpToDate\"}"),
            1.0
        );
        assert_eq!(
            s.get(&format!(
                "tandem_connection_state{{resource=\"r0\",peer=\"{peer}\",peer_node_id=\"{id}\",\
                 connection_state=\"Connected\"}}"
            )),
            1.0
        );
        assert_eq!(
            s.get(&format!(
                "tandem_peer_device_replication_state{{resource=\"r0\",peer=\"{peer}\",\
                 peer_node_id=\"{id}\",volume=\"0\",replication_state=\"Established\"}}"
            )),
            1.0
        );
        assert_eq!(s.get(&peer_series("tandem_peer_device_out_of_sync_bytes", peer, id)), 0.0);
        // `meta-disk internal`: the 64 MiB file less its metadata (40 KiB for one peer, as
        // drbdmeta lays it out) is the device.
        assert_eq!(s.get("tandem_device_size_bytes{resource=\"r0\",volume=\"0\"}"), 67_067_904.0);
        // Quorum is off for this two-node resource: it always "has" quorum, as DRBD reports.
        assert_eq!(s.get("tandem_resource_quorum{resource=\"r0\"}"), 1.0);
    }
    assert_eq!(b.get("tandem_resource_may_promote{resource=\"r0\"}"), 0.0, "a peer is Primary");
    // The replication link's round trip, from the engine's pings (loopback: well under 1 s).
    let round_trip = "tandem_connection_round_trip_seconds{resource=\"r0\",peer=\"beta\",\
                      peer_node_id=\"1\"}";
    tests::wait_for("a timed ping", Duration::from_secs(30), || {
        scrape(alpha).values.get(round_trip).is_some_and(|s| *s > 0.0 && *s < 1.0)
    });

    // 16 writes of 64 KiB, 4 reads of 64 KiB, a flush.
    let url = pair.url(0);
    let mut commands = Vec::new();
    for i in 0..16 {
        commands.push(format!("write -P {} {} 64k", i + 1, i * 65536));
    }
    for i in 0..4 {
        commands.push(format!("read -P {} {} 64k", i + 1, i * 65536));
    }
    commands.push("flush".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let before = scrape(alpha);
    let started = Instant::now();
    qemu_io_ok(&url, &commands);
    println!("qemu-io (16 writes, 4 reads of 64 KiB, flush): {:?}", started.elapsed());
    let (a, b) = (scrape(alpha), scrape(beta));
    println!("alpha's /metrics after the writes:\n{}", a.text);
    // qemu-io may read the first blocks when it opens the image: at least, not exactly.
    assert_eq!(a.get(WRITE) - before.get(WRITE), 16.0);
    assert_eq!(a.get(WRITE_BYTES) - before.get(WRITE_BYTES), 16.0 * 65536.0);
    assert_eq!(a.get(WRITE_COUNT), a.get(WRITE), "one latency sample per request");
    assert!(a.get(READ) - before.get(READ) >= 4.0);
    assert!(a.get(READ_BYTES) - before.get(READ_BYTES) >= 4.0 * 65536.0);
    assert!(
        a.get("tandem_device_requests_total{resource=\"r0\",volume=\"0\",op=\"flush\"}") >= 1.0
    );
    assert_eq!(
        a.get("tandem_device_request_errors_total{resource=\"r0\",volume=\"0\",op=\"write\"}"),
        0.0
    );
    // Latency: every write took more than 25 us and less than 13 s.
    let first_bucket = a.get(
        "tandem_device_request_duration_seconds_bucket{resource=\"r0\",volume=\"0\",op=\"write\",\
         le=\"2.5e-05\"}",
    );
    assert!(first_bucket < a.get(WRITE), "writes are not all under 25 us");
    assert!(
        a.get(
            "tandem_device_request_duration_seconds_sum{resource=\"r0\",volume=\"0\",op=\"write\"}"
        ) > 0.0
    );
    assert_eq!(b.get(WRITE), 0.0, "the secondary's LUN served nothing");
    assert_eq!(a.get("tandem_device_upper_pending{resource=\"r0\",volume=\"0\"}"), 0.0);
    let statistics = pair.adm(0, &["status", "--statistics", "r0"]);
    assert!(
        statistics.contains(" written:1024 ") && statistics.contains(" upper-pending:0 "),
        "{statistics}"
    );

    // The peer away: writes leave out-of-sync blocks, counted; reconnecting resyncs them.
    pair.adm(1, &["disconnect", "r0"]);
    tests::wait_for("alpha sees beta gone", Duration::from_secs(10), || {
        scrape(alpha).get(
            "tandem_connection_state{resource=\"r0\",peer=\"beta\",peer_node_id=\"1\",\
             connection_state=\"Connected\"}",
        ) == 0.0
    });
    qemu_io_ok(&url, &["write -P 99 1M 1M"]);
    let away = scrape(alpha);
    assert_eq!(
        away.get(&peer_series("tandem_peer_device_out_of_sync_bytes", "beta", 1)),
        1_048_576.0
    );
    let received_before =
        scrape(beta).get(&peer_series("tandem_peer_device_received_bytes_total", "alpha", 0));
    pair.adm(1, &["connect", "r0"]);
    pair.adm(1, &["wait-sync", "--timeout", "20", "r0"]);
    tests::wait_for("alpha's out-of-sync back to 0", Duration::from_secs(10), || {
        scrape(alpha).get(&peer_series("tandem_peer_device_out_of_sync_bytes", "beta", 1)) == 0.0
    });
    let received =
        scrape(beta).get(&peer_series("tandem_peer_device_received_bytes_total", "alpha", 0));
    assert!(received - received_before >= 1_048_576.0, "resync traffic counted: {received}");

    // The API port serves the same metrics, with the token only; OpenMetrics on request.
    let reply = tests::http::request(alpha.api, "GET", "/metrics", &[], None);
    assert_eq!(reply.status, 401, "the API's /metrics needs the token");
    let bearer = format!("Bearer {TOKEN}");
    let reply = tests::http::request(
        alpha.api,
        "GET",
        "/metrics",
        &[("Authorization", &bearer), ("Accept", "application/openmetrics-text; version=1.0.0")],
        None,
    );
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.contains("content-type: application/openmetrics-text"),
        "{}",
        reply.headers
    );
    assert!(reply.text.ends_with("# EOF\n") && reply.text.contains("tandem_resource_role{"));

    // Scrape cost: the median of 20 scrapes of one resource.
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            scrape(alpha);
            t.elapsed()
        })
        .collect();
    times.sort();
    println!("scrape of one resource: median {:?}, max {:?}", times[10], times[19]);
}
