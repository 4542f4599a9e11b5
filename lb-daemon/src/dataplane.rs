//! The XDP program and its maps in the kernel: loading (with table sizes from the configuration and
//! the state tables pinned), attaching, applying [`Changes`], and reading counters.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, MapData, MapError, PerCpuArray, xdp::XdpMapError},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode, xdp::XdpLinkId},
};
use lb_common::{
    ConnEntry, ENGINE_NONE, Engine, FlowV4, FlowV6, Globals, MAX_ENGINES, PersistEntry, PersistKey,
    REASON_COUNT, RING_SIZE, Reason, TrafficCounters, VipKey, VsEntry,
};
use tracing::{info, warn};

use crate::{
    config::{DaemonConfig, XdpMode},
    tables::Changes,
};

/// Name of the steering program in the object.
pub const PROGRAM: &str = "lb_xdp";
/// Maps pinned under the pin directory (state that must survive a daemon restart).
pub const PINNED_MAPS: [&str; 3] = ["CONN_V4", "CONN_V6", "PERSIST"];

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("program {PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("attaching to {interface} in {mode:?} mode")]
    Attach {
        interface: String,
        mode: XdpMode,
        source: ProgramError,
    },
    #[error("map {map}")]
    Map { map: &'static str, source: MapError },
    #[error("map DEVMAP: {0}")]
    DevMap(#[from] XdpMapError),
    #[error("virtual service id {0} is beyond the ring storage (max_virtual_services)")]
    RingOutOfRange(u32),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The loaded program and typed handles on every map.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    vips: HashMap<MapData, VipKey, u32>,
    vs: Array<MapData, VsEntry>,
    vip_ports: Array<MapData, u64>,
    vip_addrs: HashMap<MapData, VipKey, u32>,
    ring: Array<MapData, u32>,
    engines: Array<MapData, Engine>,
    devmap: DevMap<MapData>,
    globals: Array<MapData, Globals>,
    pub conn_v4: HashMap<MapData, FlowV4, ConnEntry>,
    pub conn_v6: HashMap<MapData, FlowV6, ConnEntry>,
    pub persist: HashMap<MapData, PersistKey, PersistEntry>,
    /// Shared with the metrics endpoint.
    pub counters: Arc<Counters>,
    max_vs: u32,
}

/// The per-CPU counter maps (read by the metrics endpoint).
pub struct Counters {
    vs_stats: PerCpuArray<MapData, TrafficCounters>,
    engine_stats: PerCpuArray<MapData, TrafficCounters>,
    reasons: PerCpuArray<MapData, u64>,
}

impl Dataplane {
    /// Loads `object` with table sizes from `cfg`, pinning the state tables under `cfg.pin_dir`
    /// (reusing them if a previous run left them there). Does not attach.
    pub fn load(object: &[u8], cfg: &DaemonConfig) -> Result<Self, DataplaneError> {
        Self::load_with(
            object,
            &cfg.pin_dir,
            cfg.max_virtual_services,
            cfg.conn_table_size,
            cfg.persist_table_size,
        )
    }

    pub fn load_with(
        object: &[u8],
        pin_dir: &Path,
        max_vs: u32,
        conn: u32,
        persist: u32,
    ) -> Result<Self, DataplaneError> {
        ensure_bpffs(pin_dir)?;
        let reused: Vec<&str> = PINNED_MAPS
            .into_iter()
            .filter(|m| pin_dir.join(m).exists())
            .collect();
        if !reused.is_empty() {
            info!(?reused, dir = %pin_dir.display(), "reusing pinned tables");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries("VIPS", max_vs)
            .map_max_entries("VIP_ADDRS", max_vs)
            .map_max_entries("VS", max_vs)
            .map_max_entries("RING", max_vs * RING_SIZE)
            .map_max_entries("VS_STATS", max_vs)
            .map_max_entries("CONN_V4", conn)
            .map_max_entries("CONN_V6", conn)
            .map_max_entries("PERSIST", persist)
            .load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DataplaneError::Missing(PROGRAM))?
            .try_into()?;
        prog.load()?;
        macro_rules! take {
            ($name:literal) => {
                ebpf.take_map($name)
                    .ok_or(DataplaneError::Missing($name))?
                    .try_into()
                    .map_err(map_err($name))?
            };
        }
        Ok(Dataplane {
            vips: take!("VIPS"),
            vip_addrs: take!("VIP_ADDRS"),
            vs: take!("VS"),
            vip_ports: take!("VIP_PORTS"),
            ring: take!("RING"),
            engines: take!("ENGINES"),
            devmap: take!("DEVMAP"),
            globals: take!("GLOBALS"),
            conn_v4: take!("CONN_V4"),
            conn_v6: take!("CONN_V6"),
            persist: take!("PERSIST"),
            counters: Arc::new(Counters {
                vs_stats: take!("VS_STATS"),
                engine_stats: take!("ENGINE_STATS"),
                reasons: take!("REASONS"),
            }),
            ebpf,
            link: None,
            max_vs,
        })
    }

    /// The steering program (for attaching elsewhere, or `TestRun`).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM)
            .expect("loaded in load()")
            .try_into()
            .expect("an XDP program")
    }

    /// Attaches to `interface`. Native mode fails if the driver cannot do it; generic mode works
    /// anywhere but runs after the kernel allocated an skb, so it warns loudly.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let aya_mode = match mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => {
                warn!(
                    interface,
                    "ATTACHING IN GENERIC (SKB) MODE: packets pay for an skb before steering; expect a fraction of native throughput. Use xdp_mode = \"native\" in production."
                );
                AyaXdpMode::Skb
            }
        };
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .expect("loaded in load()")
            .try_into()?;
        let link = prog
            .attach(interface, aya_mode)
            .map_err(|source| DataplaneError::Attach {
                interface: interface.into(),
                mode,
                source,
            })?;
        self.link = Some(link);
        info!(interface, ?mode, "XDP program attached");
        Ok(())
    }

    /// Detaches the program (the maps stay pinned).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(link) = self.link.take() {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(PROGRAM)
                .expect("loaded in load()")
                .try_into()?;
            prog.detach(link)?;
            info!("XDP program detached");
        }
        Ok(())
    }

    /// Writes `c` into the maps, in the order [`Changes`] documents.
    pub fn apply(&mut self, c: &Changes) -> Result<(), DataplaneError> {
        if let Some(g) = c.globals {
            self.globals.set(0, g, 0).map_err(map_err("GLOBALS"))?;
        }
        for (id, e) in &c.engines_enable {
            self.engines.set(*id, e, 0).map_err(map_err("ENGINES"))?;
        }
        for (id, ifindex) in &c.devmap_set {
            self.devmap.set(*id, *ifindex, None, 0)?;
        }
        for (vs, slot, engine) in &c.ring_set {
            self.set_slot(*vs, *slot, *engine)?;
        }
        for (id, e) in &c.engines_disable {
            self.engines.set(*id, e, 0).map_err(map_err("ENGINES"))?;
        }
        for (id, v) in &c.vs_set {
            self.vs.set(*id, v, 0).map_err(map_err("VS"))?;
        }
        for (w, bits) in &c.vip_ports_grow {
            self.vip_ports
                .set(*w, bits, 0)
                .map_err(map_err("VIP_PORTS"))?;
        }
        for (k, n) in &c.vip_addrs_set {
            self.vip_addrs
                .insert(k, n, 0)
                .map_err(map_err("VIP_ADDRS"))?;
        }
        for (k, id) in &c.vips_set {
            self.vips.insert(k, id, 0).map_err(map_err("VIPS"))?;
        }
        for k in &c.vips_remove {
            self.vips.remove(k).map_err(map_err("VIPS"))?;
        }
        for k in &c.vip_addrs_remove {
            self.vip_addrs.remove(k).map_err(map_err("VIP_ADDRS"))?;
        }
        for (w, bits) in &c.vip_ports_shrink {
            self.vip_ports
                .set(*w, bits, 0)
                .map_err(map_err("VIP_PORTS"))?;
        }
        for id in &c.vs_clear {
            self.vs
                .set(*id, VsEntry::default(), 0)
                .map_err(map_err("VS"))?;
        }
        for vs in &c.rings_clear {
            for slot in 0..RING_SIZE {
                self.set_slot(*vs, slot, ENGINE_NONE)?;
            }
        }
        for id in &c.devmap_remove {
            self.devmap.set(*id, 0, None, 0)?;
        }
        for id in &c.engines_remove {
            self.engines
                .set(*id, Engine::default(), 0)
                .map_err(map_err("ENGINES"))?;
        }
        Ok(())
    }

    fn set_slot(&mut self, vs: u32, slot: u32, engine: u32) -> Result<(), DataplaneError> {
        if vs >= self.max_vs {
            return Err(DataplaneError::RingOutOfRange(vs));
        }
        self.ring
            .set(vs * RING_SIZE + slot, engine, 0)
            .map_err(map_err("RING"))
    }

    /// The engine a ring slot names (for tests and diagnostics).
    pub fn ring_slot(&self, vs: u32, slot: u32) -> Result<u32, DataplaneError> {
        self.ring
            .get(&(vs * RING_SIZE + slot), 0)
            .map_err(map_err("RING"))
    }

    /// Sets an engine's entry directly (tests and the failover work use it).
    pub fn set_engine(&mut self, id: u32, e: Engine) -> Result<(), DataplaneError> {
        self.engines.set(id, e, 0).map_err(map_err("ENGINES"))
    }
}

