//! The XDP program and its maps in the kernel: loading (with table sizes from the configuration and
//! the state tables pinned), attaching, applying [`Changes`], and reading counters.
//!
//! The data plane outlives the daemon. The attachment is a BPF link pinned under the pin directory
//! (`link-<mode>-<interface>`), so a daemon that stops, crashes or is killed leaves the program
//! steering with its tables. A starting daemon checks the pinned tables against its own object
//! (type, key and value sizes, capacity, flags, [`STATE_LAYOUT_VERSION`]) and refuses, naming the
//! map, if they do not fit; it then loads its program on the same state tables, fills fresh
//! configuration maps, and swaps its program into the pinned link in one `bpf_link_update`: no
//! packet ever meets a detached interface. Only [`detach_for_good`] removes the link and the pins.
//! One daemon per pin directory: it holds an exclusive `flock` on it while it runs.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMap, HashMap, MapData, MapError, MapInfo, PerCpuArray, RingBuf, xdp::XdpMapError,
    },
    programs::{
        ProgramError, TracePoint, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use aya_log::EbpfLogger;
use lb_common::{
    ConnEntry, ENGINE_NONE, Engine, FlowV4, FlowV6, Globals, MAX_ENGINES, PersistEntry, PersistKey,
    REASON_COUNT, RING_SIZE, Reason, STATE_LAYOUT_VERSION, TX_ERROR_COUNT, TrafficCounters,
    TxError, TxErrorFilter, VipKey, VsEntry,
};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::{
    config::{DaemonConfig, XdpMode},
    tables::{Changes, Write},
};

/// Name of the steering program in the object.
pub const PROGRAM: &str = "lb_xdp";
/// Maps pinned under the pin directory (state that must survive a daemon restart).
pub const PINNED_MAPS: [&str; 4] = ["CONN_V4", "CONN_V6", "PERSIST", "STATE_LAYOUT"];
/// The pinned XDP link is `link-<mode>-<interface>` in the pin directory (bpffs refuses names with
/// a dot, so a dot in the interface name is written `%2e`, and `%` as `%25`).
const LINK_PIN_PREFIX: &str = "link-";

fn link_pin_name(mode: XdpMode, interface: &str) -> String {
    let iface = interface.replace('%', "%25").replace('.', "%2e");
    format!("{LINK_PIN_PREFIX}{}-{iface}", mode_name(mode))
}

/// An error with its causes, for messages that carry it as text.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error(
        "pin directory {0} is in use by another lb-daemon (one daemon per pin_dir; stop it first)"
    )]
    PinDirBusy(PathBuf),
    #[error(
        "pinned map {map} in {dir} does not fit this build: {detail}. Start with the settings it was made with, or remove the data plane with `lb-daemon --detach` (established flows are lost)"
    )]
    Incompatible {
        map: String,
        dir: PathBuf,
        detail: String,
    },
    #[error(
        "pinned state tables in {dir} have layout version {found}, this build reads version {STATE_LAYOUT_VERSION}: no migration between them exists; run the build that made them, or remove them with `lb-daemon --detach` (established flows are lost)"
    )]
    LayoutVersion { dir: PathBuf, found: u32 },
    #[error("parsing the XDP object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error(
        "{pin} is an XDP attachment on {interface} in {mode} mode, but this daemon is configured for {want_interface} in {want_mode} mode: run `lb-daemon --detach` with the old configuration first"
    )]
    ForeignLink {
        pin: PathBuf,
        interface: String,
        mode: String,
        want_interface: String,
        want_mode: String,
    },
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error(transparent)]
    TxErrors(#[from] crate::tx_errors::TxErrorsError),
    #[error("pinned link {pin}: {source}")]
    Link { pin: PathBuf, source: LinkError },
    #[error("pinning the XDP link at {pin}: {reason}")]
    PinLink { pin: PathBuf, reason: String },
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
    /// The attachment, pinned (dropping this handle leaves it attached).
    link: Option<FdLink>,
    pin_dir: PathBuf,
    /// Held while this daemon uses `pin_dir`.
    _lock: Flock<File>,
    vips: HashMap<MapData, VipKey, u32>,
    vs: Array<MapData, VsEntry>,
    vip_ports: Array<MapData, u64>,
    vip_addrs: HashMap<MapData, VipKey, u32>,
    ring: Array<MapData, u32>,
    engines: Array<MapData, Engine>,
    devmap: DevMap<MapData>,
    globals: Array<MapData, Globals>,
    tx_error_filter: Array<MapData, TxErrorFilter>,
    pub conn_v4: HashMap<MapData, FlowV4, ConnEntry>,
    pub conn_v6: HashMap<MapData, FlowV6, ConnEntry>,
    pub persist: HashMap<MapData, PersistKey, PersistEntry>,
    /// Shared with the metrics endpoint.
    pub counters: Arc<Counters>,
    /// Flows of unknown owner the program hands up (taken by the owner-query task).
    pub owner_queries: Option<RingBuf<MapData>>,
    /// The programs' log records (aya-log: their rare events), taken by [`forward_logs`].
    pub logs: Option<DataplaneLogs>,
    /// The attachment was taken over from a previous daemon (the data plane was steering).
    adopted: bool,
    max_vs: u32,
}

