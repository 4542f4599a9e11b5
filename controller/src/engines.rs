//! The engine API (`lb.v1.EngineApi`): registration, and one session per engine on which the
//! controller pushes snapshots and the engine sends heartbeats, ACKs and NACKs.
//!
//! A session sends the current snapshot at once (a reconnecting engine that runs it already ACKs
//! without applying anything), then every new version. A `NACKed` version is not sent again: the
//! engine keeps its previous state and the NACK stays an anomaly until a new version comes.

use std::{pin::Pin, time::Instant};

use lb_api::v1::{self as pb, controller_message, engine_api_server::EngineApi, engine_message};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::{
    api::{Shared, lock},
    cluster::{BgpSessionReport, Claim, DrainReport, Observed, PeerReport, Snapshot, invalid},
    events::unix_ms,
    store::{DEFAULT_GROUP, EngineRecord},
    tls::{Role, require},
};

pub struct EngineService {
    pub cluster: Shared,
    pub insecure: bool,
    /// Turns true when the controller stops: sessions end, engines reconnect to the next one.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl EngineService {
    /// The engine name the caller's certificate speaks for (`None` in plain-text mode).
    fn identity<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        if self.insecure {
            return Ok(None);
        }
        require(req, Role::Engine).map(Some)
    }
}

fn same_name(cert: Option<&String>, claimed: &str) -> Result<(), Status> {
    match cert {
        Some(c) if c != claimed => Err(Status::permission_denied(format!(
            "the certificate is engine {c:?}'s, not {claimed:?}'s"
        ))),
        _ => Ok(()),
    }
}

type ControllerStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

fn snapshot_msg(s: &Snapshot) -> pb::ControllerMessage {
    pb::ControllerMessage {
        msg: Some(controller_message::Msg::Snapshot(pb::Snapshot {
            version: s.version,
            desired_json: s.json.clone(),
        })),
    }
}

#[tonic::async_trait]
impl EngineApi for EngineService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let cert = self.identity(&req)?;
        let r = req.into_inner();
        same_name(cert.as_ref(), &r.name)?;
        let addresses = r
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse().map_err(|_| {
                    invalid(
                        format!("addresses[{i}]"),
                        format!("{a:?} is not an IP address"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mac = r
            .mac
            .parse()
            .map_err(|e: lb_model::MacParseError| invalid("mac", e.to_string()))?;
        let rec = EngineRecord {
            name: r.name,
            id: r.engine_id,
            addresses,
            mac,
            tags: r.tags.into_iter().collect(),
            capacity: r.capacity,
            group: if r.group.is_empty() {
                DEFAULT_GROUP.to_owned()
            } else {
                r.group
            },
        };
        lock(&self.cluster).register(rec, Instant::now())?;
        Ok(Response::new(pb::RegisterResponse {}))
    }

    type SessionStream = ControllerStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::EngineMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cert = self.identity(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session ended before its hello"))?;
        let Some(engine_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message of a session is a hello",
            ));
        };
        same_name(cert.as_ref(), &hello.name)?;
        let name = hello.name;
        let mut snapshots = {
            let mut c = lock(&self.cluster);
            if !c.persisted().engines.contains_key(&name) {
                return Err(Status::failed_precondition(format!(
                    "engine {name:?} is not registered: call Register first"
                )));
            }
            c.connected(&name, hello.applied_version, Instant::now());
            c.subscribe()
        };
        info!(engine = %name, applied = hello.applied_version, "engine session opened");
        let (tx, rx) = mpsc::channel::<Result<pb::ControllerMessage, Status>>(4);
        let cluster = self.cluster.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut sent_version = None;
            let mut nacked = None;
            loop {
                // Push the current version unless the engine runs it, got it, or refused it.
                let (current, applied) = {
                    let s = snapshots.borrow_and_update().clone();
                    let c = lock(&cluster);
                    (s, c.observed(&name).map_or(0, |o| o.applied_version))
                };
                if applied != current.version
                    && sent_version != Some(current.version)
                    && nacked != Some(current.version)
                {
                    if tx.send(Ok(snapshot_msg(&current))).await.is_err() {
                        break;
                    }
                    sent_version = Some(current.version);
                    lock(&cluster).sent(&name, current.version, Instant::now());
                }
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    changed = snapshots.changed() => if changed.is_err() { break },
                    msg = inbound.next() => match msg {
                        Some(Ok(m)) => {
                            if let Some(v) = handle(&cluster, &name, m) {
                                nacked = Some(v);
                            }
                        }
                        Some(Err(e)) => {
                            warn!(engine = %name, "engine session: {e}");
                            break;
                        }
                        None => break,
                    },
                }
            }
            lock(&cluster).disconnected(&name);
            info!(engine = %name, "engine session closed");
        });
        let stream = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Claims and peer reports of one heartbeat taken at most.
