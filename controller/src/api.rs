//! The operator API (`lb.v1.Operator`): conversions between its messages and the model, with
//! every refusal a status naming the field, and one `From<ClusterError> for Status`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use lb_api::v1::{self as pb, operator_server::Operator};
use lb_model::{
    Algorithm, BackendConfig, BfdConfig, BgpConfig, BgpPeerConfig, HealthCheckConfig,
    HealthCheckKind, PoolConfig, Protocol, VsBgpConfig,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    cluster::{BGP_MAX_ENGINES, Cluster, ClusterError, GroupView, invalid},
    events::Event,
    health::EngineHealth,
    rebalance::{Criterion, RebalanceSettings},
    store::{DEFAULT_GROUP, VsRecord, VsSpec},
    tls::{Role, require},
};

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Self {
        let msg = e.to_string();
        match e {
            ClusterError::InvalidArgument { .. } => Status::invalid_argument(msg),
            ClusterError::NotFound(_) => Status::not_found(msg),
            ClusterError::AlreadyExists(_) => Status::already_exists(msg),
            ClusterError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ClusterError::Aborted(_) => Status::aborted(msg),
            ClusterError::Store(_) => Status::unavailable(msg),
        }
    }
}

/// The shared cluster state.
pub type Shared = Arc<Mutex<Cluster>>;

pub fn lock(c: &Shared) -> MutexGuard<'_, Cluster> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct OperatorService {
    pub cluster: Shared,
    /// Plain-text mode (`--insecure`): no certificates, no roles.
    pub insecure: bool,
    /// Turns true when the controller stops: event streams end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl OperatorService {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.insecure {
            return Ok(());
        }
        require(req, Role::Operator).map(|_| ())
    }
}

/// Longest accepted name or string field.
const MAX_STRING: usize = 253;

fn parse_enum<T: for<'de> serde::Deserialize<'de>>(
    field: &str,
    value: &str,
    choices: &str,
) -> Result<T, ClusterError> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| invalid(field, format!("{value:?} is not one of {choices}")))
}

fn port(field: &str, p: u32) -> Result<u16, ClusterError> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(field, format!("{p} is out of range 1..=65535"))),
    }
}

fn addr(field: &str, s: &str) -> Result<IpAddr, ClusterError> {
    s.trim()
        .parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IP address")))
}

fn short(field: &str, s: &str) -> Result<(), ClusterError> {
    if s.len() > MAX_STRING {
        return Err(invalid(
            field,
            format!("{} bytes long, at most {MAX_STRING}", s.len()),
        ));
    }
    Ok(())
}

pub fn pool_from_pb(p: pb::Pool) -> Result<PoolConfig, ClusterError> {
    short("name", &p.name)?;
    let algorithm = if p.algorithm.is_empty() {
        Algorithm::default()
    } else {
        parse_enum(
            "algorithm",
            &p.algorithm,
            "round_robin, weighted_round_robin, least_connections, consistent_hash",
        )?
    };
    if p.backends.len() > 1024 {
        return Err(invalid("backends", "at most 1024 backends"));
    }
    let backends = p
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Ok(BackendConfig {
                address: addr(&format!("backends[{i}].address"), &b.address)?,
                port: port(&format!("backends[{i}].port"), b.port)?,
                weight: b.weight.unwrap_or(1),
                enabled: b.enabled.unwrap_or(true),
            })
        })
        .collect::<Result<Vec<_>, ClusterError>>()?;
    let health_check = p
        .health_check
        .map(|h| -> Result<HealthCheckConfig, ClusterError> {
            let kind: HealthCheckKind = parse_enum("health_check.kind", &h.kind, "tcp, http")?;
            // The model's defaults for everything not given.
            let mut c: HealthCheckConfig =
                serde_json::from_value(serde_json::json!({ "kind": kind }))
                    .expect("a kind alone is a valid health check");
            if let Some(v) = h.interval_ms {
                c.interval_ms = v;
            }
            if let Some(v) = h.timeout_ms {
                c.timeout_ms = v;
            }
            if let Some(v) = h.rise {
                c.rise = v;
            }
            if let Some(v) = h.fall {
                c.fall = v;
            }
            if let Some(v) = h.port {
                c.port = Some(port("health_check.port", v)?);
            }
            if let Some(v) = h.http_path {
                short("health_check.http_path", &v)?;
                c.http_path = v;
            }
            if let Some(v) = h.http_host {
                short("health_check.http_host", &v)?;
                c.http_host = Some(v);
            }
            if let Some(v) = h.expected_status {
                c.expected_status = u16::try_from(v).map_err(|_| {
                    invalid(
                        "health_check.expected_status",
                        format!("{v} is not an HTTP status"),
                    )
                })?;
            }
            Ok(c)
        })
        .transpose()?;
    Ok(PoolConfig {
        name: p.name,
        algorithm,
        backends,
        health_check,
    })
}

fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn pool_to_pb(c: &PoolConfig, resource_version: u64) -> pb::Pool {
    pb::Pool {
        name: c.name.clone(),
        algorithm: enum_name(&c.algorithm),
        backends: c
            .backends
            .iter()
            .map(|b| pb::Backend {
                address: b.address.to_string(),
                port: u32::from(b.port),
                weight: Some(b.weight),
                enabled: Some(b.enabled),
            })
            .collect(),
        health_check: c.health_check.as_ref().map(|h| pb::HealthCheck {
            kind: enum_name(&h.kind),
            interval_ms: Some(h.interval_ms),
            timeout_ms: Some(h.timeout_ms),
            rise: Some(h.rise),
            fall: Some(h.fall),
            port: h.port.map(u32::from),
            http_path: Some(h.http_path.clone()),
            http_host: h.http_host.clone(),
            expected_status: Some(u32::from(h.expected_status)),
        }),
        resource_version,
    }
}

pub fn vs_from_pb(v: pb::VirtualService, native_max: u32) -> Result<VsSpec, ClusterError> {
    short("name", &v.name)?;
    short("pool", &v.pool)?;
    let protocol: Protocol = if v.protocol.is_empty() {
        Protocol::Tcp
    } else {
        parse_enum("protocol", &v.protocol, "tcp, udp")?
    };
    let scaling = v.scaling.unwrap_or_default();
    if scaling.tags.len() > 32 {
        return Err(invalid("scaling.tags", "at most 32 tags"));
    }
    for (k, val) in &scaling.tags {
        short("scaling.tags", k)?;
        short("scaling.tags", val)?;
    }
    let max_connections = v.max_connections.unwrap_or(100_000);
    if max_connections == 0 {
        return Err(invalid("max_connections", "must be at least 1"));
    }
    let bgp = match scaling.mode.as_str() {
        "" | "native" => {
            if v.route.is_some() {
                return Err(invalid(
                    "route",
                    "route attributes are for scaling mode bgp only",
                ));
            }
            None
        }
        "bgp" => {
            let route = v.route.unwrap_or_default();
            Some(VsBgpConfig {
                med: route.med,
                local_pref: route.local_pref,
            })
        }
        other => {
            return Err(invalid(
                "scaling.mode",
                format!("{other:?} is not one of native, bgp"),
            ));
        }
    };
    let default_max = if bgp.is_some() {
        BGP_MAX_ENGINES
    } else {
        native_max
    };
    Ok(VsSpec {
        name: v.name,
        vip: addr("vip", &v.vip)?,
        port: port("port", v.port)?,
        protocol,
        pool: v.pool,
        persistence_timeout_s: v.persistence_timeout_s,
        max_connections,
        min_engines: if scaling.min_engines == 0 {
            1
        } else {
            scaling.min_engines
        },
        max_engines: if scaling.max_engines == 0 {
            default_max
        } else {
            scaling.max_engines
        },
        tags: scaling.tags.into_iter().collect(),
        engine_group: if v.engine_group.is_empty() {
            DEFAULT_GROUP.to_owned()
        } else {
            short("engine_group", &v.engine_group)?;
            v.engine_group
        },
        bgp,
    })
}

