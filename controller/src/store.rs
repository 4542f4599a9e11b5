//! What the controller persists, and where: the desired state (registered engines, pools, virtual
//! services with their placement, the snapshot version) behind a small [`Store`] trait. [`RedbStore`]
//! is the embedded default; a later store puts the same records on etcd for controller HA. Every
//! change is written (and committed) before the call that made it is answered.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use lb_model::{MacAddr, PoolConfig, Protocol};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::rebalance::RebalanceSettings;

/// The engine group every engine and virtual service belongs to unless it names another; it
/// always exists.
pub const DEFAULT_GROUP: &str = "default";

fn default_group() -> String {
    DEFAULT_GROUP.to_owned()
}

/// A registered engine: what it said of itself at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineRecord {
    pub name: String,
    /// The data plane's engine id (the engine's `daemon.engine_id`).
    pub id: u32,
    pub addresses: Vec<IpAddr>,
    pub mac: MacAddr,
    pub tags: BTreeMap<String, String>,
    pub capacity: u32,
    /// Its engine group (from its registration).
    #[serde(default = "default_group")]
    pub group: String,
}

/// An engine group: engines that share a virtual service's placement, its auto-rebalance loop
/// and its scale-in timeout (Avi's service-engine group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub settings: RebalanceSettings,
    pub resource_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub config: PoolConfig,
    pub resource_version: u64,
}

/// What an operator asks of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub pool: String,
    pub persistence_timeout_s: u32,
    pub max_connections: u32,
    pub min_engines: u32,
    pub max_engines: u32,
    pub tags: BTreeMap<String, String>,
    /// The engine group it is placed in (fixed at creation).
    #[serde(default = "default_group")]
    pub engine_group: String,
    /// Scaling mode bgp, with its route's attributes (none: native).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<lb_model::VsBgpConfig>,
}

impl VsSpec {
    /// Scaled by BGP/ECMP: no primary; every engine announces the VIP and steers its share.
    pub fn by_bgp(&self) -> bool {
        self.bgp.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsRecord {
    pub spec: VsSpec,
    /// The data plane's virtual service id (keys rings and persistence on every engine).
    pub id: u32,
    /// Engine names, the primary first, then the order in which they take over the primary role.
    pub placement: Vec<String>,
    /// Generation of the primary role (`lb_model::VirtualServiceConfig::epoch`): bumped whenever
    /// the primary changes.
    #[serde(default)]
    pub epoch: u64,
    pub resource_version: u64,
}

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Version of the last snapshot pushed to engines.
    pub version: u64,
    /// The snapshot of that version (JSON of `lb_model::Desired`), so a restarted controller
    /// pushes an identical one under the same version.
    pub snapshot: String,
    /// The engines' peer-probe key (hex), made once.
    pub peer_key: String,
    /// The scaling steps in flight (JSON of `cluster::Steps`; empty: none recorded yet).
    pub steps: String,
    pub engines: BTreeMap<String, EngineRecord>,
    pub pools: BTreeMap<String, PoolRecord>,
    pub services: BTreeMap<String, VsRecord>,
    pub groups: BTreeMap<String, GroupRecord>,
    /// The engines' BGP speaker settings (none: BGP off).
    pub bgp: Option<BgpRecord>,
}

/// The engines' BGP speaker: `config.router_id` is `0.0.0.0` (each engine uses its own address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpRecord {
    pub config: lb_model::BgpConfig,
    pub resource_version: u64,
}

/// One change to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Engine(EngineRecord),
    Group(GroupRecord),
    DeleteGroup(String),
    Pool(PoolRecord),
    DeletePool(String),
    Service(VsRecord),
    DeleteService(String),
    Snapshot {
        version: u64,
        json: String,
    },
    PeerKey(String),
    Steps(String),
    /// The BGP settings (none: removed).
    Bgp(Option<BgpRecord>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Backend(String),
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Persisted, StoreError>;
    /// Writes `writes` atomically: all or none.
    fn commit(&self, writes: &[Write]) -> Result<(), StoreError>;
}

const ENGINES: TableDefinition<&str, &str> = TableDefinition::new("engines");
const POOLS: TableDefinition<&str, &str> = TableDefinition::new("pools");
const SERVICES: TableDefinition<&str, &str> = TableDefinition::new("services");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const GROUPS: TableDefinition<&str, &str> = TableDefinition::new("groups");

