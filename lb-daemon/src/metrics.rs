//! Prometheus metrics. The data plane's per-CPU counters are read at scrape time (a `Collector`),
//! so scraping costs the data plane nothing and the numbers are never stale.

use std::{
    fmt,
    sync::{Arc, RwLock, atomic::Ordering::Relaxed},
};

use axum::{
    Json, Router,
    extract::Query,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
    },
    registry::Registry,
};
use tracing::warn;

use crate::{
    backend::Backend,
    config::Config,
    conntable::{ConnTable, FlowKey},
    dataplane::Counters,
    pool::Pool,
    proxy::{Proxy, Service},
};

/// What the collectors report on, refreshed on every (re)load.
#[derive(Default)]
pub struct Inventory {
    /// (virtual service id, name).
    pub virtual_services: Vec<(u32, String)>,
    pub engines: Vec<u32>,
    /// The proxy's services and pools on this engine.
    pub services: Vec<Arc<Service>>,
    pub pools: Vec<Arc<Pool>>,
    /// The services this engine announces by BGP while they are healthy.
    pub bgp: Vec<crate::bgp::Announcing>,
}

impl Inventory {
    pub fn of(config: &Config, proxy: &Proxy) -> Self {
        Inventory {
            virtual_services: config
                .virtual_services
                .iter()
                .map(|v| (v.id, v.name.clone()))
                .collect(),
            engines: config.engines.iter().map(|e| e.id).collect(),
            services: proxy.services(),
            pools: proxy.pools(),
            bgp: crate::bgp::announcing(
                config.daemon.engine_id,
                &config.virtual_services,
                &proxy.services(),
            ),
        }
    }
}

/// The failover counters: peer probes, roles, announcements, owner queries.
struct PeerCollector(Arc<crate::failover::FailoverCounters>);

impl fmt::Debug for PeerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerCollector")
    }
}

