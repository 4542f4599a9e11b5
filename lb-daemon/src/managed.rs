//! Managed mode: the engine follows the controller.
//!
//! ```text
//!   session task (this module) ── Register ── Session stream:
//!       → Hello { name, applied version }, then a Heartbeat every interval
//!       ← Snapshot { version, desired } ──► engine loop (main): Engine::apply ──► Ack / Nack
//!   reconnects with backoff (0.25 s doubling to 5 s) when the controller is away; the data
//!   plane and the proxy keep running exactly as they are meanwhile.
//! ```
//!
//! The last applied snapshot is kept in `controller.state_file`, so a restarted engine starts from
//! it before the controller answers, and tells the controller which version it runs.

use std::{
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_api::v1::{
    self as pb, RegisterRequest, controller_message, engine_api_client::EngineApiClient,
    engine_message,
};
use lb_model::{ControllerConfig, Desired};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

/// A snapshot for the engine loop to apply; the reply is the NACK's error, if any.
pub struct Apply {
    pub version: u64,
    pub desired_json: String,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the engine registers with.
#[derive(Debug, Clone)]
pub struct Identity {
    pub engine_id: u32,
    pub addresses: Vec<IpAddr>,
    pub mac: String,
}

/// The state file: the last applied snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    pub version: u64,
    pub desired: Desired,
}

impl Applied {
    pub fn load(path: &Path) -> Option<Applied> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str(&text) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(path = %path.display(), "ignoring an unreadable state file: {e}");
                None
            }
        }
    }

    /// Written to a temporary file and renamed, so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

/// Shared between the session task and the engine.
#[derive(Default)]
pub struct Status {
    /// The version the engine runs (0: none from a controller).
    pub applied: AtomicU64,
    pub connected: AtomicBool,
}

async fn channel(cfg: &ControllerConfig) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(cfg.address.clone())
        .map_err(|e| format!("controller.address {}: {e}", cfg.address))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    if !cfg.insecure {
        let tls = lb_api::tls::client_config(&cfg.tls_dir, &format!("engine-{}", cfg.name))?;
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    ep.connect().await.map_err(|e| format!("{e}"))
}

/// Runs sessions with the controller until the process ends.
pub async fn run(
    cfg: ControllerConfig,
    identity: Identity,
    status: Arc<Status>,
    apply: mpsc::Sender<Apply>,
    heartbeat: Arc<dyn Fn() -> pb::Heartbeat + Send + Sync>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(&cfg, &identity, &status, &apply, &heartbeat).await {
            Ok(()) => {
                info!("controller session ended");
                backoff = Duration::from_millis(250);
            }
            Err(e) => warn!(
                controller = %cfg.address,
                retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                "controller unreachable or session failed: {e}; serving as before"
            ),
        }
        status.connected.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    cfg: &ControllerConfig,
    identity: &Identity,
    status: &Status,
    apply: &mpsc::Sender<Apply>,
    heartbeat: &Arc<dyn Fn() -> pb::Heartbeat + Send + Sync>,
) -> Result<(), String> {
    // A snapshot of thousands of services is megabytes of JSON.
    let mut client = EngineApiClient::new(channel(cfg).await?).max_decoding_message_size(256 << 20);
    client
        .register(RegisterRequest {
            name: cfg.name.clone(),
            engine_id: identity.engine_id,
            addresses: identity.addresses.iter().map(ToString::to_string).collect(),
            mac: identity.mac.clone(),
            tags: cfg.tags.clone().into_iter().collect(),
            capacity: cfg.capacity,
            group: cfg.group.clone(),
        })
        .await
        .map_err(|s| format!("register: {:?}: {}", s.code(), s.message()))?;
    let (out, rx) = mpsc::channel::<pb::EngineMessage>(8);
    let msg = |m| pb::EngineMessage { msg: Some(m) };
    out.send(msg(engine_message::Msg::Hello(pb::Hello {
        name: cfg.name.clone(),
        applied_version: status.applied.load(Ordering::Relaxed),
    })))
    .await
    .map_err(|_| "session closed".to_owned())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    status.connected.store(true, Ordering::Relaxed);
    info!(controller = %cfg.address, "controller session open");
    let beats = {
        let out = out.clone();
        let heartbeat = heartbeat.clone();
        let every = Duration::from_millis(u64::from(cfg.heartbeat_interval_ms));
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let beat = pb::EngineMessage {
                    msg: Some(engine_message::Msg::Heartbeat(heartbeat())),
                };
                if out.send(beat).await.is_err() {
                    break;
                }
            }
        })
    };
    let result = loop {
        let m = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(s) => break Err(format!("{:?}: {}", s.code(), s.message())),
        };
        let Some(controller_message::Msg::Snapshot(s)) = m.msg else {
            continue;
        };
        let answer = if s.version == status.applied.load(Ordering::Relaxed) {
            Ok(())
        } else {
            let (reply, rx) = oneshot::channel();
            if apply
                .send(Apply {
                    version: s.version,
                    desired_json: s.desired_json,
                    reply,
                })
                .await
                .is_err()
            {
                break Ok(());
            }
            rx.await
                .unwrap_or_else(|_| Err("the engine stopped".into()))
        };
        let m = match answer {
            Ok(()) => engine_message::Msg::Ack(pb::Ack { version: s.version }),
            Err(error) => engine_message::Msg::Nack(pb::Nack {
                version: s.version,
                error,
            }),
        };
        if out.send(msg(m)).await.is_err() {
            break Ok(());
        }
    };
    beats.abort();
    result
}
