//! The load balancer's model: the engine's TOML configuration (the schema of
//! `deploy/lb.example.toml`), its defaults and its validation. [`Desired`] is the part that is not
//! the host's own (`[daemon]`): what the file and the controller's snapshots both describe, and what
//! an engine applies.
//!
//! [`Config::parse`] (and [`Config::load`]) return only configurations that passed every check in
//! [`Config::validate`]; every validation error names the offending field by its path, e.g.
//! `virtual_services[0].engines[1].id: engine 9 is not defined in [[engines]]`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use lb_common::{DEFAULT_CONN_ENTRIES, DEFAULT_MAX_VS, DEFAULT_PERSIST_ENTRIES, MAX_ENGINES};

mod bgp;
mod proxy;
pub use bgp::{
    AS_TRANS, BfdConfig, BgpConfig, BgpPeerConfig, MAX_PASSWORD_BYTES, Password, VsBgpConfig,
    parse_community,
};
pub use proxy::{
    Algorithm, BackendConfig, HealthCheckConfig, HealthCheckKind, PoolConfig, ProxyConfig,
};

/// Largest accepted `daemon.max_virtual_services`.
pub const MAX_VIRTUAL_SERVICES: u32 = 4096;
/// Smallest accepted `daemon.conn_table_size` and `daemon.persist_table_size`.
pub const MIN_TABLE_SIZE: u32 = 1024;
/// Largest accepted member weight.
pub const MAX_WEIGHT: u32 = 65535;
/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// TOML syntax error, wrong type, unknown or missing field: toml's message, which names the
    /// line, column and key.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// The configuration is well-formed but not valid.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the offending field, e.g. `virtual_services[2].port`.
        field: String,
        reason: String,
    },
}

impl ConfigError {
    /// The field path of a validation error.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub engines: Vec<EngineConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub virtual_services: Vec<VirtualServiceConfig>,
    /// Peer liveness between engines (none: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// The BGP speaker (none: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

/// `[peers]`: liveness probes between the engines of a virtual service, independent of the
/// controller. The primary probes its secondaries (their `engines[].address_v4`) every
/// `interval_ms`; one silent for `down_after` intervals gets no new flows (its entry is down in the
/// data plane) until it answers `up_after` probes in a row. Probes are authenticated with `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// HMAC-SHA256 key shared by the engines: at least 32 hexadecimal digits.
    pub key: String,
    #[serde(default = "default_peer_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_peer_down_after")]
    pub down_after: u32,
    #[serde(default = "default_peer_up_after")]
    pub up_after: u32,
    /// UDP port every engine answers probes on.
    #[serde(default = "default_peer_port")]
    pub port: u16,
}

fn default_peer_interval_ms() -> u32 {
    50
}
fn default_peer_down_after() -> u32 {
    3
}
fn default_peer_up_after() -> u32 {
    3
}
fn default_peer_port() -> u16 {
    7401
}

impl PeersConfig {
    /// Probes with `key` and the default timings.
    pub fn with_key(key: String) -> Self {
        PeersConfig {
            key,
            interval_ms: default_peer_interval_ms(),
            down_after: default_peer_down_after(),
            up_after: default_peer_up_after(),
            port: default_peer_port(),
        }
    }

    /// The key's bytes (validated: even length, hexadecimal, at least 16 bytes).
    pub fn key_bytes(&self) -> Option<Vec<u8>> {
        if !self.key.len().is_multiple_of(2) || self.key.len() < 32 {
            return None;
        }
        (0..self.key.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(self.key.get(i..i + 2)?, 16).ok())
            .collect()
    }
}