/// The per-CPU counter maps (read by the metrics endpoint).
pub struct Counters {
    vs_stats: PerCpuArray<MapData, TrafficCounters>,
    engine_stats: PerCpuArray<MapData, TrafficCounters>,
    reasons: PerCpuArray<MapData, u64>,
    tx_errors: PerCpuArray<MapData, u64>,
    /// The attached program, once attached.
    pub program: OnceLock<ProgramIdent>,
    /// Set once the transmit-failure tracepoints are attached ([`Counters::tx_errors`] counts).
    pub tx_errors_watched: OnceLock<()>,
}

/// Which program is attached: the kernel's id and tag (a hash of its instructions), so an upgrade
/// shows in the metrics and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramIdent {
    pub id: u32,
    pub tag: String,
}

/// Takes the pin directory's lock, or says another daemon has it.
fn lock_pin_dir(pin_dir: &Path) -> Result<Flock<File>, DataplaneError> {
    let dir = File::open(pin_dir).map_err(|e| DataplaneError::PinDir {
        path: pin_dir.to_owned(),
        reason: e.to_string(),
    })?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock)
        .map_err(|_| DataplaneError::PinDirBusy(pin_dir.to_owned()))
}

/// Checks the state tables pinned in `pin_dir` (if any) against what `object` would create with
/// `max_entries`: map type, key and value size, capacity, flags, and the layout version.
pub fn check_pinned(
    object: &[u8],
    pin_dir: &Path,
    max_entries: &[(&str, u32)],
) -> Result<(), DataplaneError> {
    let obj = aya_obj::Object::parse(object)?;
    let incompatible = |map: &str, detail: String| DataplaneError::Incompatible {
        map: map.to_owned(),
        dir: pin_dir.to_owned(),
        detail,
    };
    let mut found_any = false;
    for name in PINNED_MAPS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        found_any = true;
        let want = obj
            .maps
            .get(name)
            .ok_or_else(|| incompatible(name, "this build's object has no such map".into()))?;
        let have = MapInfo::from_pin(&path).map_err(map_err_dyn(name))?;
        let want_entries = max_entries
            .iter()
            .find(|(m, _)| *m == name)
            .map_or(want.max_entries(), |(_, n)| *n);
        let have_type = have.map_type().map_err(map_err_dyn(name))? as u32;
        let checks = [
            ("map type", have_type, want.map_type()),
            ("key size", have.key_size(), want.key_size()),
            ("value size", have.value_size(), want.value_size()),
            ("capacity", have.max_entries(), want_entries),
            ("flags", have.map_flags(), want.map_flags()),
        ];
        for (what, have, want) in checks {
            if have != want {
                return Err(incompatible(
                    name,
                    format!("{what} is {have} pinned, {want} in this build"),
                ));
            }
        }
    }
    if found_any {
        let path = pin_dir.join("STATE_LAYOUT");
        // Tables pinned by builds before the layout map existed are version 1.
        let found = if path.exists() {
            let map = MapData::from_pin(&path).map_err(map_err_dyn("STATE_LAYOUT"))?;
            let layout: Array<MapData, u32> =
                Array::try_from(aya::maps::Map::Array(map)).map_err(map_err_dyn("STATE_LAYOUT"))?;
            match layout.get(&0, 0).map_err(map_err_dyn("STATE_LAYOUT"))? {
                0 => 1,
                v => v,
            }
        } else {
            1
        };
        if found != STATE_LAYOUT_VERSION {
            return Err(DataplaneError::LayoutVersion {
                dir: pin_dir.to_owned(),
                found,
            });
        }
    }
    Ok(())
}

