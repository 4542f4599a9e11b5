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
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
};

use lb_common::{VS_F_ASK_OWNER_UDP, VS_F_PRIMARY};
use tracing::{info, warn};

use crate::{
    config::{Config, EngineState, Member},
    conntable::ConnTable,
    dataplane::{Dataplane, DataplaneError},
    links::SystemLinks,
    metrics::Inventory,
    proxy::{Proxy, ProxyError, threads::ProxyThreads},
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

/// What this engine's own view of its peers changes in its data plane, over the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Engines whose daemons the peer probes found silent: down in the data plane (no new flows;
    /// rings re-hashed around them) whatever the configuration says.
    pub down: BTreeSet<u32>,
    /// Virtual service id → its primary as the engines decided ([`crate::roles`]), where it
    /// differs from the configuration.
    pub primaries: BTreeMap<u32, u32>,
    /// Virtual services whose unknown UDP flows are asked about (just after a promotion).
    pub ask_udp: BTreeSet<u32>,
    /// (virtual service, engine): the engine's daemon answers but cannot serve the service (no
    /// backend up there): it gets no new flows of it, unless no engine of the service can.
    pub unserving: BTreeSet<(u32, u32)>,
}

impl Overlay {
    /// `config` as this engine's data plane is to see it.
    fn apply(&self, config: &Config) -> Config {
        let mut c = config.clone();
        for e in &mut c.engines {
            if self.down.contains(&e.id) && e.state == EngineState::Active {
                e.state = EngineState::Down;
            }
        }
        let active: BTreeSet<u32> = c
            .engines
            .iter()
            .filter(|e| e.state == EngineState::Active)
            .map(|e| e.id)
            .collect();
        for vs in &mut c.virtual_services {
            if let Some(p) = self.primaries.get(&vs.id) {
                vs.primary = *p;
            }
            // Weight 0: its flows stay, it takes no new ones.
            let id = vs.id;
            let serving = |m: &Member| !self.unserving.contains(&(id, m.id));
            if vs
                .engines
                .iter()
                .any(|m| m.weight > 0 && active.contains(&m.id) && serving(m))
            {
                for m in vs.engines.iter_mut().filter(|m| !serving(m)) {
                    m.weight = 0;
                }
            }
        }
        c
    }

    fn tables(&self, config: &Config) -> Result<Tables, PlanError> {
        let mut t = Tables::plan(&self.apply(config), &SystemLinks)?;
        for id in &self.ask_udp {
            if let Some(vs) = t.vs.get_mut(id)
                && vs.flags & VS_F_PRIMARY != 0
            {
                vs.flags |= VS_F_ASK_OWNER_UDP;
            }
        }
        Ok(t)
    }
}

/// The Maglev ring of each virtual service as the data plane has it now (for the owner queries,
/// which place a flow nobody owns the way the data plane would).
pub type Rings = Arc<RwLock<BTreeMap<u32, Arc<Vec<u32>>>>>;