/// `[daemon]`: this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the XDP program attaches (the VIP-facing interface).
    pub interface: String,
    /// This host's engine id; must appear in `[[engines]]`.
    pub engine_id: u32,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// bpffs directory where the tables are pinned (default `/sys/fs/bpf/lb`).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Prometheus `/metrics` listener (default `127.0.0.1:9100`).
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    #[serde(default = "default_max_vs")]
    pub max_virtual_services: u32,
    /// Connection-table capacity, per address family.
    #[serde(default = "default_conn_entries")]
    pub conn_table_size: u32,
    #[serde(default = "default_persist_entries")]
    pub persist_table_size: u32,
    /// The daemon puts each VIP on `interface` where this engine is the primary (so it answers
    /// ARP / ND for it, and announces it with gratuitous ARP / unsolicited NA when it takes it
    /// over) and on `lo` elsewhere, and sets `arp_ignore=1` / `arp_announce=2` on `interface`.
    /// Off: the operator places the addresses (an engine then cannot take over a VIP by itself).
    #[serde(default)]
    pub manage_vip_addresses: bool,
    /// Directory for this engine's own state files: the primary roles it took by promotion
    /// (`roles-<engine_id>.json`), so a restarted daemon carries on as it was.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Outer source address of IP-in-IP packets (needed when an engine tunnels over IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v4: Option<Ipv4Addr>,
    /// Outer source address of IPv6-in-IPv6 packets (needed when an engine tunnels over IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v6: Option<Ipv6Addr>,
    /// Threads of the daemon's runtime (control, health checks, the UDP proxy, metrics; the TCP
    /// proxy has `proxy_threads`), 1–256; 0: one per CPU the daemon may run on. A reload cannot
    /// change it.
    #[serde(default)]
    pub worker_threads: u32,
    /// Threads the TCP proxy accepts and relays on, 1–256; 0: one per CPU the daemon may run on.
    /// Each runs its own event loop with its own listener of every TCP virtual service (a
    /// `SO_REUSEPORT` group), and a connection stays on the thread that accepted it. A reload
    /// cannot change it.
    #[serde(default)]
    pub proxy_threads: u32,
}

impl DaemonConfig {
    /// The settings of a host attached to `interface` as engine `engine_id`, everything else at its
    /// default.
    pub fn new(interface: &str, engine_id: u32) -> Self {
        DaemonConfig {
            interface: interface.to_owned(),
            engine_id,
            xdp_mode: XdpMode::default(),
            pin_dir: default_pin_dir(),
            metrics_listen: default_metrics_listen(),
            max_virtual_services: default_max_vs(),
            conn_table_size: default_conn_entries(),
            persist_table_size: default_persist_entries(),
            manage_vip_addresses: false,
            state_dir: default_state_dir(),
            tunnel_source_v4: None,
            tunnel_source_v6: None,
            worker_threads: 0,
            proxy_threads: 0,
        }
    }

    /// The runtime's threads: `worker_threads`, or one per CPU the daemon may run on.
    pub fn runtime_threads(&self) -> usize {
        threads_or_cpus(self.worker_threads)
    }

    /// The TCP proxy's threads: `proxy_threads`, or one per CPU the daemon may run on.
    pub fn proxy_thread_count(&self) -> usize {
        threads_or_cpus(self.proxy_threads)
    }
}

fn threads_or_cpus(n: u32) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n as usize,
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lb")
}
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}
fn default_max_vs() -> u32 {
    DEFAULT_MAX_VS
}
fn default_conn_entries() -> u32 {
    DEFAULT_CONN_ENTRIES
}
fn default_persist_entries() -> u32 {
    DEFAULT_PERSIST_ENTRIES
}
fn default_weight() -> u32 {
    1
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode; attaching fails if the driver cannot.
    #[default]
    Native,
    /// Generic (skb) mode: works everywhere, slowly.
    Generic,
}

/// `[[engines]]`: a host that serves the virtual services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// `0..MAX_ENGINES`.
    pub id: u32,
    /// L2: the engine's MAC; tunnel: the next hop's MAC. Required except for this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default)]
    pub mode: EngineMode,
    #[serde(default)]
    pub state: EngineState,
    /// Egress interface when not `daemon.interface`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// IPv4 tunnel endpoint (tunnel mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v4: Option<Ipv4Addr>,
    /// IPv6 tunnel endpoint (tunnel mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<Ipv6Addr>,
    /// Tunnel mode: the largest IP packet the path to the engine carries, encapsulation included
    /// (default: the egress interface's MTU). Bigger packets are answered with ICMP too-big.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl EngineConfig {
    /// An active engine on the segment (`mac`: required unless it is the host itself).
    pub fn l2(id: u32, mac: Option<MacAddr>) -> Self {
        EngineConfig {
            id,
            mac,
            mode: EngineMode::L2,
            state: EngineState::Active,
            interface: None,
            address_v4: None,
            address_v6: None,
            mtu: None,
        }
    }
}