fn map_err_dyn(map: &str) -> impl FnOnce(MapError) -> DataplaneError + '_ {
    move |source| DataplaneError::Incompatible {
        map: map.to_owned(),
        dir: PathBuf::new(),
        detail: chain(&source),
    }
}

/// The pinned links in `pin_dir`: (path, mode, interface).
fn pinned_links(pin_dir: &Path) -> Vec<(PathBuf, String, String)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut links: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (mode, interface) = name.strip_prefix(LINK_PIN_PREFIX)?.split_once('-')?;
            let interface = interface.replace("%2e", ".").replace("%25", "%");
            Some((e.path(), mode.to_owned(), interface))
        })
        .collect();
    links.sort();
    links
}

fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Native => "native",
        XdpMode::Generic => "generic",
    }
}

/// What [`detach_for_good`] removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: Vec<PathBuf>,
    pub maps: Vec<&'static str>,
}

/// Removes the data plane for good: the pinned XDP link (which detaches the program once no daemon
/// holds it) and the pinned state tables. Refuses while a daemon uses `pin_dir`.
pub fn detach_for_good(pin_dir: &Path) -> Result<Removed, DataplaneError> {
    let mut removed = Removed::default();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let lock = lock_pin_dir(pin_dir)?;
    for (pin, ..) in pinned_links(pin_dir) {
        std::fs::remove_file(&pin).map_err(|e| DataplaneError::PinDir {
            path: pin.clone(),
            reason: e.to_string(),
        })?;
        removed.links.push(pin);
    }
    for name in PINNED_MAPS {
        let path = pin_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| DataplaneError::PinDir {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            removed.maps.push(name);
        }
    }
    drop(lock);
    // Only if nothing else lives there (a shared bpffs mount point stays).
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

/// The data plane's log: aya-log records, written to the process's `log` logger (the daemon's
/// tracing).
pub type DataplaneLogs = EbpfLogger<&'static dyn log::Log>;

/// Writes the data plane's log records into the daemon's log as they come (targets
/// `lb_xdp::…`), until polling the ring buffer fails.
pub async fn forward_logs(logs: DataplaneLogs) {
    // SAFETY: the logger owns the ring buffer's descriptor and the `AsyncFd` owns the logger:
    // the descriptor stays open and the same for the `AsyncFd`'s life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logs, tokio::io::Interest::READABLE)
    };
    let mut logs = match registered {
        Ok(l) => l,
        Err(e) => {
            warn!(
                "data plane log: cannot poll its ring buffer ({e}); its rare events are only counted"
            );
            return;
        }
    };
    loop {
        match logs.readable_mut().await {
            Ok(mut ready) => {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            Err(e) => {
                warn!(
                    "data plane log: polling its ring buffer failed ({e}); its rare events are only counted"
                );
                return;
            }
        }
    }
}

impl Dataplane {
    /// Loads `object` with table sizes from `cfg`, pinning the state tables under `cfg.pin_dir`
    /// (reusing them if a previous run left them there, once [`check_pinned`] accepts them). Does
    /// not attach.
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
        let lock = lock_pin_dir(pin_dir)?;
        check_pinned(
            object,
            pin_dir,
            &[("CONN_V4", conn), ("CONN_V6", conn), ("PERSIST", persist)],
        )?;
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
        let logs = EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| warn!("data plane log: {e}; its rare events are only counted"))
            .ok();
        let mut layout: Array<MapData, u32> = take!("STATE_LAYOUT");
        layout
            .set(0, STATE_LAYOUT_VERSION, 0)
            .map_err(map_err("STATE_LAYOUT"))?;
        Ok(Dataplane {
            pin_dir: pin_dir.to_owned(),
            _lock: lock,
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
                tx_errors: take!("TX_ERRORS"),
                program: OnceLock::new(),
                tx_errors_watched: OnceLock::new(),
            }),
            tx_error_filter: take!("TX_ERROR_FILTER"),
            owner_queries: Some(take!("OWNER_QUERIES")),
            logs,
            adopted: false,
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

    /// Attaches to `interface`, or takes over the attachment a previous daemon pinned there: its
    /// program is replaced by this one atomically (`bpf_link_update`), so steering never stops.
    /// Native mode fails if the driver cannot do it; generic mode works anywhere but runs after the
    /// kernel allocated an skb, so it warns loudly.
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
        let want_pin = self.pin_dir.join(link_pin_name(mode, interface));
        let mut adopt = None;
        for (pin, pin_mode, pin_iface) in pinned_links(&self.pin_dir) {
            if pin != want_pin {
                return Err(DataplaneError::ForeignLink {
                    pin,
                    interface: pin_iface,
                    mode: pin_mode,
                    want_interface: interface.to_owned(),
                    want_mode: mode_name(mode).to_owned(),
                });
            }
            adopt = Some(pin);
        }
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM)
            .expect("loaded in load()")
            .try_into()?;
        let link_err = |source| DataplaneError::Link {
            pin: want_pin.clone(),
            source,
        };
        let fd_link = if let Some(pin) = adopt {
            let pinned = PinnedLink::from_pin(&pin).map_err(link_err)?;
            let fd_link = FdLink::from(pinned);
            let old = fd_link.info().map_err(link_err)?.program_id();
            let id = prog.attach_to_link(XdpLink::try_from(fd_link).map_err(link_err)?)?;
            let fd_link: FdLink = prog.take_link(id)?.try_into().map_err(link_err)?;
            info!(
                interface,
                ?mode,
                old_program = old,
                "took over the pinned XDP link: program replaced atomically"
            );
            self.adopted = true;
            fd_link
        } else {
            let id = prog
                .attach(interface, aya_mode)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.into(),
                    mode,
                    source,
                })?;
            let fd_link: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|e: LinkError| DataplaneError::PinLink {
                    pin: want_pin.clone(),
                    reason: format!("the kernel gave no BPF link for XDP ({e}); a daemon restart would detach the program"),
                })?;
            let pinned = fd_link
                .pin(&want_pin)
                .map_err(|e| DataplaneError::PinLink {
                    pin: want_pin.clone(),
                    reason: chain(&e),
                })?;
            info!(interface, ?mode, pin = %want_pin.display(), "XDP program attached");
            FdLink::from(pinned)
        };
        let ident = self.program_ident()?;
        info!(program_id = ident.id, tag = %ident.tag, "steering program");
        let prog_id = ident.id;
        let _ = self.counters.program.set(ident);
        self.link = Some(fd_link);
        // Not fatal: steering works without it, the metrics then say nothing about failed transmits.
        match self.watch_tx_errors(interface, prog_id) {
            Ok(()) => {
                let _ = self.counters.tx_errors_watched.set(());
            }
            Err(e) => warn!(
                "transmit failures after the XDP verdict will not be counted: {}",
                chain(&e)
            ),
        }
        Ok(())
    }

    /// Attaches the tracepoint programs that count failed transmits of this program on `interface`.
    fn watch_tx_errors(&mut self, interface: &str, prog_id: u32) -> Result<(), DataplaneError> {
        let tracefs = crate::tx_errors::tracefs()?;
        crate::tx_errors::check_formats(&tracefs)?;
        let ifindex =
            nix::net::if_::if_nametoindex(interface).map_err(|e| DataplaneError::Interface {
                name: interface.to_owned(),
                reason: e.to_string(),
            })?;
        self.tx_error_filter
            .set(0, TxErrorFilter { prog_id, ifindex }, 0)
            .map_err(map_err("TX_ERROR_FILTER"))?;
        for (program, tracepoint, _) in crate::tx_errors::PROGRAMS {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or(DataplaneError::Missing("a tracepoint program"))?
                .try_into()?;
            prog.load()?;
            prog.attach("xdp", tracepoint)?;
        }
        info!(interface, "counting failed XDP transmits (xdp tracepoints)");
        Ok(())
    }

    /// The loaded program's kernel id and tag.
    pub fn program_ident(&self) -> Result<ProgramIdent, DataplaneError> {
        let info = self.program().info()?;
        Ok(ProgramIdent {
            id: info.id(),
            tag: format!("{:016x}", info.tag()),
        })
    }

    /// Whether [`Dataplane::attach`] took over a pinned attachment (the data plane was steering
    /// before this daemon started).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory this data plane holds.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes `c` into the maps: exactly [`Changes::steps`], in that order. Long batches (a ring
    /// is 65537 slots) are system calls one entry at a time; the engine runs this off the async
    /// workers.
    pub fn apply(&mut self, c: &Changes) -> Result<(), DataplaneError> {
        for step in c.steps() {
            self.write(step)?;
        }
        Ok(())
    }

    fn write(&mut self, step: Write<'_>) -> Result<(), DataplaneError> {
        match step {
            Write::Globals(g) => self.globals.set(0, g, 0).map_err(map_err("GLOBALS"))?,
            Write::EnginesEnable(w) | Write::EnginesDisable(w) => {
                for (id, e) in w {
                    self.engines.set(*id, e, 0).map_err(map_err("ENGINES"))?;
                }
            }
            Write::DevmapSet(w) => {
                for (id, ifindex) in w {
                    self.devmap.set(*id, *ifindex, None, 0)?;
                }
            }
            Write::RingSlots(w) => {
                for (vs, slot, engine) in w {
                    self.set_slot(*vs, *slot, *engine)?;
                }
            }
            Write::VsSet(w) => {
                for (id, v) in w {
                    self.vs.set(*id, v, 0).map_err(map_err("VS"))?;
                }
            }
            Write::VipPortsGrow(w) | Write::VipPortsShrink(w) => {
                for (word, bits) in w {
                    self.vip_ports
                        .set(*word, bits, 0)
                        .map_err(map_err("VIP_PORTS"))?;
                }
            }
            Write::VipAddrsSet(w) => {
                for (k, n) in w {
                    self.vip_addrs
                        .insert(k, n, 0)
                        .map_err(map_err("VIP_ADDRS"))?;
                }
            }
            Write::VipsSet(w) => {
                for (k, id) in w {
                    self.vips.insert(k, id, 0).map_err(map_err("VIPS"))?;
                }
            }
            Write::VipsRemove(w) => {
                for k in w {
                    self.vips.remove(k).map_err(map_err("VIPS"))?;
                }
            }
            Write::VipAddrsRemove(w) => {
                for k in w {
                    self.vip_addrs.remove(k).map_err(map_err("VIP_ADDRS"))?;
                }
            }
            Write::VsClear(w) => {
                for id in w {
                    self.vs
                        .set(*id, VsEntry::default(), 0)
                        .map_err(map_err("VS"))?;
                }
            }
            Write::RingsClear(w) => {
                for vs in w {
                    for slot in 0..RING_SIZE {
                        self.set_slot(*vs, slot, ENGINE_NONE)?;
                    }
                }
            }
            Write::DevmapRemove(w) => {
                for id in w {
                    self.devmap.set(*id, 0, None, 0)?;
                }
            }
            Write::EnginesRemove(w) => {
                for id in w {
                    self.engines
                        .set(*id, Engine::default(), 0)
                        .map_err(map_err("ENGINES"))?;
                }
            }
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
    /// Failed transmits after the verdict, summed over CPUs; `None` unless they are watched.
    pub fn tx_errors(&self) -> Option<Result<Vec<(TxError, u64)>, DataplaneError>> {
        self.tx_errors_watched.get()?;
        debug_assert_eq!(TxError::ALL.len(), TX_ERROR_COUNT as usize);
        Some(
            TxError::ALL
                .iter()
                .map(|k| {
                    let per_cpu = self
                        .tx_errors
                        .get(&(*k as u32), 0)
                        .map_err(map_err("TX_ERRORS"))?;
                    Ok((*k, per_cpu.iter().sum()))
                })
                .collect(),
        )
    }

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
