//! Prometheus metrics of a tandemd: per resource and volume the role, disk state, the
//! connection, replication and disk state of every peer, out-of-sync bytes, resync rate and
//! traffic, and the LUN's request counters, bytes and latency histograms.
//!
//! Three parts:
//! - [`LunIo`]: the counters the LUN's request path updates ([`LunIo::begin`] when a request
//!   enters, [`InFlight::done`] when it succeeds; dropping the guard counts a failure). Atomics
//!   and one uncontended lock per request (the histogram), no allocation.
//! - [`render`]: pure; turns [`ResourceSample`]s (taken at scrape time) into the Prometheus
//!   text format (0.0.4) or OpenMetrics text, through the `prometheus-client` crate's encoder
//!   (escaping, histogram buckets, `_total` suffixes). The registry is built per scrape from
//!   the samples, so a resource that goes away leaves no stale series behind.
//! - [`scrape`] / [`router`]: the tokio side: sample every hosted resource, render, answer.
//!
//! States are exported as Prometheus "state sets", the shape drbd-reactor's exporter gives
//! them with `enums = true`: one series per possible value with the value as a label, 1 for
//! the current one and 0 for the others, so `tandem_device_disk_state{disk_state="UpToDate"}
//! == 0` is an alert rule. A peer's round trip appears once the engine has timed a ping
//! to it (the sample field is an `Option`); nothing is faked.