const MAX_REPORTED: usize = 4096;

/// One message of an engine; returns the version it `NACKed`, if it did.
fn handle(cluster: &Shared, name: &str, m: pb::EngineMessage) -> Option<u64> {
    let now = Instant::now();
    let mut c = lock(cluster);
    match m.msg? {
        engine_message::Msg::Heartbeat(h) => {
            c.heartbeat(
                name,
                Observed {
                    cpu_pct: h.cpu_pct,
                    memory_bytes: h.memory_bytes,
                    pps: h.pps,
                    connections: h.connections,
                    backends_up: h.backends_up.into_iter().collect(),
                    backends: h.backends.into_iter().collect(),
                    last_heartbeat_unix_ms: unix_ms(std::time::SystemTime::now()),
                    vs_pps: h.vs_pps.into_iter().take(MAX_REPORTED).collect(),
                    new_connections_per_s: h.new_connections_per_s,
                    vs_mbps: h.vs_mbps.into_iter().take(MAX_REPORTED).collect(),
                    serving: h.serving.into_iter().take(MAX_REPORTED).collect(),
                    cpu_source: h.cpu_source.chars().take(16).collect(),
                    host_cpu_pct: h.host_cpu_pct,
                    daemon_cpu_pct: h.daemon_cpu_pct,
                    softirq_pct: h.softirq_pct,
                    drains: h
                        .drains
                        .into_iter()
                        .take(MAX_REPORTED)
                        .map(|d| DrainReport {
                            virtual_service: d.virtual_service,
                            open: d.open,
                            finished: d.finished,
                            reset: d.reset,
                            remaining_ms: d.remaining_ms,
                            done: d.done,
                        })
                        .collect(),
                    bgp: h
                        .bgp
                        .iter()
                        .take(MAX_REPORTED)
                        .map(|b| BgpSessionReport {
                            peer: b.peer.chars().take(64).collect(),
                            state: b.state.chars().take(16).collect(),
                            uptime_s: b.uptime_s,
                            routes_announced: b.routes_announced,
                            last_error: b.last_error.chars().take(256).collect(),
                            bfd: b.bfd.chars().take(16).collect(),
                        })
                        .collect(),
                    // Bounded: an engine claims at most one entry per virtual service and reports
                    // at most one per engine (ids are 0..=255).
                    claims: h
                        .claims
                        .iter()
                        .take(MAX_REPORTED)
                        .map(|c| Claim {
                            vs_id: c.vs_id,
                            epoch: c.epoch,
                        })
                        .collect(),
                    peers: h
                        .peers
                        .iter()
                        .take(MAX_REPORTED)
                        .map(|p| {
                            (
                                p.engine_id,
                                PeerReport {
                                    daemon_up: p.daemon_up,
                                    dataplane_up: p.dataplane_up,
                                },
                            )
                        })
                        .collect(),
                    ..Observed::default()
                },
                now,
            );
            None
        }
        engine_message::Msg::Ack(a) => {
            c.ack(name, a.version, now);
            None
        }
        engine_message::Msg::Nack(n) => {
            let error: String = n.error.chars().take(4096).collect();
            c.nack(name, n.version, &error, now);
            Some(n.version)
        }
        engine_message::Msg::Hello(_) => None,
    }
}
