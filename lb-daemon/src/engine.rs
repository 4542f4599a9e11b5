//! The one owner of what this engine has applied: the data plane's maps, the proxy's services and
//! pools, and what the metrics list. Every change of configuration — the file at start, a SIGHUP
//! reload, a snapshot from the controller — goes through [`Engine::apply`]:
//!
//! ```text
//!   validated Config ─► restart-only checks ─► plan tables ─► proxy.check (routes)
//!       ─► proxy.apply (new sockets first; running services take new settings)
//!       ─► map writes: Changes::steps in order (off the async workers)
//!       ─► on a failed write: the previous tables and proxy configuration back
//! ```
//!
//! A configuration whose tables and proxy settings equal the current ones applies as
//! [`Applied::Unchanged`]: nothing is written.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
};

use tracing::{info, warn};

use crate::{
    config::{Config, EngineState},
    conntable::ConnTable,
    dataplane::{Dataplane, DataplaneError},
    links::SystemLinks,
    metrics::Inventory,
    proxy::{Proxy, ProxyError},
    tables::{Changes, PlanError, Tables},
};

/// What [`Engine::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The configuration was what runs already: nothing was written.
    Unchanged,
    /// Map entries written per batch (`Write::what`), and whether the proxy changed.
    Changed {
        writes: Vec<(&'static str, &'static str, usize)>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("daemon.{0} changed: it takes effect only at a restart")]
    RestartOnly(&'static str),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("writing the maps: {0} (the previous tables and proxy configuration were put back)")]
    RolledBack(Box<DataplaneError>),
    #[error(
        "writing the maps: {write} — and putting the previous state back failed too: {restore}"
    )]
    RestoreFailed {
        write: Box<DataplaneError>,
        restore: String,
    },
}

/// This engine's applied state.
pub struct Engine {
    config: Config,
    /// Engines the peer probes found silent: down in the data plane whatever the configuration says.
    peer_down: BTreeSet<u32>,
    tables: Tables,
    dp: Dataplane,
    proxy: Proxy,
    inventory: Arc<RwLock<Inventory>>,
}

impl Engine {
    /// Fills the loaded data plane's maps from `config`, starts the proxy's listeners (flows the
    /// data plane passes up must find them), then attaches (or takes over) the XDP program.
    pub fn start(
        mut dp: Dataplane,
        config: Config,
        conns: Arc<ConnTable>,
    ) -> anyhow::Result<Engine> {
        use anyhow::Context;
        let tables = Tables::plan(&config, &SystemLinks)?;
        dp.apply(&Changes::between(None, &tables))
            .context("filling the maps")?;
        let mut proxy = Proxy::new(conns);
        proxy.apply(&config)?;
        dp.attach(&config.daemon.interface, config.daemon.xdp_mode)?;
        let inventory = Arc::new(RwLock::new(Inventory::of(&config, &proxy)));
        Ok(Engine {
            config,
            peer_down: BTreeSet::new(),
            tables,
            dp,
            proxy,
            inventory,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// What the metrics endpoint lists, refreshed by every apply.
    pub fn inventory(&self) -> Arc<RwLock<Inventory>> {
        self.inventory.clone()
    }

    /// Brings the engine to `config` (validated), changing only what differs. Nothing is applied
    /// unless the whole configuration can be: the host settings that need a restart are unchanged,
    /// the tables plan, the backends are routable and new sockets open. If writing the maps fails
    /// midway, the previous tables and proxy configuration are put back.
    pub fn apply(&mut self, config: Config) -> Result<Applied, ApplyError> {
        restart_only(&self.config, &config)?;
        self.peer_down.retain(|id| {
            config
                .engine(*id)
                .is_some_and(|e| e.state == EngineState::Active)
        });
        let tables = Tables::plan(&overlay(&config, &self.peer_down), &SystemLinks)?;
        let changes = Changes::between(Some(&self.tables), &tables);
        if changes.is_empty() && config == self.config {
            return Ok(Applied::Unchanged);
        }
        self.proxy.apply(&config)?;
        let dp = &mut self.dp;
        // Thousands of system calls for a ring: let the runtime move other tasks off this worker.
        let written = tokio::task::block_in_place(|| dp.apply(&changes));
        if let Err(write) = written {
            warn!("applying the new tables failed ({write}); restoring the previous ones");
            let back = Changes::between(Some(&tables), &self.tables);
            let restored = tokio::task::block_in_place(|| self.dp.apply(&back))
                .map_err(|e| e.to_string())
                .and_then(|()| self.proxy.apply(&self.config).map_err(|e| e.to_string()));
            let write = Box::new(write);
            return Err(match restored {
                Ok(()) => ApplyError::RolledBack(write),
                Err(restore) => ApplyError::RestoreFailed { write, restore },
            });
        }
        let writes = changes
            .steps()
            .iter()
            .map(|w| {
                let (map, what) = w.what();
                (map, what, w.len())
            })
            .collect();
        *self
            .inventory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Inventory::of(&config, &self.proxy);
        self.config = config;
        self.tables = tables;
        info!(?writes, "configuration applied");
        Ok(Applied::Changed { writes })
    }
}

impl Engine {
    /// A peer found silent (`down`) or answering again: only the data plane changes (its entry,
    /// and the rings without it); the proxy and the configuration stay.
    pub fn set_peer_down(&mut self, id: u32, down: bool) -> Result<Applied, ApplyError> {
        let changed = if down {
            self.peer_down.insert(id)
        } else {
            self.peer_down.remove(&id)
        };
        if !changed {
            return Ok(Applied::Unchanged);
        }
        let planned = Tables::plan(&overlay(&self.config, &self.peer_down), &SystemLinks)?;
        let diff = Changes::between(Some(&self.tables), &planned);
        let dp = &mut self.dp;
        tokio::task::block_in_place(|| dp.apply(&diff))
            .map_err(|e| ApplyError::RolledBack(Box::new(e)))?;
        let writes = diff
            .steps()
            .iter()
            .map(|w| {
                let (map, what) = w.what();
                (map, what, w.len())
            })
            .collect();
        self.tables = planned;
        Ok(Applied::Changed { writes })
    }

    /// Engines the peer probes hold down.
    pub fn peers_down(&self) -> &BTreeSet<u32> {
        &self.peer_down
    }
}

/// `config` with the engines of `down` down (where the configuration has them active).
fn overlay(config: &Config, down: &BTreeSet<u32>) -> Config {
    if down.is_empty() {
        return config.clone();
    }
    let mut c = config.clone();
    for e in &mut c.engines {
        if down.contains(&e.id) && e.state == EngineState::Active {
            e.state = EngineState::Down;
        }
    }
    c
}

/// Host settings that size or place the maps, or bind the metrics endpoint: a running engine
/// refuses to change them.
fn restart_only(old: &Config, new: &Config) -> Result<(), ApplyError> {
    let (old, new) = (&old.daemon, &new.daemon);
    let checks = [
        ("interface", old.interface != new.interface),
        ("engine_id", old.engine_id != new.engine_id),
        ("xdp_mode", old.xdp_mode != new.xdp_mode),
        ("pin_dir", old.pin_dir != new.pin_dir),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        (
            "max_virtual_services",
            old.max_virtual_services != new.max_virtual_services,
        ),
        (
            "conn_table_size",
            old.conn_table_size != new.conn_table_size,
        ),
        (
            "persist_table_size",
            old.persist_table_size != new.persist_table_size,
        ),
    ];
    match checks.iter().find(|(_, changed)| *changed) {
        Some((field, _)) => Err(ApplyError::RestartOnly(field)),
        None => Ok(()),
    }
}