/// The BGP settings of `b`, validated as an engine would (with a stand-in router id: each engine
/// uses its own address).
pub fn bgp_from_pb(b: &pb::BgpSettings) -> Result<BgpConfig, ClusterError> {
    let defaults = BgpConfig::new(b.asn, std::net::Ipv4Addr::UNSPECIFIED, Vec::new());
    if b.peers.len() > 64 {
        return Err(invalid("peers", "at most 64"));
    }
    let mut peers = Vec::new();
    for (i, p) in b.peers.iter().enumerate() {
        let field = |f: &str| format!("peers[{i}].{f}");
        let bfd = p
            .bfd
            .map(|t| {
                let d = BfdConfig::default();
                Ok::<_, ClusterError>(BfdConfig {
                    min_tx_ms: if t.min_tx_ms == 0 {
                        d.min_tx_ms
                    } else {
                        t.min_tx_ms
                    },
                    min_rx_ms: if t.min_rx_ms == 0 {
                        d.min_rx_ms
                    } else {
                        t.min_rx_ms
                    },
                    multiplier: match t.multiplier {
                        0 => d.multiplier,
                        m => u8::try_from(m).map_err(|_| {
                            invalid(field("bfd.multiplier"), format!("{m} is outside 1–255"))
                        })?,
                    },
                })
            })
            .transpose()?;
        peers.push(BgpPeerConfig {
            address: addr(&field("address"), &p.address)?,
            asn: p.asn,
            port: if p.port == 0 {
                179
            } else {
                port(&field("port"), p.port)?
            },
            hold_time_s: p
                .hold_time_s
                .map(|h| {
                    u16::try_from(h)
                        .map_err(|_| invalid(field("hold_time_s"), format!("{h} is above 65535")))
                })
                .transpose()?,
            bfd,
            next_hop_v4: None,
            next_hop_v6: None,
            password: (!p.password.is_empty()).then(|| lb_model::Password(p.password.clone())),
        });
    }
    let config = BgpConfig {
        asn: b.asn,
        router_id: std::net::Ipv4Addr::UNSPECIFIED,
        hold_time_s: match b.hold_time_s {
            0 => defaults.hold_time_s,
            h => u16::try_from(h)
                .map_err(|_| invalid("hold_time_s", format!("{h} is above 65535")))?,
        },
        min_backoff_ms: if b.min_backoff_ms == 0 {
            defaults.min_backoff_ms
        } else {
            b.min_backoff_ms
        },
        max_backoff_s: if b.max_backoff_s == 0 {
            defaults.max_backoff_s
        } else {
            b.max_backoff_s
        },
        communities: b.communities.clone(),
        peers,
    };
    let mut check = config.clone();
    check.router_id = std::net::Ipv4Addr::new(192, 0, 2, 1);
    check.validate().map_err(|e| match e {
        lb_model::ConfigError::Invalid { field, reason } => invalid(
            field.strip_prefix("bgp.").unwrap_or(&field).to_owned(),
            reason,
        ),
        other => invalid("bgp", other.to_string()),
    })?;
    Ok(config)
}

pub fn bgp_to_pb(b: &BgpConfig, resource_version: u64) -> pb::BgpSettings {
    pb::BgpSettings {
        asn: b.asn,
        hold_time_s: u32::from(b.hold_time_s),
        communities: b.communities.clone(),
        min_backoff_ms: b.min_backoff_ms,
        max_backoff_s: b.max_backoff_s,
        peers: b
            .peers
            .iter()
            .map(|p| pb::BgpPeer {
                address: p.address.to_string(),
                asn: p.asn,
                port: u32::from(p.port),
                hold_time_s: p.hold_time_s.map(u32::from),
                bfd: p.bfd.map(|t| pb::BfdTimers {
                    min_tx_ms: t.min_tx_ms,
                    min_rx_ms: t.min_rx_ms,
                    multiplier: u32::from(t.multiplier),
                }),
                // Write only: the key is not read back.
                password: String::new(),
                has_password: p.password.is_some(),
            })
            .collect(),
        resource_version,
    }
}