/// This engine's applied state.
pub struct Engine {
    config: Config,
    overlay: Overlay,
    tables: Tables,
    rings: Rings,
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
        let threads = ProxyThreads::start(config.daemon.proxy_thread_count())
            .context("starting the proxy's threads")?;
        let mut proxy = Proxy::new(conns, threads);
        proxy.apply(&config)?;
        dp.attach(&config.daemon.interface, config.daemon.xdp_mode)?;
        let inventory = Arc::new(RwLock::new(Inventory::of(&config, &proxy)));
        let rings = Rings::default();
        publish_rings(&rings, &tables);
        Ok(Engine {
            config,
            overlay: Overlay::default(),
            tables,
            rings,
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

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// The rings the data plane has, refreshed by every change of the maps.
    pub fn rings(&self) -> Rings {
        self.rings.clone()
    }

    /// What the metrics endpoint lists, refreshed by every apply.
    pub fn inventory(&self) -> Arc<RwLock<Inventory>> {
        self.inventory.clone()
    }

    /// Lists `config`'s virtual services and engines and the proxy's services and pools for the
    /// metrics endpoint.
    fn publish_inventory(&self, config: &Config) {
        *self
            .inventory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Inventory::of(config, &self.proxy);
    }

    /// Brings the engine to `config` (validated), changing only what differs. Nothing is applied
    /// unless the whole configuration can be: the host settings that need a restart are unchanged,
    /// the tables plan, the backends are routable and new sockets open. If writing the maps fails
    /// midway, the previous tables and proxy configuration are put back.
    pub fn apply(&mut self, config: Config) -> Result<Applied, ApplyError> {
        restart_only(&self.config, &config)?;
        let tables = self.overlay.tables(&config)?;
        let changes = Changes::between(Some(&self.tables), &tables);
        if changes.is_empty() && config == self.config {
            return Ok(Applied::Unchanged);
        }
        self.proxy.apply(&config)?;
        // The proxy serves the new services from here on (the map writes below can take a while
        // for a ring): their metrics are listed from here on too.
        self.publish_inventory(&config);
        let dp = &mut self.dp;
        // Thousands of system calls for a ring: let the runtime move other tasks off this worker.
        let written = tokio::task::block_in_place(|| dp.apply(&changes));
        if let Err(write) = written {
            warn!("applying the new tables failed ({write}); restoring the previous ones");
            let back = Changes::between(Some(&tables), &self.tables);
            let restored = tokio::task::block_in_place(|| self.dp.apply(&back))
                .map_err(|e| e.to_string())
                .and_then(|()| self.proxy.apply(&self.config).map_err(|e| e.to_string()));
            let previous = self.config.clone();
            self.publish_inventory(&previous);
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
        self.config = config;
        publish_rings(&self.rings, &tables);
        self.tables = tables;
        info!(?writes, "configuration applied");
        Ok(Applied::Changed { writes })
    }
}

impl Engine {
    /// This engine's view of its peers changed (a peer's daemon went silent or answers again, a
    /// role moved): only the data plane changes; the proxy and the configuration stay.
    pub fn set_overlay(&mut self, overlay: Overlay) -> Result<Applied, ApplyError> {
        if overlay == self.overlay {
            return Ok(Applied::Unchanged);
        }
        let planned = overlay.tables(&self.config)?;
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
        publish_rings(&self.rings, &planned);
        self.tables = planned;
        self.overlay = overlay;
        Ok(Applied::Changed { writes })
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }
}

fn publish_rings(rings: &Rings, tables: &Tables) {
    let mut r = rings
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    r.retain(|id, _| tables.rings.contains_key(id));
    for (id, ring) in &tables.rings {
        if r.get(id).is_none_or(|old| **old != *ring) {
            r.insert(*id, Arc::new(ring.clone()));
        }
    }
}

/// Host settings that size or place the maps, bind the metrics endpoint or size the thread pools:
/// a running engine refuses to change them.
fn restart_only(old: &Config, new: &Config) -> Result<(), ApplyError> {
    let (old, new) = (&old.daemon, &new.daemon);
    let checks = [
        ("interface", old.interface != new.interface),
        ("engine_id", old.engine_id != new.engine_id),
        ("xdp_mode", old.xdp_mode != new.xdp_mode),
        ("pin_dir", old.pin_dir != new.pin_dir),
        ("worker_threads", old.worker_threads != new.worker_threads),
        ("proxy_threads", old.proxy_threads != new.proxy_threads),
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3, weight = 2 } ]
"#;

    fn weights(c: &Config) -> Vec<(u32, u32)> {
        c.virtual_services[0]
            .engines
            .iter()
            .map(|m| (m.id, m.weight))
            .collect()
    }

    #[test]
    fn an_engine_that_cannot_serve_gets_no_new_flows_unless_none_can() {
        let c = Config::parse(CONFIG).unwrap();
        let mut o = Overlay {
            unserving: BTreeSet::from([(0, 3), (7, 2)]),
            ..Overlay::default()
        };
        assert_eq!(weights(&o.apply(&c)), [(1, 1), (2, 1), (3, 0)]);
        // Every engine unhealthy (or down): the configuration stands, nobody is better.
        o.unserving = BTreeSet::from([(0, 1), (0, 3)]);
        o.down = BTreeSet::from([2]);
        assert_eq!(weights(&o.apply(&c)), [(1, 1), (2, 1), (3, 2)]);
        o.down.clear();
        assert_eq!(weights(&o.apply(&c)), [(1, 0), (2, 1), (3, 0)]);
    }
}