/// The smallest tunnel path MTU: IPv4 hosts must accept 576-byte packets (RFC 791).
pub const MIN_TUNNEL_MTU_V4: u16 = 576;
/// With an IPv6 endpoint: 1280 bytes (RFC 8200) plus the 40-byte outer header.
pub const MIN_TUNNEL_MTU_V6: u16 = 1320;

/// How packets reach an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    /// Same L2 segment: MAC rewrite.
    #[default]
    L2,
    /// Routed: IP-in-IP / IPv6-in-IPv6 to the engine's address.
    Tunnel,
}

/// Administrative state of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    /// Gets new flows and keeps its own.
    #[default]
    Active,
    /// Gets no new flows, keeps its existing ones.
    Draining,
    /// Gets nothing.
    Down,
}

impl EngineState {
    /// The data plane's `ENGINE_*` value.
    pub fn code(self) -> u8 {
        match self {
            EngineState::Active => lb_common::ENGINE_ACTIVE,
            EngineState::Draining => lb_common::ENGINE_DRAINING,
            EngineState::Down => lb_common::ENGINE_DOWN,
        }
    }
}

/// `[[virtual_services]]`: one (VIP, port, protocol).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualServiceConfig {
    /// `0..max_virtual_services`, stable: keys the ring and persistence entries.
    pub id: u32,
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Engine id that steers this VIP (answers ARP / NDP).
    pub primary: u32,
    /// Generation of the primary role: bumped by every change of primary (a promotion by the
    /// engines, a migration by the controller). Engines follow the highest epoch they hear of, so an
    /// old primary coming back with a lower one rejoins as a secondary.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// `> 0`: source-IP persistence with this idle timeout in seconds.
    #[serde(default)]
    pub persistence_timeout_s: u32,
    pub engines: Vec<Member>,
    /// The pool this engine's proxy connects to; without one, the engine only steers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Connections the proxy of one engine holds for this virtual service at most.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Takes no new connections; existing ones continue until the drain timeout.
    #[serde(default)]
    pub draining: bool,
    /// How long a drain of this service lets open connections finish (1–3600 s) before the rest
    /// are reset, on an engine that drains or leaves it; unset: `proxy.drain_timeout_s`. The
    /// controller sets it from the service's engine group (`vs_scalein_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_s: Option<u32>,
    /// Announced by BGP (route health injection) from every engine that serves it, while it is
    /// healthy there; needs `[bgp]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<VsBgpConfig>,
}

fn default_max_connections() -> u32 {
    100_000
}

impl VirtualServiceConfig {
    /// Scaled by BGP/ECMP (it has a `bgp` section): the routers spread its flows over every engine
    /// that announces it, and each of them steers the flows it receives; there is no single
    /// primary, and `primary` only has to name a defined engine.
    pub fn by_bgp(&self) -> bool {
        self.bgp.is_some()
    }

    /// Whether the host with engine id `self_id` steers this virtual service: it is the primary,
    /// or, for a service scaled by BGP, one of its engines.
    pub fn steers_here(&self, self_id: u32) -> bool {
        if self.by_bgp() {
            self.engines.iter().any(|m| m.id == self_id)
        } else {
            self.primary == self_id
        }
    }

    /// The order in which engines take over the primary role: the primary, then the other engines
    /// as `engines` lists them.
    pub fn succession(&self) -> Vec<u32> {
        std::iter::once(self.primary)
            .chain(
                self.engines
                    .iter()
                    .map(|m| m.id)
                    .filter(|id| *id != self.primary),
            )
            .collect()
    }
}