/// `g`'s settings over `base` (the defaults on create, the stored settings on update): a field
/// left out keeps the base's value. Ranges are checked by the cluster, naming the field.
pub fn group_settings_from_pb(
    g: &pb::EngineGroup,
    base: RebalanceSettings,
) -> Result<RebalanceSettings, ClusterError> {
    let secs = |v: Option<u32>, d: Duration| v.map_or(d, |s| Duration::from_secs(u64::from(s)));
    let criterion = match &g.criterion {
        Some(c) => Criterion::parse(c).map_err(|e| invalid("criterion", e))?,
        None => base.criterion,
    };
    Ok(RebalanceSettings {
        enabled: g.auto_rebalance.unwrap_or(base.enabled),
        dry_run: g.dry_run.unwrap_or(base.dry_run),
        interval: secs(g.auto_rebalance_interval_s, base.interval),
        window: secs(g.window_s, base.window),
        criterion,
        max: g.max_usage.unwrap_or(base.max),
        min: g.min_usage.unwrap_or(base.min),
        hot_share: g.hot_share_pct.map_or(base.hot_share, |p| p / 100.0),
        max_scaleout_per_vs: g.max_scaleout_per_vs.unwrap_or(base.max_scaleout_per_vs),
        min_scaleout_per_vs: g.min_scaleout_per_vs.unwrap_or(base.min_scaleout_per_vs),
        scalein_timeout: secs(g.vs_scalein_timeout_s, base.scalein_timeout),
        buffer_se: g.buffer_se.unwrap_or(base.buffer_se),
        cooldown: secs(g.cooldown_s, base.cooldown),
    })
}

pub fn group_to_pb(g: &GroupView) -> pb::EngineGroup {
    let s = g.record.settings;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    pb::EngineGroup {
        name: g.record.name.clone(),
        auto_rebalance: Some(s.enabled),
        dry_run: Some(s.dry_run),
        auto_rebalance_interval_s: Some(secs(s.interval)),
        window_s: Some(secs(s.window)),
        criterion: Some(s.criterion.name().to_owned()),
        max_usage: Some(s.max),
        min_usage: Some(s.min),
        hot_share_pct: Some(s.hot_share * 100.0),
        max_scaleout_per_vs: Some(s.max_scaleout_per_vs),
        min_scaleout_per_vs: Some(s.min_scaleout_per_vs),
        vs_scalein_timeout_s: Some(secs(s.scalein_timeout)),
        buffer_se: Some(s.buffer_se),
        cooldown_s: Some(secs(s.cooldown)),
        resource_version: g.record.resource_version,
        engines: g.engines.clone(),
        virtual_services: g.virtual_services.clone(),
    }
}

pub fn vs_to_pb(r: &VsRecord, c: &Cluster) -> pb::VirtualService {
    let healthy = |e: &str| c.health(e).is_some_and(EngineHealth::is_healthy);
    let placement = c
        .placement_view(r)
        .into_iter()
        .map(|p| pb::Placement {
            state: c
                .health(&p.engine)
                .map_or("unknown", EngineHealth::name)
                .into(),
            engine: p.engine,
            role: p.role.into(),
            weight: p.weight,
            phase: p.phase.into(),
            open_connections: p.open_connections,
            remaining_ms: p.remaining_ms,
        })
        .collect();
    let serving = u32::try_from(r.placement.iter().filter(|e| healthy(e)).count()).unwrap_or(0);
    let backends = c
        .persisted()
        .pools
        .get(&r.spec.pool)
        .map_or(0, |p| u32::try_from(p.config.backends.len()).unwrap_or(0));
    // Backends up: the lowest count any serving engine reports (what every engine can use).
    let up = r
        .placement
        .iter()
        .filter(|e| healthy(e))
        .filter_map(|e| c.observed(e)?.backends_up.get(&r.spec.pool).copied())
        .min()
        .unwrap_or(backends);
    let share = |a: u32, b: u32| {
        if b == 0 {
            1.0
        } else {
            f64::from(a) / f64::from(b)
        }
    };
    pb::VirtualService {
        name: r.spec.name.clone(),
        vip: r.spec.vip.to_string(),
        port: u32::from(r.spec.port),
        protocol: r.spec.protocol.to_string(),
        pool: r.spec.pool.clone(),
        persistence_timeout_s: r.spec.persistence_timeout_s,
        max_connections: Some(r.spec.max_connections),
        scaling: Some(pb::ScalingPolicy {
            min_engines: r.spec.min_engines,
            max_engines: r.spec.max_engines,
            tags: r.spec.tags.clone().into_iter().collect(),
            mode: if r.spec.by_bgp() { "bgp" } else { "native" }.to_owned(),
        }),
        route: r.spec.bgp.as_ref().map(|b| pb::RouteAttributes {
            med: b.med,
            local_pref: b.local_pref,
        }),
        engine_group: r.spec.engine_group.clone(),
        resource_version: r.resource_version,
        id: r.id,
        epoch: r.epoch,
        placement,
        health: Some(pb::HealthScore {
            engines_serving: serving,
            engines_requested: r.spec.min_engines,
            backends_up: up,
            backends,
            score: share(serving, r.spec.min_engines)
                .min(1.0)
                .min(share(up, backends)),
        }),
    }
}