impl Counters {
    /// One reason counter, summed over CPUs.
    pub fn reason(&self, r: Reason) -> Result<u64, DataplaneError> {
        Ok(self
            .reasons
            .get(&(r as u32), 0)
            .map_err(map_err("REASONS"))?
            .iter()
            .sum())
    }

    /// Every reason counter.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        debug_assert_eq!(Reason::ALL.len(), REASON_COUNT as usize);
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, self.reason(*r)?)))
            .collect()
    }

    /// Traffic of a virtual service, summed over CPUs.
    pub fn vs(&self, vs_id: u32) -> Result<TrafficCounters, DataplaneError> {
        Ok(sum(&self
            .vs_stats
            .get(&vs_id, 0)
            .map_err(map_err("VS_STATS"))?))
    }

    /// Traffic sent to an engine, summed over CPUs.
    pub fn engine(&self, id: u32) -> Result<TrafficCounters, DataplaneError> {
        debug_assert!(id < MAX_ENGINES);
        Ok(sum(&self
            .engine_stats
            .get(&id, 0)
            .map_err(map_err("ENGINE_STATS"))?))
    }
}

/// The default bpffs mount point.
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `pin_dir` exists on a bpffs mount: pins anywhere else fail, and pins on a private
/// mount vanish with it. Mounts bpffs at `/sys/fs/bpf` when that is where `pin_dir` lives and nothing
/// is mounted there (as systemd does at boot).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    use nix::sys::statfs::statfs;
    let err = |reason: String| DataplaneError::PinDir {
        path: pin_dir.to_owned(),
        reason,
    };
    let on_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| err("no existing parent directory".into()))?;
    }
    if !on_bpffs(existing) {
        let bpffs = Path::new(BPFFS);
        if !pin_dir.starts_with(bpffs) || !bpffs.is_dir() {
            return Err(err(format!(
                "{} is not on a bpffs mount (mount -t bpf bpf DIR)",
                existing.display()
            )));
        }
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("{BPFFS} is not bpffs and mounting it failed: {e}")))?;
        info!("mounted bpffs at {BPFFS}");
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| err(e.to_string()))
}

fn sum(per_cpu: &[TrafficCounters]) -> TrafficCounters {
    per_cpu
        .iter()
        .fold(TrafficCounters::default(), |a, c| TrafficCounters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        })
}
