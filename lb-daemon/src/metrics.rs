//! Prometheus metrics. The data plane's per-CPU counters are read at scrape time (a `Collector`),
//! so scraping costs the data plane nothing and the numbers are never stale.

use std::{
    fmt,
    sync::{Arc, RwLock},
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family},
    registry::Registry,
};
use tracing::warn;

use crate::{config::Config, dataplane::Counters};

/// Names the collector labels series with, refreshed on every (re)load.
#[derive(Default)]
pub struct Inventory {
    /// (virtual service id, name).
    pub virtual_services: Vec<(u32, String)>,
    pub engines: Vec<u32>,
}

impl Inventory {
    pub fn of(config: &Config) -> Self {
        Inventory {
            virtual_services: config
                .virtual_services
                .iter()
                .map(|v| (v.id, v.name.clone()))
                .collect(),
            engines: config.engines.iter().map(|e| e.id).collect(),
        }
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

type Pick = fn(&lb_common::TrafficCounters) -> u64;
const TRAFFIC: [(&str, &str, Pick); 3] = [
    ("packets", "Packets", |t| t.packets),
    ("bytes", "Bytes", |t| t.bytes),
    ("new_flows", "New flows", |t| t.new_flows),
];

/// The daemon's registry: data-plane counters plus the daemon's own.
pub struct Metrics {
    registry: Registry,
    /// Configuration reloads by result (`ok`, `error`).
    pub reloads: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Metrics {
    pub fn new(counters: Arc<Counters>, inventory: Arc<RwLock<Inventory>>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DataplaneCollector {
            counters,
            inventory,
        }));
        let reloads = Family::default();
        registry.register(
            "lb_config_reloads",
            "Configuration reloads (SIGHUP) by result",
            reloads.clone(),
        );
        Metrics { registry, reloads }
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

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = Router::new().route(
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
    );
    axum::serve(listener, app).await
}