/// The role of the engine at `index` of a service's placement: `primary` / `secondary`, or
/// `member` in scaling mode bgp (no primary).
pub fn role(spec: &VsSpec, index: usize) -> &'static str {
    match (spec.by_bgp(), index) {
        (true, _) => "member",
        (false, 0) => "primary",
        (false, _) => "secondary",
    }
}

pub fn engine_to_pb(name: &str, c: &Cluster) -> Option<pb::EngineStatus> {
    let e = c.persisted().engines.get(name)?;
    let o = c.observed(name).cloned().unwrap_or_default();
    let mut roles = BTreeMap::new();
    for v in c.persisted().services.values() {
        if let Some(i) = v.placement.iter().position(|p| p == name) {
            roles.insert(v.spec.name.clone(), role(&v.spec, i).to_owned());
        }
    }
    Some(pb::EngineStatus {
        name: e.name.clone(),
        id: e.id,
        addresses: e.addresses.iter().map(ToString::to_string).collect(),
        mac: e.mac.to_string(),
        tags: e.tags.clone().into_iter().collect(),
        state: c
            .health(name)
            .map_or("registered", EngineHealth::name)
            .into(),
        connected: o.connected,
        virtual_services: u32::try_from(roles.len()).unwrap_or(u32::MAX),
        roles: roles.into_iter().collect(),
        cpu_pct: o.cpu_pct,
        cpu_source: o.cpu_source.clone(),
        host_cpu_pct: o.host_cpu_pct,
        daemon_cpu_pct: o.daemon_cpu_pct,
        softirq_pct: o.softirq_pct,
        group: e.group.clone(),
        memory_bytes: o.memory_bytes,
        pps: o.pps,
        connections: o.connections,
        last_heartbeat_unix_ms: o.last_heartbeat_unix_ms,
        applied_version: o.applied_version,
        desired_version: c.snapshot_version(),
        last_error: o
            .nack
            .map(|(v, e)| format!("version {v}: {e}"))
            .unwrap_or_default(),
        peers: o
            .peers
            .iter()
            .map(|(id, r)| pb::PeerReport {
                engine: c
                    .persisted()
                    .engines
                    .values()
                    .find(|e| e.id == *id)
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
                id: *id,
                daemon_up: r.daemon_up,
                dataplane_up: r.dataplane_up,
            })
            .collect(),
        bgp_peers: o
            .bgp
            .iter()
            .map(|b| pb::BgpPeerStatus {
                peer: b.peer.clone(),
                state: b.state.clone(),
                uptime_s: b.uptime_s,
                routes_announced: b.routes_announced,
                last_error: b.last_error.clone(),
                bfd: b.bfd.clone(),
            })
            .collect(),
        claims: o
            .claims
            .iter()
            .map(|cl| pb::EngineClaim {
                virtual_service: c
                    .persisted()
                    .services
                    .values()
                    .find(|v| v.id == cl.vs_id)
                    .map(|v| v.spec.name.clone())
                    .unwrap_or_default(),
                vs_id: cl.vs_id,
                epoch: cl.epoch,
            })
            .collect(),
    })
}