/// One engine of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u32,
    /// `0..=65535`; 0 keeps existing flows but takes no new ones.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid MAC address {0:?}: expected six hexadecimal bytes separated by colons, like \"02:00:00:00:00:01\""
)]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[controller]`: managed mode. The engine's file then holds only `[daemon]` and this; everything
/// else comes from the controller's snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The controller's gRPC address, e.g. `https://10.0.0.5:7400`.
    pub address: String,
    /// This engine's name: must match its certificate (`engine-<name>.pem`, `CN=engine:<name>`).
    pub name: String,
    /// PKI directory: `ca.pem`, `engine-<name>.pem`, `engine-<name>.key`.
    #[serde(default = "default_tls_dir")]
    pub tls_dir: PathBuf,
    /// Plain text to a controller started with `--insecure` (a lab only).
    #[serde(default)]
    pub insecure: bool,
    /// Placement tags this engine registers with.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// Relative capacity (cores).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// The engine group it registers in (it must exist on the controller).
    #[serde(default = "default_group")]
    pub group: String,
    /// The last snapshot applied, so a restarted engine starts from it (the data plane keeps
    /// steering with it) before the controller answers.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u32,
}

fn default_tls_dir() -> PathBuf {
    PathBuf::from("/etc/lb/pki")
}
fn default_capacity() -> u32 {
    1
}
fn default_group() -> String {
    "default".to_owned()
}
fn default_state_file() -> PathBuf {
    PathBuf::from("/var/lib/lb/desired.json")
}
fn default_heartbeat_ms() -> u32 {
    1000
}

/// An engine's file in managed mode: the host's settings and its controller, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedFile {
    pub daemon: DaemonConfig,
    pub controller: ControllerConfig,
}

/// What an engine's file describes: the whole configuration (standalone), or the host and a
/// controller (managed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineFile {
    Standalone(Config),
    Managed(ManagedFile),
}

impl EngineFile {
    /// Parses and validates an engine's file; a `[controller]` section makes it managed.
    pub fn parse(text: &str) -> Result<EngineFile, ConfigError> {
        let value: toml::Table = toml::from_str(text)?;
        if !value.contains_key("controller") {
            return Config::parse(text).map(EngineFile::Standalone);
        }
        let file: ManagedFile = toml::from_str(text).map_err(|e| {
            // A managed engine's file names no engines, pools or services: say so plainly.
            for key in ["engines", "virtual_services", "pools", "proxy"] {
                if value.contains_key(key) {
                    return invalid(
                        key,
                        "managed mode (a [controller] section): this comes from the controller, not the file",
                    );
                }
            }
            ConfigError::Toml(e)
        })?;
        let c = &file.controller;
        if !(c.address.starts_with("http://") || c.address.starts_with("https://")) {
            return Err(invalid(
                "controller.address",
                format!("{:?} is not an http:// or https:// address", c.address),
            ));
        }
        if c.name.is_empty() || c.name.len() > 63 {
            return Err(invalid("controller.name", "must be 1 to 63 characters"));
        }
        if c.heartbeat_interval_ms == 0 {
            return Err(invalid(
                "controller.heartbeat_interval_ms",
                "must be above 0",
            ));
        }
        // The host settings pass the same checks as in a standalone file.
        file.initial().validate()?;
        Ok(EngineFile::Managed(file))
    }

    pub fn load(path: &Path) -> Result<EngineFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_owned(),
            error,
        })?;
        EngineFile::parse(&text)
    }
}

impl ManagedFile {
    /// The configuration before any snapshot: this host alone, nothing to serve.
    pub fn initial(&self) -> Config {
        Config {
            daemon: self.daemon.clone(),
            proxy: ProxyConfig::default(),
            engines: vec![EngineConfig::l2(self.daemon.engine_id, None)],
            pools: Vec::new(),
            virtual_services: Vec::new(),
            peers: None,
            bgp: None,
        }
    }
}