impl Collector for PeerCollector {
    #[allow(clippy::too_many_lines)]
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let fo = &self.0;
        let (c, o, a, mi) = (&fo.peers, &fo.owners, &fo.announce, &fo.mirror);
        for (name, help, v) in [
            (
                "lb_peer_probes_sent",
                "Liveness probes sent to peers (to their daemons)",
                &c.sent,
            ),
            (
                "lb_peer_echoes_sent",
                "Echo probes sent to peers (answered by their data planes)",
                &c.echoes_sent,
            ),
            (
                "lb_peer_probes_answered",
                "Liveness probes of other engines answered",
                &c.answered,
            ),
            (
                "lb_peer_probe_replies",
                "Answers of peers' daemons to this engine's probes",
                &c.replies,
            ),
            (
                "lb_peer_echo_replies",
                "Echoes that came back from peers' data planes",
                &c.echo_replies,
            ),
            (
                "lb_promotions",
                "Times this engine took the primary role of a virtual service",
                &fo.promotions,
            ),
            (
                "lb_demotions",
                "Times this engine gave up the primary role to a higher epoch",
                &fo.demotions,
            ),
            (
                "lb_garp_sent",
                "Gratuitous ARP announcements sent for VIPs",
                &a.garp_sent,
            ),
            (
                "lb_unsolicited_na_sent",
                "Unsolicited neighbour advertisements sent for VIPs",
                &a.na_sent,
            ),
            (
                "lb_announce_errors",
                "Announcements that could not be sent",
                &a.send_errors,
            ),
            (
                "lb_owner_queries_asked",
                "Flows of unknown owner this engine asked its peers about",
                &o.asked,
            ),
            (
                "lb_owner_queries_answered",
                "Asked flows an engine said it owns",
                &o.answered,
            ),
            (
                "lb_owner_queries_unowned",
                "Asked flows no engine owns (given to this engine)",
                &o.unowned,
            ),
            (
                "lb_owner_queries_unanswered",
                "Asked flows some peer did not answer about in time, retries spent",
                &o.unanswered,
            ),
            (
                "lb_owner_queries_retried",
                "Flows asked about again: some peer had not answered in time",
                &o.retried,
            ),
            (
                "lb_owner_queries_overflow",
                "Flows not asked about: too many waiting",
                &o.overflow,
            ),
            (
                "lb_owner_queries_served",
                "Owner queries of other engines answered",
                &o.queries_answered,
            ),
            (
                "lb_owner_flows_kernel_held",
                "Flows this engine claimed in an owner query that only the kernel's socket table knew (half open, or not accepted by the proxy yet)",
                &o.kernel_held,
            ),
            (
                "lb_owner_flows_kernel_over_budget",
                "Asked flows not in the proxy's table that were not looked up in the kernel's: over its 1000 lookups/s",
                &o.kernel_over_budget,
            ),
            (
                "lb_flows_bulk_loaded",
                "Flows written into the connection table from surviving engines' lists",
                &o.bulk_loaded,
            ),
            (
                "lb_flows_pushed",
                "Flows sent to a new primary",
                &o.bulk_sent,
            ),
            (
                "lb_persist_mirror_sent",
                "Source-IP persistence entries sent to the other engines (new, refreshed, resent)",
                &mi.sent,
            ),
            (
                "lb_persist_mirror_gone_sent",
                "Source-IP persistence entries said gone (expired or evicted) to the other engines",
                &mi.gone_sent,
            ),
            (
                "lb_persist_mirror_written",
                "Source-IP persistence entries written here from the primary's mirror",
                &mi.written,
            ),
            (
                "lb_persist_mirror_removed",
                "Source-IP persistence entries removed here on the primary's word",
                &mi.removed,
            ),
            (
                "lb_persist_mirror_refused",
                "Persistence messages refused: not from the service's primary, or malformed",
                &mi.refused,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Relaxed)).encode(m)?;
        }
        let mut m = encoder.encode_descriptor(
            "lb_peer_probes_refused",
            "Datagrams on the peer port refused, by reason (length, magic, kind, mac, body, stranger; busy: authentic, but the task it is for is behind)",
            None,
            MetricType::Counter,
        )?;
        for r in crate::peers::Refused::ALL {
            ConstCounter::new(c.refused[r as usize].load(Relaxed))
                .encode(m.encode_family(&[("reason", r.label())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "lb_peer_transitions",
            "Peers' daemons (signal=daemon) or data planes (signal=dataplane) found silent (down) or answering again (up)",
            None,
            MetricType::Counter,
        )?;
        for (signal, to, v) in [
            ("daemon", "down", &c.downs),
            ("daemon", "up", &c.ups),
            ("dataplane", "down", &c.dataplane_downs),
            ("dataplane", "up", &c.dataplane_ups),
        ] {
            ConstCounter::new(v.load(Relaxed))
                .encode(m.encode_family(&[("signal", signal), ("to", to)])?)?;
        }
        Ok(())
    }
}

/// Reads the BPF counters on each scrape.
struct DataplaneCollector {
    counters: Arc<Counters>,
    inventory: Arc<RwLock<Inventory>>,
}

impl fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataplaneCollector")
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let c = &self.counters;
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match c.reasons() {
            Ok(reasons) => {
                let mut m = encoder.encode_descriptor(
                    "lb_xdp_packets",
                    "Packets seen by the XDP program, by what happened to them (reason)",
                    None,
                    MetricType::Counter,
                )?;
                for (r, n) in reasons {
                    ConstCounter::new(n).encode(m.encode_family(&[("reason", r.label())])?)?;
                }
            }
            Err(e) => warn!("reading reason counters: {e}"),
        }
        match c.tx_errors() {
            Some(Ok(errors)) => {
                let mut m = encoder.encode_descriptor(
                    "lb_xdp_tx_errors",
                    "Frames the XDP program sent (XDP_TX, XDP_REDIRECT) that the driver then failed to transmit, from the kernel's xdp tracepoints",
                    None,
                    MetricType::Counter,
                )?;
                for (k, n) in errors {
                    ConstCounter::new(n).encode(m.encode_family(&[("kind", k.label())])?)?;
                }
            }
            Some(Err(e)) => warn!("reading transmit-failure counters: {e}"),
            None => {}
        }
        if let Some(p) = c.program.get() {
            let mut m = encoder.encode_descriptor(
                "lb_xdp_program_info",
                "The attached steering program: kernel program id and tag (changes on upgrade)",
                None,
                MetricType::Gauge,
            )?;
            let id = p.id.to_string();
            ConstGauge::new(1)
                .encode(m.encode_family(&[("id", id.as_str()), ("tag", p.tag.as_str())])?)?;
        }
        let vs: Vec<_> = inv
            .virtual_services
            .iter()
            .filter_map(|(id, name)| c.vs(*id).ok().map(|t| (id.to_string(), name.as_str(), t)))
            .collect();
        let engines: Vec<_> = inv
            .engines
            .iter()
            .filter_map(|id| c.engine(*id).ok().map(|t| (id.to_string(), t)))
            .collect();
        for (metric, help, pick) in TRAFFIC {
            let name = format!("lb_vs_{metric}");
            let mut m = encoder.encode_descriptor(
                &name,
                &format!("{help} per virtual service (steered by this engine)"),
                None,
                MetricType::Counter,
            )?;
            for (id, name, t) in &vs {
                ConstCounter::new(pick(t))
                    .encode(m.encode_family(&[("vs_id", id.as_str()), ("vs", name)])?)?;
            }
            let name = format!("lb_engine_{metric}");
            let mut m = encoder.encode_descriptor(
                &name,
                &format!("{help} sent to each engine"),
                None,
                MetricType::Counter,
            )?;
            for (id, t) in &engines {
                ConstCounter::new(pick(t)).encode(m.encode_family(&[("engine", id.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// Reads the proxy's and the backends' atomics on each scrape.
struct ProxyCollector {
    inventory: Arc<RwLock<Inventory>>,
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyCollector")
    }
}

type ServicePick = fn(&Service) -> u64;
const SERVICE_COUNTERS: [(&str, &str, ServicePick); 9] = [
    (
        "lb_proxy_connections",
        "Connections (TCP) and sessions (UDP) accepted",
        |s| s.stats.total.load(Relaxed),
    ),
    (
        "lb_proxy_connect_failures",
        "Backend connections that failed (the client was reset)",
        |s| s.stats.connect_failures.load(Relaxed),
    ),
    (
        "lb_proxy_drain_resets",
        "Connections reset at the drain deadline",
        |s| s.stats.drain_resets.load(Relaxed),
    ),
    (
        "lb_proxy_idle_timeouts",
        "Connections closed for idleness",
        |s| s.stats.idle_timeouts.load(Relaxed),
    ),
    (
        "lb_proxy_refused_no_backend",
        "Clients refused at once: no usable backend",
        |s| s.stats.refused_no_backend.load(Relaxed),
    ),
    (
        "lb_proxy_refused_limit",
        "Clients refused at once: max_connections reached",
        |s| s.stats.refused_limit.load(Relaxed),
    ),
    (
        "lb_proxy_refused_draining",
        "UDP datagrams of new clients dropped while draining",
        |s| s.stats.refused_draining.load(Relaxed),
    ),
    (
        "lb_proxy_udp_kernel_drops",
        "UDP datagrams the kernel dropped on the VIP socket (receive buffer full)",
        |s| s.stats.udp_kernel_drops.load(Relaxed),
    ),
    (
        "lb_proxy_udp_dropped",
        "UDP datagrams of sessions the proxy dropped (backend socket full or refusing, too long)",
        |s| s.stats.udp_dropped.load(Relaxed),
    ),
];

type BackendPick = fn(&Backend) -> u64;
/// A backend's labels (pool, address) and the backend.
type BackendSeries<'a> = ([(&'static str, String); 2], &'a Arc<Backend>);
const BACKEND_COUNTERS: [(&str, &str, BackendPick); 5] = [
    (
        "lb_backend_connections",
        "Connections opened to the backend",
        |b| b.total.load(Relaxed),
    ),
    (
        "lb_backend_connect_failures",
        "Connection attempts to the backend that failed",
        |b| b.connect_failures.load(Relaxed),
    ),
    (
        "lb_backend_health_changes",
        "Health state changes of the backend",
        |b| b.health_changes.load(Relaxed),
    ),
    (
        "lb_backend_bytes_to_backend",
        "Bytes relayed to the backend (finished connections)",
        |b| b.bytes_to_backend.load(Relaxed),
    ),
    (
        "lb_backend_bytes_to_client",
        "Bytes relayed from the backend (finished connections)",
        |b| b.bytes_to_client.load(Relaxed),
    ),
];

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let vs_labels: Vec<[(&str, String); 2]> = inv
            .services
            .iter()
            .map(|s| {
                [
                    ("vs", s.name.to_string()),
                    ("protocol", s.protocol.to_string()),
                ]
            })
            .collect();
        let mut m = encoder.encode_descriptor(
            "lb_proxy_connections_active",
            "Connections (TCP) and sessions (UDP) open now",
            None,
            MetricType::Gauge,
        )?;
        for (s, l) in inv.services.iter().zip(&vs_labels) {
            ConstGauge::new(s.stats.active.load(Relaxed)).encode(m.encode_family(l)?)?;
        }
        for (name, help, pick) in SERVICE_COUNTERS {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (s, l) in inv.services.iter().zip(&vs_labels) {
                ConstCounter::new(pick(s)).encode(m.encode_family(l)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "lb_proxy_bytes",
            "Bytes relayed by finished connections, by direction",
            None,
            MetricType::Counter,
        )?;
        for (s, l) in inv.services.iter().zip(&vs_labels) {
            for (dir, v) in [
                ("to_backend", &s.stats.bytes_to_backend),
                ("to_client", &s.stats.bytes_to_client),
            ] {
                let labels = [l[0].clone(), l[1].clone(), ("direction", dir.to_string())];
                ConstCounter::new(v.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "lb_proxy_connect_latency_seconds",
            "Time from accepting a client to an established backend connection",
            None,
            MetricType::Histogram,
        )?;
        for (s, l) in inv.services.iter().zip(&vs_labels) {
            s.stats.connect_latency.encode(m.encode_family(l)?)?;
        }

        let backends: Vec<BackendSeries> = inv
            .pools
            .iter()
            .flat_map(|p| {
                p.backends.iter().map(move |b| {
                    (
                        [("pool", p.name.clone()), ("backend", b.addr.to_string())],
                        b,
                    )
                })
            })
            .collect();
        let mut m = encoder.encode_descriptor(
            "lb_backend_up",
            "1 when the backend takes new connections (enabled, weight > 0, healthy)",
            None,
            MetricType::Gauge,
        )?;
        for (l, b) in &backends {
            ConstGauge::new(i64::from(b.is_usable())).encode(m.encode_family(l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "lb_backend_connections_active",
            "Connections open to the backend now",
            None,
            MetricType::Gauge,
        )?;
        for (l, b) in &backends {
            ConstGauge::new(b.active.load(Relaxed)).encode(m.encode_family(l)?)?;
        }
        for (name, help, pick) in BACKEND_COUNTERS {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (l, b) in &backends {
                ConstCounter::new(pick(b)).encode(m.encode_family(l)?)?;
            }
        }
        Ok(())
    }
}

type Pick = fn(&lb_common::TrafficCounters) -> u64;
const TRAFFIC: [(&str, &str, Pick); 3] = [
    ("packets", "Packets", |t| t.packets),
    ("bytes", "Bytes", |t| t.bytes),
    ("new_flows", "New flows", |t| t.new_flows),
];

/// The daemon's registry: data-plane counters plus the daemon's own.
/// The BGP speaker's sessions, one series per peer.
struct BgpCollector(crate::bgp::PeerList);

impl fmt::Debug for BgpCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BgpCollector")
    }
}

type BgpPick = fn(&crate::bgp::PeerStatus) -> u64;

impl Collector for BgpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let peers: Vec<([(&str, String); 1], crate::bgp::PeerStatus)> = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(a, s)| {
                let status = s
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                ([("peer", a.to_string())], status)
            })
            .collect();
        if peers.is_empty() {
            // No speaker: no BGP series at all.
            return Ok(());
        }
        let gauges: [(&str, &str, BgpPick); 4] = [
            (
                "lb_bgp_bfd_up",
                "1 while the BFD session with the peer is up (0: down, or no BFD)",
                |s| {
                    u64::from(
                        s.bfd
                            .as_ref()
                            .is_some_and(|b| *b.borrow() == crate::bgp::bfd::State::Up),
                    )
                },
            ),
            (
                "lb_bgp_session_established",
                "1 while the BGP session with the peer is established",
                |s| u64::from(s.state == crate::bgp::State::Established),
            ),
            (
                "lb_bgp_session_uptime_seconds",
                "How long the current BGP session has been established",
                |s| s.established_at.map_or(0, |t| t.elapsed().as_secs()),
            ),
            (
                "lb_bgp_routes_announced",
                "Routes announced to the peer on the current session",
                |s| s.announced as u64,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (l, s) in &peers {
                ConstGauge::new(pick(s)).encode(m.encode_family(l)?)?;
            }
        }
        let counters: [(&str, &str, BgpPick); 4] = [
            (
                "lb_bgp_sessions_established",
                "BGP sessions with the peer that reached Established",
                |s| s.established_total,
            ),
            (
                "lb_bgp_updates_received",
                "UPDATEs the peer sent (ignored: the speaker only announces)",
                |s| s.updates_received,
            ),
            (
                "lb_bgp_malformed_updates",
                "UPDATEs from the peer that did not parse (ignored)",
                |s| s.malformed_updates,
            ),
            (
                "lb_bgp_unannounceable_routes",
                "Routes that could not be announced to the peer (no next hop of their family)",
                |s| s.unannounceable,
            ),
        ];
        for (name, help, pick) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (l, s) in &peers {
                ConstCounter::new(pick(s)).encode(m.encode_family(l)?)?;
            }
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    /// Configuration reloads by result (`ok`, `error`).
    pub reloads: Family<[(&'static str, &'static str); 1], Counter>,
    /// Controller snapshots by result (`applied`, `unchanged`, `refused`).
    pub snapshots: Family<[(&'static str, &'static str); 1], Counter>,
    /// Map entries written by applies after the start, by map: what a change cost the data plane.
    pub map_writes: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Metrics {
    pub fn new(
        counters: Arc<Counters>,
        inventory: Arc<RwLock<Inventory>>,
        failover: Arc<crate::failover::FailoverCounters>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "lb_owner_query_seconds",
            "Time from an owner query to its answer",
            failover.owners.latency.clone(),
        );
        registry.register(
            "lb_persist_mirror_scan_seconds",
            "Time the primary's scan of its persistence table takes",
            failover.mirror.scan_seconds.clone(),
        );
        registry.register_collector(Box::new(PeerCollector(failover)));
        registry.register_collector(Box::new(DataplaneCollector {
            counters,
            inventory: inventory.clone(),
        }));
        registry.register_collector(Box::new(ProxyCollector { inventory }));
        let reloads = Family::default();
        registry.register(
            "lb_config_reloads",
            "Configuration reloads (SIGHUP) by result",
            reloads.clone(),
        );
        let snapshots = Family::default();
        registry.register(
            "lb_controller_snapshots",
            "Desired-state snapshots from the controller, by result (applied, unchanged, refused)",
            snapshots.clone(),
        );
        let map_writes = Family::default();
        registry.register(
            "lb_dataplane_map_writes",
            "Map entries written by configuration changes after the start, by map (only differences are written)",
            map_writes.clone(),
        );
        Metrics {
            registry,
            reloads,
            snapshots,
            map_writes,
        }
    }

    /// Adds the BGP speaker's per-peer series (none while no speaker runs).
    pub fn register_bgp(&mut self, peers: crate::bgp::PeerList) {
        self.registry
            .register_collector(Box::new(BgpCollector(peers)));
    }

    /// Counts what an apply wrote.
    pub fn applied(&self, applied: &crate::engine::Applied) {
        if let crate::engine::Applied::Changed { writes } = applied {
            for (map, _, n) in writes {
                self.map_writes
                    .get_or_create(&[("map", *map)])
                    .inc_by(*n as u64);
            }
        }
    }

    pub fn snapshot(&self, result: &'static str) {
        self.snapshots.get_or_create(&[("result", result)]).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&[("result", if ok { "ok" } else { "error" })])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            warn!("encoding metrics: {e}");
        }
        out
    }
}

/// A `GET /connections` query: all connections, one virtual service's (`vs`), or the one of a
/// client flow (`client`, `vip`, `protocol` together).
#[derive(Debug, serde::Deserialize)]
struct ConnQuery {
    vs: Option<String>,
    client: Option<std::net::SocketAddr>,
    vip: Option<std::net::SocketAddr>,
    protocol: Option<crate::config::Protocol>,
}

/// Serves `GET /metrics` and `GET /connections` (JSON) on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    conns: Arc<ConnTable>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/connections",
            get(move |Query(q): Query<ConnQuery>| {
                let conns = conns.clone();
                async move {
                    match (q.client, q.vip, q.protocol) {
                        (Some(client), Some(vip), Some(protocol)) => match conns.get(&FlowKey {
                            client,
                            vip,
                            protocol,
                        }) {
                            Some(c) => Json(c).into_response(),
                            None => (StatusCode::NOT_FOUND, "no such connection\n").into_response(),
                        },
                        (None, None, None) => Json(conns.list(q.vs.as_deref())).into_response(),
                        _ => (
                            StatusCode::BAD_REQUEST,
                            "a flow lookup needs client, vip and protocol\n",
                        )
                            .into_response(),
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}