fn event_to_pb(e: Event) -> pb::Event {
    pb::Event {
        time_unix_ms: e.time_unix_ms,
        kind: e.kind.into(),
        objects: e.objects,
        reason: e.reason,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_engines(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EngineList>, Status> {
        self.check(&req)?;
        let c = lock(&self.cluster);
        let engines = c
            .persisted()
            .engines
            .keys()
            .filter_map(|n| engine_to_pb(n, &c))
            .collect();
        Ok(Response::new(pb::EngineList { engines }))
    }

    async fn get_engine(
        &self,
        req: Request<pb::Name>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        self.check(&req)?;
        let name = req.into_inner().name;
        let c = lock(&self.cluster);
        engine_to_pb(&name, &c)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("engine {name:?}")))
    }

    async fn create_engine_group(
        &self,
        req: Request<pb::EngineGroup>,
    ) -> Result<Response<pb::EngineGroup>, Status> {
        self.check(&req)?;
        let g = req.into_inner();
        short("name", &g.name)?;
        let settings = group_settings_from_pb(&g, RebalanceSettings::default())?;
        let view = lock(&self.cluster).create_group(&g.name, settings)?;
        Ok(Response::new(group_to_pb(&view)))
    }

    async fn update_engine_group(
        &self,
        req: Request<pb::EngineGroup>,
    ) -> Result<Response<pb::EngineGroup>, Status> {
        self.check(&req)?;
        let g = req.into_inner();
        short("name", &g.name)?;
        let mut c = lock(&self.cluster);
        let stored = c.group(&g.name)?.record.settings;
        let settings = group_settings_from_pb(&g, stored)?;
        let view = c.update_group(&g.name, settings, g.resource_version)?;
        Ok(Response::new(group_to_pb(&view)))
    }

    async fn delete_engine_group(
        &self,
        req: Request<pb::Name>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.check(&req)?;
        lock(&self.cluster).delete_group(&req.into_inner().name)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_engine_group(
        &self,
        req: Request<pb::Name>,
    ) -> Result<Response<pb::EngineGroup>, Status> {
        self.check(&req)?;
        let view = lock(&self.cluster).group(&req.into_inner().name)?;
        Ok(Response::new(group_to_pb(&view)))
    }

    async fn list_engine_groups(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EngineGroupList>, Status> {
        self.check(&req)?;
        let groups = lock(&self.cluster)
            .groups()
            .iter()
            .map(group_to_pb)
            .collect();
        Ok(Response::new(pb::EngineGroupList { groups }))
    }

    async fn create_pool(&self, req: Request<pb::Pool>) -> Result<Response<pb::Pool>, Status> {
        self.check(&req)?;
        let p = pool_from_pb(req.into_inner())?;
        let rec = lock(&self.cluster).create_pool(p)?;
        Ok(Response::new(pool_to_pb(&rec.config, rec.resource_version)))
    }

    async fn update_pool(&self, req: Request<pb::Pool>) -> Result<Response<pb::Pool>, Status> {
        self.check(&req)?;
        let p = req.into_inner();
        let rv = p.resource_version;
        let p = pool_from_pb(p)?;
        let rec = lock(&self.cluster).update_pool(p, rv)?;
        Ok(Response::new(pool_to_pb(&rec.config, rec.resource_version)))
    }

    async fn delete_pool(&self, req: Request<pb::Name>) -> Result<Response<pb::Empty>, Status> {
        self.check(&req)?;
        lock(&self.cluster).delete_pool(&req.into_inner().name)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_pool(&self, req: Request<pb::Name>) -> Result<Response<pb::Pool>, Status> {
        self.check(&req)?;
        let name = req.into_inner().name;
        let c = lock(&self.cluster);
        c.persisted()
            .pools
            .get(&name)
            .map(|r| Response::new(pool_to_pb(&r.config, r.resource_version)))
            .ok_or_else(|| Status::not_found(format!("pool {name:?}")))
    }

    async fn list_pools(&self, req: Request<pb::Empty>) -> Result<Response<pb::PoolList>, Status> {
        self.check(&req)?;
        let c = lock(&self.cluster);
        let pools = c
            .persisted()
            .pools
            .values()
            .map(|r| pool_to_pb(&r.config, r.resource_version))
            .collect();
        Ok(Response::new(pb::PoolList { pools }))
    }

    async fn create_virtual_service(
        &self,
        req: Request<pb::VirtualService>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let mut c = lock(&self.cluster);
        let spec = vs_from_pb(req.into_inner(), c.settings().native_max_engines)?;
        let rec = c.create_vs(spec)?;
        Ok(Response::new(vs_to_pb(&rec, &c)))
    }

    async fn update_virtual_service(
        &self,
        req: Request<pb::VirtualService>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let v = req.into_inner();
        let rv = v.resource_version;
        let mut c = lock(&self.cluster);
        let spec = vs_from_pb(v, c.settings().native_max_engines)?;
        let rec = c.update_vs(spec, rv)?;
        Ok(Response::new(vs_to_pb(&rec, &c)))
    }

    async fn delete_virtual_service(
        &self,
        req: Request<pb::Name>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.check(&req)?;
        lock(&self.cluster).delete_vs(&req.into_inner().name)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_virtual_service(
        &self,
        req: Request<pb::Name>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let name = req.into_inner().name;
        let c = lock(&self.cluster);
        c.persisted()
            .services
            .get(&name)
            .map(|r| Response::new(vs_to_pb(r, &c)))
            .ok_or_else(|| Status::not_found(format!("virtual service {name:?}")))
    }

    async fn list_virtual_services(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::VirtualServiceList>, Status> {
        self.check(&req)?;
        let c = lock(&self.cluster);
        let virtual_services = c
            .persisted()
            .services
            .values()
            .map(|r| vs_to_pb(r, &c))
            .collect();
        Ok(Response::new(pb::VirtualServiceList { virtual_services }))
    }

    async fn scale_out(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let mut c = lock(&self.cluster);
        let engine = (!r.engine.is_empty()).then_some(r.engine.as_str());
        let rec = c.scale_out(&r.virtual_service, engine)?;
        Ok(Response::new(vs_to_pb(&rec, &c)))
    }

    async fn scale_in(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let mut c = lock(&self.cluster);
        let engine = (!r.engine.is_empty()).then_some(r.engine.as_str());
        let rec = c.scale_in(&r.virtual_service, engine)?;
        Ok(Response::new(vs_to_pb(&rec, &c)))
    }

    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<pb::VirtualService>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let mut c = lock(&self.cluster);
        let from = (!r.from_engine.is_empty()).then_some(r.from_engine.as_str());
        let to = (!r.to_engine.is_empty()).then_some(r.to_engine.as_str());
        let rec = c.migrate(&r.virtual_service, from, to)?;
        Ok(Response::new(vs_to_pb(&rec, &c)))
    }

    async fn list_anomalies(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::AnomalyList>, Status> {
        self.check(&req)?;
        let c = lock(&self.cluster);
        let anomalies = c
            .anomalies()
            .into_iter()
            .map(|(a, since)| pb::Anomaly {
                kind: a.kind.into(),
                object: a.object,
                reason: a.reason,
                since_unix_ms: since,
            })
            .collect();
        Ok(Response::new(pb::AnomalyList { anomalies }))
    }

    async fn get_bgp(&self, req: Request<pb::Empty>) -> Result<Response<pb::BgpSettings>, Status> {
        self.check(&req)?;
        let c = lock(&self.cluster);
        let b = c
            .persisted()
            .bgp
            .as_ref()
            .ok_or_else(|| Status::not_found("no BGP settings (lbctl bgp set)"))?;
        Ok(Response::new(bgp_to_pb(&b.config, b.resource_version)))
    }

    async fn set_bgp(
        &self,
        req: Request<pb::BgpSettings>,
    ) -> Result<Response<pb::BgpSettings>, Status> {
        self.check(&req)?;
        let b = req.into_inner();
        let config = if b.peers.is_empty() {
            None
        } else {
            Some(bgp_from_pb(&b)?)
        };
        let mut c = lock(&self.cluster);
        let rec = c.set_bgp(config, b.resource_version)?;
        Ok(Response::new(rec.map_or_else(
            || pb::BgpSettings {
                resource_version: b.resource_version + 1,
                ..Default::default()
            },
            |r| bgp_to_pb(&r.config, r.resource_version),
        )))
    }

    async fn list_events(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EventList>, Status> {
        self.check(&req)?;
        let events = lock(&self.cluster)
            .events
            .recent()
            .into_iter()
            .map(event_to_pb)
            .collect();
        Ok(Response::new(pb::EventList { events }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check(&req)?;
        let mut rx = lock(&self.cluster).events.subscribe();
        let mut shutdown = self.shutdown.clone();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let e = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => break,
                    () = tx.closed() => break,
                    e = rx.recv() => e,
                };
                let msg = match e {
                    Ok(e) => event_to_pb(e),
                    // A watcher too slow to keep up misses events; it is told so.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => pb::Event {
                        time_unix_ms: crate::events::unix_ms(std::time::SystemTime::now()),
                        kind: "lagged".into(),
                        objects: Vec::new(),
                        reason: format!("{n} events were not delivered to this watcher"),
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream)))
    }
}