use crate::constants::{
    LATENCY_BUCKET_FACTOR, LATENCY_BUCKET_START_S, LATENCY_BUCKETS_MAX, METRICS_SCRAPES_MAX,
};
use crate::host::Host;
use crate::status::ResourceView;
use drbd_engine::protocol::{ConnectionState, DiskState, ReplicationState, Role};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The kinds of request the LUN serves (label `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Unmap, Op::WriteZeroes];

    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Unmap => "unmap",
            Op::WriteZeroes => "write_zeroes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One request kind's counters.
#[derive(Debug)]
struct OpCounters {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    duration_s: Histogram,
}

impl OpCounters {
    fn new() -> OpCounters {
        OpCounters {
            requests: Counter::default(),
            errors: Counter::default(),
            bytes: Counter::default(),
            duration_s: Histogram::new(exponential_buckets(
                LATENCY_BUCKET_START_S,
                LATENCY_BUCKET_FACTOR,
                LATENCY_BUCKETS_MAX,
            )),
        }
    }
}

/// The request counters of one resource's LUN; lives as long as its slot (counters survive
/// `down`/`up`, like a block device's in /sys/block/X/stat).
#[derive(Debug)]
pub struct LunIo {
    ops: [OpCounters; 5],
    /// Requests entered and not yet answered: DRBD's `upper-pending`.
    in_flight: AtomicU64,
}

impl Default for LunIo {
    fn default() -> Self {
        LunIo { ops: Op::ALL.map(|_| OpCounters::new()), in_flight: AtomicU64::new(0) }
    }
}

impl LunIo {
    /// A request of kind `op` enters; call [`InFlight::done`] when it succeeded.
    pub fn begin(&self, op: Op) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { io: self, op, started: Instant::now(), succeeded: false }
    }

    /// Requests in flight now (DRBD's `upper-pending`).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Completed requests of a kind (successes and failures).
    pub fn requests(&self, op: Op) -> u64 {
        self.ops[op.index()].requests.get()
    }

    /// Bytes moved by successful requests of a kind.
    pub fn bytes(&self, op: Op) -> u64 {
        self.ops[op.index()].bytes.get()
    }
}

/// A request in flight. Dropped without [`InFlight::done`] (an error returned early, or the
/// initiator's task cancelled), it counts as failed.
#[must_use = "call done() when the request succeeded"]
pub struct InFlight<'a> {
    io: &'a LunIo,
    op: Op,
    started: Instant,
    succeeded: bool,
}

impl InFlight<'_> {
    /// The request succeeded having moved `bytes`.
    pub fn done(mut self, bytes: u64) {
        self.succeeded = true;
        self.io.ops[self.op.index()].bytes.inc_by(bytes);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let counters = &self.io.ops[self.op.index()];
        counters.requests.inc();
        if !self.succeeded {
            counters.errors.inc();
        }
        counters.duration_s.observe(self.started.elapsed().as_secs_f64());
        self.io.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the engine says about one peer beyond the status view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerExtra {
    pub node_id: u32,
    /// The resync's current rate while one runs.
    pub resync_rate_kib_per_s: Option<u64>,
    /// The replication link's round trip (the last answered ping), once one was answered.
    pub round_trip_s: Option<f64>,
}

/// One hosted resource at scrape time.
#[derive(Debug, Clone)]
pub struct ResourceSample {
    pub name: String,
    pub volume: u32,
    pub io: Arc<LunIo>,
    /// The engine's view; `None` while the resource is down.
    pub view: Option<ResourceView>,
    pub peers: Vec<PeerExtra>,
    /// Whether the resource has quorum (always true where quorum is off); `None` while down.
    pub quorum: Option<bool>,
    /// The resource's service IP (`ADDRESS/PREFIX`, device) and whether this node holds it.
    pub service_ip: Option<(String, String, bool)>,
}

type Labels = Vec<(&'static str, String)>;

/// One metric's series across resources: `(labels, value)` pairs under one descriptor.
#[derive(Debug)]
struct Series<M> {
    metric_type: MetricType,
    points: Vec<(Labels, M)>,
}

impl<M> Series<M> {
    fn new(metric_type: MetricType) -> Self {
        Series { metric_type, points: Vec::new() }
    }

    fn push(&mut self, labels: Labels, value: M) {
        self.points.push((labels, value));
    }
}

impl<M: EncodeMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, metric) in &self.points {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.metric_type
    }

    fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

type Gauges = Series<ConstGauge<f64>>;
type Counters = Series<ConstCounter<u64>>;

fn gauges() -> Gauges {
    Series::new(MetricType::Gauge)
}

fn counters() -> Counters {
    Series::new(MetricType::Counter)
}

/// Pushes a state set: one series per possible value, 1 for `current`.
fn push_state<S: Copy + PartialEq + std::fmt::Display>(
    series: &mut Gauges,
    labels: &Labels,
    key: &'static str,
    all: &[S],
    current: S,
) {
    for state in all {
        let mut labels = labels.clone();
        labels.push((key, state.to_string()));
        series.push(labels, ConstGauge::new(if *state == current { 1.0 } else { 0.0 }));
    }
}

fn flag(value: bool) -> ConstGauge<f64> {
    ConstGauge::new(if value { 1.0 } else { 0.0 })
}

/// Precision is irrelevant for a gauge (2^53 bytes is 8 PiB).
fn float(value: u64) -> ConstGauge<f64> {
    ConstGauge::new(value as f64)
}

/// The exposition formats a scrape may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what every Prometheus understands.
    PrometheusText,
    /// `application/openmetrics-text; version=1.0.0`, when the scraper's Accept asks for it.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the Accept header names it, the classic text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The node's metrics as exposition text.
pub fn render(node: &str, samples: &[ResourceSample], format: Format) -> String {
    let mut info = gauges();
    info.push(
        vec![("node", node.to_owned()), ("version", env!("CARGO_PKG_VERSION").to_owned())],
        ConstGauge::new(1.0),
    );
    let (mut up, mut role, mut may_promote, mut promotion_score, mut quorum) =
        (gauges(), gauges(), gauges(), gauges(), gauges());
    let (mut disk_state, mut size, mut pending) = (gauges(), gauges(), gauges());
    let mut requests = counters();
    let mut errors = counters();
    let mut bytes = counters();
    let mut durations = Series::<Histogram>::new(MetricType::Histogram);
    let (mut connection_state, mut peer_role, mut round_trip) = (gauges(), gauges(), gauges());
    let (mut replication_state, mut peer_disk_state, mut out_of_sync, mut resync_rate) =
        (gauges(), gauges(), gauges(), gauges());
    let (mut received, mut sent) = (counters(), counters());
    let mut service_ip = gauges();

    for sample in samples {
        let resource = vec![("resource", sample.name.clone())];
        let device = vec![("resource", sample.name.clone()), ("volume", sample.volume.to_string())];
        up.push(resource.clone(), flag(sample.view.is_some()));
        for op in Op::ALL {
            let counters = &sample.io.ops[op.index()];
            let mut labels = device.clone();
            labels.push(("op", op.label().to_owned()));
            requests.push(labels.clone(), ConstCounter::new(counters.requests.get()));
            errors.push(labels.clone(), ConstCounter::new(counters.errors.get()));
            if op != Op::Flush {
                bytes.push(labels.clone(), ConstCounter::new(counters.bytes.get()));
            }
            durations.push(labels, counters.duration_s.clone());
        }
        pending.push(device.clone(), float(sample.io.in_flight()));
        if let Some((address, interface, assigned)) = &sample.service_ip {
            let mut labels = resource.clone();
            labels.push(("address", address.clone()));
            labels.push(("device", interface.clone()));
            service_ip.push(labels, flag(*assigned));
        }
        let Some(view) = &sample.view else { continue };
        push_state(&mut role, &resource, "role", &[Role::Primary, Role::Secondary], view.role);
        may_promote.push(resource.clone(), flag(view.may_promote()));
        promotion_score.push(resource.clone(), float(u64::from(view.promotion_score())));
        if let Some(has_quorum) = sample.quorum {
            quorum.push(resource.clone(), flag(has_quorum));
        }
        for volume in &view.volumes {
            let labels =
                vec![("resource", sample.name.clone()), ("volume", volume.number.to_string())];
            push_state(&mut disk_state, &labels, "disk_state", DiskState::ALL, volume.disk);
            size.push(labels, float(volume.size_kib * 1024));
        }
        for peer in &view.peers {
            let connection = vec![
                ("resource", sample.name.clone()),
                ("peer", peer.name.clone()),
                ("peer_node_id", peer.node_id.to_string()),
            ];
            push_state(
                &mut connection_state,
                &connection,
                "connection_state",
                ConnectionState::ALL,
                peer.connection,
            );
            push_state(&mut peer_role, &connection, "role", Role::ALL, peer.role);
            let extra = sample.peers.iter().find(|p| p.node_id == peer.node_id);
            if let Some(seconds) = extra.and_then(|e| e.round_trip_s) {
                round_trip.push(connection.clone(), ConstGauge::new(seconds));
            }
            for volume in &peer.volumes {
                let mut labels = connection.clone();
                labels.push(("volume", volume.number.to_string()));
                push_state(
                    &mut replication_state,
                    &labels,
                    "replication_state",
                    ReplicationState::ALL,
                    volume.replication,
                );
                push_state(
                    &mut peer_disk_state,
                    &labels,
                    "peer_disk_state",
                    DiskState::ALL,
                    volume.peer_disk,
                );
                out_of_sync.push(labels.clone(), float(volume.out_of_sync_kib * 1024));
                let rate = extra.and_then(|e| e.resync_rate_kib_per_s).unwrap_or(0);
                resync_rate.push(labels.clone(), float(rate * 1024));
                received.push(labels.clone(), ConstCounter::new(volume.received_kib * 1024));
                sent.push(labels, ConstCounter::new(volume.sent_kib * 1024));
            }
        }
    }

    let mut registry = Registry::default();
    registry.register("tandem_node_info", "This tandemd: node name and version (always 1)", info);
    registry.register("tandem_resource_up", "Whether the resource is up (1) or down (0)", up);
    registry.register("tandem_resource_role", "The resource's role on this node", role);
    registry.register(
        "tandem_resource_may_promote",
        "Whether 'tandemadm primary' without --force would be accepted (events2 may_promote)",
        may_promote,
    );
    registry.register(
        "tandem_resource_promotion_score",
        "events2 promotion_score: 0 when promotion is impossible, higher for better data",
        promotion_score,
    );
    registry.register(
        "tandem_resource_quorum",
        "Whether the resource has quorum (1 where quorum is off; absent while the resource is down)",
        quorum,
    );
    registry.register("tandem_device_disk_state", "The local disk state", disk_state);
    registry.register("tandem_device_size_bytes", "The volume's size", size);
    registry.register(
        "tandem_device_upper_pending",
        "Requests the LUN has taken and not yet answered (DRBD's upper-pending)",
        pending,
    );
    registry.register(
        "tandem_device_requests",
        "Requests the LUN completed, successful or not; rate() of it is IOPS",
        requests,
    );
    registry.register("tandem_device_request_errors", "Requests the LUN failed", errors);
    registry.register(
        "tandem_device_request_bytes",
        "Bytes moved by successful requests (unmap and write_zeroes: bytes covered)",
        bytes,
    );
    registry.register(
        "tandem_device_request_duration_seconds",
        "Time from a request entering the LUN to its answer (replication included)",
        durations,
    );
    registry.register(
        "tandem_connection_state",
        "The replication connection to each peer",
        connection_state,
    );
    registry.register(
        "tandem_connection_peer_role",
        "The peer's role as it announced it (Unknown while not connected)",
        peer_role,
    );
    registry.register(
        "tandem_connection_round_trip_seconds",
        "The replication link's round trip (present once the engine measures it)",
        round_trip,
    );
    registry.register(
        "tandem_peer_device_replication_state",
        "The replication state towards each peer",
        replication_state,
    );
    registry.register(
        "tandem_peer_device_peer_disk_state",
        "The peer's disk state as this node knows it",
        peer_disk_state,
    );
    registry.register(
        "tandem_peer_device_out_of_sync_bytes",
        "Bytes this node knows to differ on the peer (its bitmap for the peer)",
        out_of_sync,
    );
    registry.register(
        "tandem_peer_device_resync_rate_bytes_per_second",
        "The running resync's current rate (0 when none runs)",
        resync_rate,
    );
    registry.register(
        "tandem_peer_device_received_bytes",
        "Resync data received from the peer since the resource came up",
        received,
    );
    registry.register(
        "tandem_peer_device_sent_bytes",
        "Resync data sent to the peer since the resource came up",
        sent,
    );
    registry.register(
        "tandem_service_ip_assigned",
        "Whether this node holds the resource's service IP",
        service_ip,
    );

    let mut out = String::new();
    let encoded = match format {
        Format::PrometheusText => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail; the encoder only forwards fmt::Write's errors.
    assert!(encoded.is_ok(), "encoding metrics into a String");
    out
}

/// Samples every hosted resource (the engine's status and the LUN's counters).
pub async fn collect(host: &Host) -> Vec<ResourceSample> {
    let mut samples = Vec::new();
    for slot in host.slots() {
        let (view, peers, quorum) = match host.sample(&slot).await {
            Some((view, status)) => {
                let peers = status
                    .peers
                    .iter()
                    .map(|p| PeerExtra {
                        node_id: u32::from(p.node_id.0),
                        resync_rate_kib_per_s: p.resync.as_ref().map(|r| r.rate_kib_per_s),
                        round_trip_s: p
                            .round_trip_us
                            .map(|us| std::time::Duration::from_micros(us).as_secs_f64()),
                    })
                    .collect();
                (Some(view), peers, Some(status.quorum))
            }
            None => (None, Vec::new(), None),
        };
        samples.push(ResourceSample {
            name: slot.name.clone(),
            volume: slot.volume().unwrap_or(0),
            io: slot.io.clone(),
            view,
            peers,
            quorum,
            service_ip: host.service_ips.sample(&slot.name),
        });
    }
    samples
}

/// State of the metrics endpoint: the host and a bound on concurrent scrapes (each samples
/// every resource's engine).
#[derive(Clone)]
pub struct MetricsState {
    host: Arc<Host>,
    scrapes: Arc<tokio::sync::Semaphore>,
}

impl MetricsState {
    pub fn new(host: Arc<Host>) -> MetricsState {
        MetricsState { host, scrapes: Arc::new(tokio::sync::Semaphore::new(METRICS_SCRAPES_MAX)) }
    }
}

/// `GET /metrics`.
pub async fn scrape(
    axum::extract::State(state): axum::extract::State<MetricsState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(_permit) = state.scrapes.try_acquire() else {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "too many concurrent scrapes\n")
            .into_response();
    };
    let format = Format::from_accept(
        headers.get(axum::http::header::ACCEPT).and_then(|value| value.to_str().ok()),
    );
    let samples = collect(&state.host).await;
    let body = render(&state.host.node_name, &samples, format);
    ([(axum::http::header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// The unauthenticated metrics listener (`--metrics-listen`): only `GET /metrics`.
pub fn router(host: Arc<Host>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(MetricsState::new(host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PeerView, PeerVolumeView, VolumeView};

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
                backing_dev: "/tmp/r0.img".into(),
                size_kib: 1024,
                read_kib: 0,
                written_kib: 0,
                upper_pending: 0,
                quorum: true,
            }],
            peers: vec![PeerView {
                name: "beta".into(),
                node_id: 1,
                connection,
                role: Role::Secondary,
                volumes: vec![PeerVolumeView {
                    number: 0,
                    replication: ReplicationState::SyncSource,
                    peer_disk: DiskState::Inconsistent,
                    out_of_sync_kib: 8,
                    done_percent: Some(50.0),
                    received_kib: 0,
                    sent_kib: 12,
                }],
            }],
        }
    }

    fn sample(view: Option<ResourceView>) -> ResourceSample {
        ResourceSample {
            name: "r0".into(),
            volume: 0,
            io: Arc::new(LunIo::default()),
            view,
            peers: vec![PeerExtra {
                node_id: 1,
                resync_rate_kib_per_s: Some(100),
                round_trip_s: None,
            }],
            quorum: None,
            service_ip: Some(("10.9.0.100/24".into(), "eth0".into(), true)),
        }
    }

    /// `name{labels}` -> value, for the lines that are samples.
    fn values(text: &str) -> std::collections::BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("series value");
                (series.to_owned(), value.parse().expect("a number"))
            })
            .collect()
    }

    #[test]
    fn lun_requests_count_bytes_errors_and_latency() {
        let io = LunIo::default();
        let request = io.begin(Op::Write);
        assert_eq!(io.in_flight(), 1);
        request.done(4096);
        drop(io.begin(Op::Write)); // an early return: a failure
        io.begin(Op::Read).done(512);
        assert_eq!(io.in_flight(), 0);
        assert_eq!((io.requests(Op::Write), io.bytes(Op::Write)), (2, 4096));
        assert_eq!((io.requests(Op::Read), io.bytes(Op::Read)), (1, 512));
        let mut s = sample(None);
        s.io = Arc::new(io);
        let text = render("alpha", &[s], Format::PrometheusText);
        let v = values(&text);
        let key =
            |name: &str, op: &str| format!("{name}{{resource=\"r0\",volume=\"0\",op=\"{op}\"}}");
        assert_eq!(v[&key("tandem_device_requests_total", "write")], 2.0);
        assert_eq!(v[&key("tandem_device_request_errors_total", "write")], 1.0);
        assert_eq!(v[&key("tandem_device_request_bytes_total", "write")], 4096.0);
        assert_eq!(v[&key("tandem_device_request_duration_seconds_count", "write")], 2.0);
        assert_eq!(v[&key("tandem_device_request_errors_total", "read")], 0.0);
        assert_eq!(v["tandem_resource_up{resource=\"r0\"}"], 0.0);
        // A down resource has no state series.
        assert!(!text.contains("tandem_resource_role{"), "{text}");
    }

    #[test]
    fn states_are_state_sets_and_unknowns_are_absent() {
        let text = render(
            "alpha",
            &[sample(Some(view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected)))],
            Format::PrometheusText,
        );
        let v = values(&text);
        let cases = [
            ("tandem_resource_up{resource=\"r0\"}", 1.0),
            ("tandem_resource_role{resource=\"r0\",role=\"Primary\"}", 1.0),
            ("tandem_resource_role{resource=\"r0\",role=\"Secondary\"}", 0.0),
            ("tandem_device_disk_state{resource=\"r0\",volume=\"0\",disk_state=\"UpToDate\"}", 1.0),
            ("tandem_device_disk_state{resource=\"r0\",volume=\"0\",disk_state=\"Outdated\"}", 0.0),
            ("tandem_device_size_bytes{resource=\"r0\",volume=\"0\"}", 1_048_576.0),
            (
                "tandem_connection_state{resource=\"r0\",peer=\"beta\",peer_node_id=\"1\",\
                 connection_state=\"Connected\"}",
                1.0,
            ),
            (
                "tandem_peer_device_replication_state{resource=\"r0\",peer=\"beta\",\
                 peer_node_id=\"1\",volume=\"0\",replication_state=\"SyncSource\"}",
                1.0,
            ),
            (
                "tandem_peer_device_out_of_sync_bytes{resource=\"r0\",peer=\"beta\",\
                 peer_node_id=\"1\",volume=\"0\"}",
                8192.0,
            ),
            (
                "tandem_peer_device_resync_rate_bytes_per_second{resource=\"r0\",peer=\"beta\",\
                 peer_node_id=\"1\",volume=\"0\"}",
                102_400.0,
            ),
            (
                "tandem_peer_device_sent_bytes_total{resource=\"r0\",peer=\"beta\",\
                 peer_node_id=\"1\",volume=\"0\"}",
                12_288.0,
            ),
            (
                "tandem_service_ip_assigned{resource=\"r0\",address=\"10.9.0.100/24\",\
                 device=\"eth0\"}",
                1.0,
            ),
            ("tandem_node_info{node=\"alpha\",version=\"0.1.0\"}", 1.0),
        ];
        for (series, expected) in cases {
            assert_eq!(v.get(series), Some(&expected), "{series}\n{text}");
        }
        // Exactly one state of each set is current.
        let current = v
            .iter()
            .filter(|(k, value)| k.starts_with("tandem_device_disk_state{") && **value == 1.0)
            .count();
        assert_eq!(current, 1);
        for absent in ["tandem_resource_quorum", "tandem_connection_round_trip_seconds"] {
            assert!(!text.contains(absent), "{absent} is left out when the sample has no value");
        }
        let mut with_quorum =
            sample(Some(view(Role::Secondary, DiskState::Outdated, ConnectionState::Connecting)));
        with_quorum.quorum = Some(false);
        with_quorum.peers[0].round_trip_s = Some(0.000_055);
        let v = values(&render("alpha", &[with_quorum], Format::PrometheusText));
        assert_eq!(v["tandem_resource_quorum{resource=\"r0\"}"], 0.0);
        assert_eq!(
            v["tandem_connection_round_trip_seconds{resource=\"r0\",peer=\"beta\",peer_node_id=\"1\"}"],
            0.000_055
        );
    }

    #[test]
    fn every_series_has_one_help_and_type_and_openmetrics_ends_with_eof() {
        let samples =
            [sample(Some(view(Role::Primary, DiskState::UpToDate, ConnectionState::Connected)))];
        let text = render("alpha", &samples, Format::PrometheusText);
        let mut typed = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).expect("name");
            assert!(typed.insert(name.to_owned()), "{name} declared twice");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().expect("name");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "{name} has no TYPE line");
        }
        let open = render("alpha", &samples, Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::PrometheusText);
        assert_eq!(Format::from_accept(None), Format::PrometheusText);
    }
}