/// The embedded store: one redb file, one JSON value per object.
pub struct RedbStore {
    db: redb::Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(backend)?;
        // Create the tables so that a fresh database reads as empty.
        let tx = db.begin_write().map_err(backend)?;
        for t in [ENGINES, POOLS, SERVICES, META, GROUPS] {
            tx.open_table(t).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(RedbStore { db })
    }
}

fn read_all<T: for<'de> Deserialize<'de>>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<&str, &str>,
) -> Result<BTreeMap<String, T>, StoreError> {
    let t = tx.open_table(table).map_err(backend)?;
    let mut out = BTreeMap::new();
    for row in t.iter().map_err(backend)? {
        let (k, v) = row.map_err(backend)?;
        let value = serde_json::from_str(v.value()).map_err(|e| StoreError::Corrupt {
            key: format!("{}/{}", table.name(), k.value()),
            reason: e.to_string(),
        })?;
        out.insert(k.value().to_owned(), value);
    }
    Ok(out)
}

impl Store for RedbStore {
    fn load(&self) -> Result<Persisted, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let meta = tx.open_table(META).map_err(backend)?;
        let version = match meta.get("version").map_err(backend)? {
            Some(v) => v.value().parse().map_err(|e| StoreError::Corrupt {
                key: "meta/version".into(),
                reason: format!("{e}"),
            })?,
            None => 0,
        };
        let snapshot = meta
            .get("snapshot")
            .map_err(backend)?
            .map(|v| v.value().to_owned())
            .unwrap_or_default();
        let peer_key = meta
            .get("peer_key")
            .map_err(backend)?
            .map(|v| v.value().to_owned())
            .unwrap_or_default();
        let steps = meta
            .get("steps")
            .map_err(backend)?
            .map(|v| v.value().to_owned())
            .unwrap_or_default();
        let bgp = match meta.get("bgp").map_err(backend)? {
            Some(v) => Some(
                serde_json::from_str(v.value()).map_err(|e| StoreError::Corrupt {
                    key: "meta/bgp".into(),
                    reason: e.to_string(),
                })?,
            ),
            None => None,
        };
        Ok(Persisted {
            version,
            snapshot,
            peer_key,
            steps,
            bgp,
            engines: read_all(&tx, ENGINES)?,
            pools: read_all(&tx, POOLS)?,
            services: read_all(&tx, SERVICES)?,
            groups: read_all(&tx, GROUPS)?,
        })
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut engines = tx.open_table(ENGINES).map_err(backend)?;
            let mut pools = tx.open_table(POOLS).map_err(backend)?;
            let mut services = tx.open_table(SERVICES).map_err(backend)?;
            let mut meta = tx.open_table(META).map_err(backend)?;
            let mut groups = tx.open_table(GROUPS).map_err(backend)?;
            for w in writes {
                match w {
                    Write::Group(g) => {
                        groups
                            .insert(g.name.as_str(), json(g).as_str())
                            .map_err(backend)?;
                    }
                    Write::DeleteGroup(name) => {
                        groups.remove(name.as_str()).map_err(backend)?;
                    }
                    Write::Engine(e) => {
                        engines
                            .insert(e.name.as_str(), json(e).as_str())
                            .map_err(backend)?;
                    }
                    Write::Pool(p) => {
                        pools
                            .insert(p.config.name.as_str(), json(p).as_str())
                            .map_err(backend)?;
                    }
                    Write::DeletePool(name) => {
                        pools.remove(name.as_str()).map_err(backend)?;
                    }
                    Write::Service(s) => {
                        services
                            .insert(s.spec.name.as_str(), json(s).as_str())
                            .map_err(backend)?;
                    }
                    Write::DeleteService(name) => {
                        services.remove(name.as_str()).map_err(backend)?;
                    }
                    Write::Snapshot { version, json } => {
                        meta.insert("version", version.to_string().as_str())
                            .map_err(backend)?;
                        meta.insert("snapshot", json.as_str()).map_err(backend)?;
                    }
                    Write::PeerKey(key) => {
                        meta.insert("peer_key", key.as_str()).map_err(backend)?;
                    }
                    Write::Steps(steps) => {
                        meta.insert("steps", steps.as_str()).map_err(backend)?;
                    }
                    Write::Bgp(Some(b)) => {
                        meta.insert("bgp", json(b).as_str()).map_err(backend)?;
                    }
                    Write::Bgp(None) => {
                        meta.remove("bgp").map_err(backend)?;
                    }
                }
            }
        }
        tx.commit().map_err(backend)
    }
}