/// The desired state one engine applies: everything of [`Config`] but the host's own `[daemon]`
/// settings. The TOML file carries it beside `[daemon]`; in managed mode the controller's snapshots
/// carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub engines: Vec<EngineConfig>,
    #[serde(default)]
    pub virtual_services: Vec<VirtualServiceConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// The BGP speaker. From the controller, `router_id` is `0.0.0.0`: each engine uses its own
    /// `engines[].address_v4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

impl Config {
    /// The configuration of a host with `daemon` settings that applies `desired`, validated.
    /// A `[bgp]` whose `router_id` is `0.0.0.0` takes this host's `engines[].address_v4`.
    pub fn from_parts(daemon: DaemonConfig, desired: Desired) -> Result<Config, ConfigError> {
        let mut config = Config {
            daemon,
            proxy: desired.proxy,
            engines: desired.engines,
            virtual_services: desired.virtual_services,
            pools: desired.pools,
            peers: desired.peers,
            bgp: desired.bgp,
        };
        let own_address = config.local_engine().and_then(|e| e.address_v4);
        if let Some(bgp) = config.bgp.as_mut().filter(|b| b.router_id.is_unspecified()) {
            bgp.router_id = own_address.ok_or_else(|| {
                invalid(
                    "bgp.router_id",
                    format!(
                        "unset, and engine {} has no address_v4 to take it from",
                        config.daemon.engine_id
                    ),
                )
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Everything but `[daemon]`.
    pub fn desired(&self) -> Desired {
        Desired {
            proxy: self.proxy.clone(),
            engines: self.engines.clone(),
            virtual_services: self.virtual_services.clone(),
            pools: self.pools.clone(),
            peers: self.peers.clone(),
            bgp: self.bgp.clone(),
        }
    }

    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The engine with this id.
    pub fn engine(&self, id: u32) -> Option<&EngineConfig> {
        self.engines.iter().find(|e| e.id == id)
    }

    /// This host's entry in `[[engines]]` (present in a validated configuration).
    pub fn local_engine(&self) -> Option<&EngineConfig> {
        self.engine(self.daemon.engine_id)
    }

    /// Checks everything TOML and serde cannot. Reports the first problem found, in file order:
    /// `[daemon]`, then `[[engines]]`, then `[[virtual_services]]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_daemon()?;
        self.validate_engines()?;
        self.validate_virtual_services()?;
        self.validate_proxy()?;
        self.validate_peers()?;
        self.validate_bgp()
    }

    fn validate_bgp(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.bgp {
            b.validate()?;
        }
        if self.bgp.is_none()
            && let Some((i, vs)) = self
                .virtual_services
                .iter()
                .enumerate()
                .find(|(_, vs)| vs.bgp.is_some())
        {
            return Err(invalid(
                format!("virtual_services[{i}].bgp"),
                format!(
                    "{} is announced by BGP but there is no [bgp] section",
                    vs.name
                ),
            ));
        }
        Ok(())
    }

    fn validate_peers(&self) -> Result<(), ConfigError> {
        let Some(p) = &self.peers else {
            return Ok(());
        };
        if p.key_bytes().is_none() {
            return Err(invalid(
                "peers.key",
                "must be at least 32 hexadecimal digits (16 bytes), an even number of them",
            ));
        }
        if !(10..=10_000).contains(&p.interval_ms) {
            return Err(invalid(
                "peers.interval_ms",
                format!("{} is out of range 10..=10000", p.interval_ms),
            ));
        }
        for (field, v) in [
            ("peers.down_after", p.down_after),
            ("peers.up_after", p.up_after),
        ] {
            if !(1..=100).contains(&v) {
                return Err(invalid(field, format!("{v} is out of range 1..=100")));
            }
        }
        if p.port == 0 {
            return Err(invalid("peers.port", "must not be 0"));
        }
        Ok(())
    }

    fn validate_daemon(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        check_ifname("daemon.interface", &d.interface)?;
        for (field, n) in [
            ("daemon.worker_threads", d.worker_threads),
            ("daemon.proxy_threads", d.proxy_threads),
        ] {
            if n > 256 {
                return Err(invalid(field, format!("{n} is above 256 (0: one per CPU)")));
            }
        }
        if !(1..=MAX_VIRTUAL_SERVICES).contains(&d.max_virtual_services) {
            return Err(invalid(
                "daemon.max_virtual_services",
                format!(
                    "{} is out of range 1..={MAX_VIRTUAL_SERVICES}",
                    d.max_virtual_services
                ),
            ));
        }
        for (field, size) in [
            ("daemon.conn_table_size", d.conn_table_size),
            ("daemon.persist_table_size", d.persist_table_size),
        ] {
            if size < MIN_TABLE_SIZE {
                return Err(invalid(
                    field,
                    format!("{size} is less than {MIN_TABLE_SIZE}"),
                ));
            }
        }
        if let Some(a) = d.tunnel_source_v4 {
            check_unicast("daemon.tunnel_source_v4", IpAddr::V4(a))?;
        }
        if let Some(a) = d.tunnel_source_v6 {
            check_unicast("daemon.tunnel_source_v6", IpAddr::V6(a))?;
        }
        Ok(())
    }

    fn validate_engines(&self) -> Result<(), ConfigError> {
        let self_id = self.daemon.engine_id;
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for (i, e) in self.engines.iter().enumerate() {
            let at = format!("engines[{i}]");
            if e.id >= MAX_ENGINES {
                return Err(invalid(
                    format!("{at}.id"),
                    format!("{} is out of range 0..={}", e.id, MAX_ENGINES - 1),
                ));
            }
            if let Some(first) = seen.insert(e.id, i) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!("engine {} is already defined by engines[{first}]", e.id),
                ));
            }
            if let Some(ifname) = &e.interface {
                check_ifname(&format!("{at}.interface"), ifname)?;
            }
            if e.id == self_id {
                // This host: packets are passed to the local stack; mac/mode/addresses are unused.
                continue;
            }
            if e.mac.is_none() {
                return Err(invalid(
                    format!("{at}.mac"),
                    format!(
                        "engine {} is not this host (daemon.engine_id = {self_id}), so it needs a MAC",
                        e.id
                    ),
                ));
            }
            if e.mode == EngineMode::Tunnel {
                if e.address_v4.is_none() && e.address_v6.is_none() {
                    return Err(invalid(
                        format!("{at}.address_v4"),
                        format!(
                            "tunnel-mode engine {} needs address_v4 and/or address_v6",
                            e.id
                        ),
                    ));
                }
                if let Some(a) = e.address_v4 {
                    check_unicast(&format!("{at}.address_v4"), IpAddr::V4(a))?;
                    if self.daemon.tunnel_source_v4.is_none() {
                        return Err(invalid(
                            "daemon.tunnel_source_v4",
                            format!("required: engine {} ({at}) tunnels over IPv4", e.id),
                        ));
                    }
                }
                if let Some(a) = e.address_v6 {
                    check_unicast(&format!("{at}.address_v6"), IpAddr::V6(a))?;
                    if self.daemon.tunnel_source_v6.is_none() {
                        return Err(invalid(
                            "daemon.tunnel_source_v6",
                            format!("required: engine {} ({at}) tunnels over IPv6", e.id),
                        ));
                    }
                }
                if let Some(mtu) = e.mtu {
                    let (min, why) = if e.address_v6.is_some() {
                        (MIN_TUNNEL_MTU_V6, "with an IPv6 endpoint (1280 + 40)")
                    } else {
                        (MIN_TUNNEL_MTU_V4, "for IPv4")
                    };
                    if mtu < min {
                        return Err(invalid(
                            format!("{at}.mtu"),
                            format!("{mtu} is below {min}, the smallest tunnel path MTU {why}"),
                        ));
                    }
                }
            } else if e.mtu.is_some() {
                return Err(invalid(
                    format!("{at}.mtu"),
                    "only tunnel-mode engines have a path MTU (L2 engines share the segment's)",
                ));
            }
        }
        if !seen.contains_key(&self_id) {
            return Err(invalid(
                "daemon.engine_id",
                format!("engine {self_id} is not defined in [[engines]]"),
            ));
        }
        Ok(())
    }