/// A record as JSON (records are plain data: serialisation cannot fail).
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialise")
}

/// A store in memory (tests, and the simulator later).
#[derive(Default)]
pub struct MemStore {
    state: std::sync::Mutex<Persisted>,
}

impl Store for MemStore {
    fn load(&self) -> Result<Persisted, StoreError> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone())
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in writes {
            match w.clone() {
                Write::Engine(e) => {
                    s.engines.insert(e.name.clone(), e);
                }
                Write::Group(g) => {
                    s.groups.insert(g.name.clone(), g);
                }
                Write::DeleteGroup(n) => {
                    s.groups.remove(&n);
                }
                Write::Pool(p) => {
                    s.pools.insert(p.config.name.clone(), p);
                }
                Write::DeletePool(n) => {
                    s.pools.remove(&n);
                }
                Write::Service(v) => {
                    s.services.insert(v.spec.name.clone(), v);
                }
                Write::DeleteService(n) => {
                    s.services.remove(&n);
                }
                Write::Snapshot { version, json } => {
                    s.version = version;
                    s.snapshot = json;
                }
                Write::PeerKey(k) => s.peer_key = k,
                Write::Steps(j) => s.steps = j,
                Write::Bgp(b) => s.bgp = b,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(name: &str, id: u32) -> EngineRecord {
        EngineRecord {
            name: name.into(),
            id,
            addresses: vec!["10.0.0.1".parse().unwrap()],
            mac: "02:00:00:00:00:01".parse().unwrap(),
            tags: BTreeMap::from([("zone".into(), "a".into())]),
            capacity: 2,
            group: DEFAULT_GROUP.into(),
        }
    }

    #[test]
    fn redb_round_trips_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            assert_eq!(s.load().unwrap(), Persisted::default());
            s.commit(&[
                Write::Engine(engine("se1", 1)),
                Write::Engine(engine("se2", 2)),
                Write::Snapshot {
                    version: 7,
                    json: "{}".into(),
                },
            ])
            .unwrap();
            s.commit(&[Write::Engine(engine("se2", 3))]).unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let p = s.load().unwrap();
        assert_eq!(p.version, 7);
        assert_eq!(p.snapshot, "{}");
        assert_eq!(p.engines.len(), 2);
        assert_eq!(p.engines["se2"].id, 3);
    }

    #[test]
    fn groups_round_trip_and_old_records_are_in_the_default_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let edge = GroupRecord {
            name: "edge".into(),
            settings: RebalanceSettings {
                enabled: true,
                scalein_timeout: std::time::Duration::from_secs(90),
                ..RebalanceSettings::default()
            },
            resource_version: 3,
        };
        {
            let s = RedbStore::open(&path).unwrap();
            s.commit(&[
                Write::Group(edge.clone()),
                Write::Group(GroupRecord {
                    name: "gone".into(),
                    settings: RebalanceSettings::default(),
                    resource_version: 1,
                }),
            ])
            .unwrap();
            s.commit(&[Write::DeleteGroup("gone".into())]).unwrap();
        }
        let p = RedbStore::open(&path).unwrap().load().unwrap();
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups["edge"], edge);
        // Records written before groups existed.
        let old: EngineRecord = serde_json::from_str(
            r#"{"name":"se1","id":1,"addresses":[],"mac":"02:00:00:00:00:01","tags":{},"capacity":1}"#,
        )
        .unwrap();
        assert_eq!(old.group, DEFAULT_GROUP);
        let settings: RebalanceSettings = serde_json::from_str(r#"{"enabled":true}"#).unwrap();
        assert_eq!(
            settings,
            RebalanceSettings {
                enabled: true,
                ..RebalanceSettings::default()
            },
            "settings stored by an older controller take the defaults for what they lack"
        );
    }
}