    fn validate_virtual_services(&self) -> Result<(), ConfigError> {
        let max_vs = self.daemon.max_virtual_services;
        let mut ids: HashMap<u32, usize> = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut services: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        for (i, vs) in self.virtual_services.iter().enumerate() {
            let at = format!("virtual_services[{i}]");
            if vs.id >= max_vs {
                return Err(invalid(
                    format!("{at}.id"),
                    format!(
                        "{} is out of range 0..={} (daemon.max_virtual_services = {max_vs})",
                        vs.id,
                        max_vs - 1
                    ),
                ));
            }
            if let Some(first) = ids.insert(vs.id, i) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!(
                        "virtual service id {} is already used by virtual_services[{first}]",
                        vs.id
                    ),
                ));
            }
            if vs.name.trim().is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            if let Some(first) = names.insert(&vs.name, i) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("{:?} is already used by virtual_services[{first}]", vs.name),
                ));
            }
            check_unicast(&format!("{at}.vip"), vs.vip)?;
            if vs.port == 0 {
                return Err(invalid(format!("{at}.port"), "must not be 0"));
            }
            if let Some(t) = vs.drain_timeout_s
                && !(1..=3600).contains(&t)
            {
                return Err(invalid(
                    format!("{at}.drain_timeout_s"),
                    format!("{t} is outside 1–3600 s"),
                ));
            }
            if let Some(first) = services.insert((vs.vip, vs.port, vs.protocol), i) {
                return Err(invalid(
                    format!("{at}.vip"),
                    format!(
                        "{} port {} {} is already served by virtual_services[{first}] ({:?})",
                        vs.vip, vs.port, vs.protocol, self.virtual_services[first].name
                    ),
                ));
            }
            if self.engine(vs.primary).is_none() {
                return Err(invalid(
                    format!("{at}.primary"),
                    format!("engine {} is not defined in [[engines]]", vs.primary),
                ));
            }
            self.validate_members(&at, vs)?;
        }
        Ok(())
    }

    fn validate_members(&self, at: &str, vs: &VirtualServiceConfig) -> Result<(), ConfigError> {
        if vs.engines.is_empty() {
            return Err(invalid(
                format!("{at}.engines"),
                "must list at least one engine",
            ));
        }
        let mut seen: HashSet<u32> = HashSet::new();
        for (j, m) in vs.engines.iter().enumerate() {
            if self.engine(m.id).is_none() {
                return Err(invalid(
                    format!("{at}.engines[{j}].id"),
                    format!("engine {} is not defined in [[engines]]", m.id),
                ));
            }
            if !seen.insert(m.id) {
                return Err(invalid(
                    format!("{at}.engines[{j}].id"),
                    format!("engine {} is listed twice", m.id),
                ));
            }
            if m.weight > MAX_WEIGHT {
                return Err(invalid(
                    format!("{at}.engines[{j}].weight"),
                    format!("{} is out of range 0..={MAX_WEIGHT}", m.weight),
                ));
            }
        }
        if vs.engines.iter().all(|m| m.weight == 0) {
            return Err(invalid(
                format!("{at}.engines"),
                "at least one engine needs a weight above 0",
            ));
        }
        Ok(())
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(invalid(
            field,
            format!(
                "{name:?} is {} bytes long; interface names have at most {MAX_IFNAME_LEN}",
                name.len()
            ),
        ));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// Rejects addresses that cannot name one host: unspecified, multicast, IPv4 broadcast.
fn check_unicast(field: &str, addr: IpAddr) -> Result<(), ConfigError> {
    let why = if addr.is_unspecified() {
        "the unspecified address"
    } else if addr.is_multicast() {
        "a multicast address"
    } else if matches!(addr, IpAddr::V4(a) if a.is_broadcast()) {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(invalid(field, format!("{addr} is {why}")))
}

#[cfg(test)]
mod tests;
