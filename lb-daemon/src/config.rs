//! The daemon's TOML configuration: the schema of `deploy/lb.example.toml`, its defaults and its
//! validation.
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
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    pub engines: Vec<EngineConfig>,
    #[serde(default)]
    pub virtual_services: Vec<VirtualServiceConfig>,
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
    /// Outer source address of IP-in-IP packets (needed when an engine tunnels over IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v4: Option<Ipv4Addr>,
    /// Outer source address of IPv6-in-IPv6 packets (needed when an engine tunnels over IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v6: Option<Ipv6Addr>,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
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
}

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
    /// `> 0`: source-IP persistence with this idle timeout in seconds.
    #[serde(default)]
    pub persistence_timeout_s: u32,
    pub engines: Vec<Member>,
}

impl VirtualServiceConfig {
    /// Whether the host with engine id `self_id` steers this virtual service.
    pub fn is_primary_here(&self, self_id: u32) -> bool {
        self.primary == self_id
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

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
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
        self.validate_virtual_services()
    }

    fn validate_daemon(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        check_ifname("daemon.interface", &d.interface)?;
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
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/lb.example.toml");

    /// A small valid configuration that the tests below break one field at a time.
    const BASE: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1
tunnel_source_v4 = "192.0.2.1"
tunnel_source_v6 = "2001:db8::1"

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
mode = "tunnel"
address_v4 = "192.0.2.3"
address_v6 = "2001:db8::3"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]

[[virtual_services]]
id = 1
name = "dns"
vip = "2001:db8:100::53"
port = 53
protocol = "udp"
primary = 2
engines = [ { id = 2, weight = 3 } ]
"#;

    fn base() -> Config {
        Config::parse(BASE).expect("BASE is valid")
    }

    /// Asserts that `config` fails validation on `field`, with a message containing `reason`.
    #[track_caller]
    fn rejects(config: &Config, field: &str, reason: &str) {
        let err = config.validate().expect_err("config should be rejected");
        assert_eq!(err.field(), Some(field), "wrong field in: {err}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
        assert!(msg.contains(reason), "{msg:?} does not contain {reason:?}");
    }

    #[test]
    fn example_file_parses() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.daemon.interface, "eth0");
        assert_eq!(c.daemon.engine_id, 1);
        assert_eq!(c.daemon.xdp_mode, XdpMode::Native);
        assert_eq!(c.daemon.pin_dir, Path::new("/sys/fs/bpf/lb"));
        assert_eq!(c.daemon.metrics_listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(c.daemon.max_virtual_services, 64);
        assert_eq!(c.daemon.conn_table_size, 1_048_576);
        assert_eq!(c.daemon.persist_table_size, 262_144);
        assert_eq!(c.engines.len(), 2);
        let e2 = c.engine(2).unwrap();
        assert_eq!(e2.mac, Some(MacAddr([2, 0, 0, 0, 0, 2])));
        assert_eq!(e2.mode, EngineMode::L2);
        assert_eq!(e2.state, EngineState::Active);
        assert!(c.engine(3).is_none());
        assert_eq!(c.local_engine().unwrap().id, 1);
        let vs = &c.virtual_services[0];
        assert_eq!(vs.name, "web");
        assert_eq!(vs.vip, "10.100.0.10".parse::<IpAddr>().unwrap());
        assert_eq!((vs.port, vs.protocol), (80, Protocol::Tcp));
        assert!(vs.is_primary_here(1));
        assert!(!vs.is_primary_here(2));
        assert_eq!(
            vs.engines,
            [Member { id: 1, weight: 1 }, Member { id: 2, weight: 1 }]
        );
    }

    #[test]
    fn defaults_applied() {
        let c = Config::parse(
            r#"
[daemon]
interface = "eth0"
engine_id = 7
[[engines]]
id = 7
[[engines]]
id = 8
mac = "02:00:00:00:00:08"
[[virtual_services]]
id = 0
name = "a"
vip = "10.0.0.1"
port = 443
protocol = "tcp"
primary = 7
engines = [ { id = 8 } ]
"#,
        )
        .unwrap();
        let d = &c.daemon;
        assert_eq!(d.xdp_mode, XdpMode::Native);
        assert_eq!(d.pin_dir, PathBuf::from("/sys/fs/bpf/lb"));
        assert_eq!(d.metrics_listen, SocketAddr::from(([127, 0, 0, 1], 9100)));
        assert_eq!(d.max_virtual_services, DEFAULT_MAX_VS);
        assert_eq!(d.conn_table_size, DEFAULT_CONN_ENTRIES);
        assert_eq!(d.persist_table_size, DEFAULT_PERSIST_ENTRIES);
        assert_eq!(d.tunnel_source_v4, None);
        assert_eq!(d.tunnel_source_v6, None);
        let e = c.engine(8).unwrap();
        assert_eq!((e.mode, e.state), (EngineMode::L2, EngineState::Active));
        assert_eq!(
            (e.interface.as_deref(), e.address_v4, e.address_v6),
            (None, None, None)
        );
        let vs = &c.virtual_services[0];
        assert_eq!(vs.persistence_timeout_s, 0);
        assert_eq!(vs.engines[0].weight, 1);
    }

    #[test]
    fn no_virtual_services_is_valid() {
        let c = Config::parse("[daemon]\ninterface = \"lo\"\nengine_id = 0\n[[engines]]\nid = 0\n")
            .unwrap();
        assert!(c.virtual_services.is_empty());
    }

    #[test]
    fn enums_parse() {
        let text = BASE
            .replace("engine_id = 1\n", "engine_id = 1\nxdp_mode = \"generic\"\n")
            .replace("id = 2\nmac", "id = 2\nstate = \"draining\"\nmac");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.daemon.xdp_mode, XdpMode::Generic);
        assert_eq!(c.engine(2).unwrap().state, EngineState::Draining);
        assert_eq!(c.engine(3).unwrap().mode, EngineMode::Tunnel);
        assert_eq!(c.virtual_services[1].protocol, Protocol::Udp);
        assert_eq!(Protocol::Udp.number(), lb_common::PROTO_UDP);
        assert_eq!(EngineState::Down.code(), lb_common::ENGINE_DOWN);

        let err =
            Config::parse(&BASE.replace("protocol = \"udp\"", "protocol = \"sctp\"")).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err}");
        assert!(err.to_string().contains("sctp"), "{err}");
    }

    #[test]
    fn serialize_round_trips() {
        for text in [BASE, EXAMPLE] {
            let c = Config::parse(text).unwrap();
            let out = toml::to_string(&c).unwrap();
            assert_eq!(Config::parse(&out).unwrap(), c, "{out}");
        }
    }

    #[test]
    fn load_reads_files_and_names_missing_ones() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lb.example.toml");
        assert_eq!(
            Config::load(&path).unwrap(),
            Config::parse(EXAMPLE).unwrap()
        );
        let err = Config::load(Path::new("/nonexistent/lb.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/lb.toml"), "{err}");
    }

    #[test]
    fn unknown_fields_rejected() {
        for (from, to, key) in [
            ("engine_id = 1\n", "engine_id = 1\nbogus = 1\n", "bogus"),
            ("id = 2\nmac", "id = 2\nweight = 5\nmac", "weight"),
            ("name = \"web\"", "name = \"web\"\nvips = []", "vips"),
            ("{ id = 2, weight = 3 }", "{ id = 2, wieght = 3 }", "wieght"),
            ("[daemon]", "[extra]\na = 1\n[daemon]", "extra"),
        ] {
            let text = BASE.replacen(from, to, 1);
            assert_ne!(text, BASE);
            let err = Config::parse(&text).unwrap_err();
            assert!(matches!(err, ConfigError::Toml(_)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("unknown field") && msg.contains(key), "{msg}");
            assert!(msg.contains("line"), "toml's message names the line: {msg}");
        }
    }

    #[test]
    fn syntax_and_type_errors_keep_toml_message() {
        let err = Config::parse(&BASE.replace("port = 80", "port = \"80\"")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Toml(_)));
        assert!(msg.contains("line") && msg.contains("port"), "{msg}");

        let err = Config::parse(&BASE.replace("port = 80", "port = 70000")).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err}");

        let err = Config::parse("[daemon\n").unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)));

        let err = Config::parse(&BASE.replace("interface = \"eth0\"\n", "")).unwrap_err();
        assert!(
            err.to_string().contains("missing field `interface`"),
            "{err}"
        );
    }

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "02:AB:cd:00:0f:ff".parse().unwrap();
        assert_eq!(m, MacAddr([0x02, 0xab, 0xcd, 0x00, 0x0f, 0xff]));
        assert_eq!(m.to_string(), "02:ab:cd:00:0f:ff");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:0g",
            "2:00:00:00:00:00",
            "02-00-00-00-00-00",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:00:",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
        let err = Config::parse(&BASE.replace("02:00:00:00:00:02", "02:00:00:00:02")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("invalid MAC address \"02:00:00:00:02\""),
            "{msg}"
        );
        assert!(msg.contains("line"), "{msg}");
    }

    // ---- [daemon] ----

    #[test]
    fn daemon_interface_empty() {
        let mut c = base();
        c.daemon.interface = String::new();
        rejects(&c, "daemon.interface", "must not be empty");
    }

    #[test]
    fn daemon_interface_too_long() {
        let mut c = base();
        c.daemon.interface = "a".repeat(15);
        c.validate().unwrap();
        c.daemon.interface = "a".repeat(16);
        rejects(&c, "daemon.interface", "at most 15");
    }

    #[test]
    fn daemon_interface_bad_characters() {
        let mut c = base();
        c.daemon.interface = "eth/0".into();
        rejects(&c, "daemon.interface", "not a valid interface name");
    }

    #[test]
    fn max_virtual_services_range() {
        let mut c = base();
        c.daemon.max_virtual_services = 0;
        rejects(
            &c,
            "daemon.max_virtual_services",
            "0 is out of range 1..=4096",
        );
        c.daemon.max_virtual_services = 4097;
        rejects(
            &c,
            "daemon.max_virtual_services",
            "4097 is out of range 1..=4096",
        );
        c.daemon.max_virtual_services = 4096;
        c.validate().unwrap();
    }

    #[test]
    fn table_sizes_minimum() {
        let mut c = base();
        c.daemon.conn_table_size = 1023;
        rejects(&c, "daemon.conn_table_size", "1023 is less than 1024");
        c.daemon.conn_table_size = 1024;
        c.daemon.persist_table_size = 100;
        rejects(&c, "daemon.persist_table_size", "100 is less than 1024");
        c.daemon.persist_table_size = 1024;
        c.validate().unwrap();
    }

    #[test]
    fn tunnel_sources_must_be_unicast() {
        let mut c = base();
        c.daemon.tunnel_source_v4 = Some(Ipv4Addr::UNSPECIFIED);
        rejects(&c, "daemon.tunnel_source_v4", "unspecified");
        c.daemon.tunnel_source_v4 = Some("192.0.2.1".parse().unwrap());
        c.daemon.tunnel_source_v6 = Some("ff02::1".parse().unwrap());
        rejects(&c, "daemon.tunnel_source_v6", "multicast");
    }

    #[test]
    fn daemon_engine_id_must_be_defined() {
        let mut c = base();
        c.daemon.engine_id = 9;
        // Engine 1 is no longer this host and has no MAC: that is found first (file order).
        c.engines[0].mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
        rejects(
            &c,
            "daemon.engine_id",
            "engine 9 is not defined in [[engines]]",
        );
    }

    // ---- [[engines]] ----

    #[test]
    fn engine_id_out_of_range() {
        let mut c = base();
        c.engines[1].id = 300;
        rejects(&c, "engines[1].id", "300 is out of range 0..=255");
        c.engines[1].id = 256;
        rejects(&c, "engines[1].id", "256 is out of range 0..=255");
    }

    #[test]
    fn engine_ids_unique() {
        let mut c = base();
        c.engines[2].id = 2;
        rejects(
            &c,
            "engines[2].id",
            "engine 2 is already defined by engines[1]",
        );
    }

    #[test]
    fn engine_max_id_accepted() {
        let mut c = base();
        c.engines[1].id = 255;
        c.virtual_services[1].primary = 255;
        c.virtual_services[0].engines[1].id = 255;
        c.virtual_services[1].engines[0].id = 255;
        c.validate().unwrap();
    }

    #[test]
    fn non_self_engine_needs_mac() {
        let mut c = base();
        c.engines[1].mac = None;
        rejects(&c, "engines[1].mac", "engine 2 is not this host");
        // This host needs none.
        let mut c = base();
        c.engines[0].mac = None;
        c.validate().unwrap();
    }

    #[test]
    fn engine_interface_checked() {
        let mut c = base();
        c.engines[1].interface = Some(String::new());
        rejects(&c, "engines[1].interface", "must not be empty");
        c.engines[1].interface = Some("veth-too-long-name".into());
        rejects(&c, "engines[1].interface", "at most 15");
        c.engines[1].interface = Some("eth1".into());
        c.validate().unwrap();
    }

    #[test]
    fn tunnel_engine_needs_an_address() {
        let mut c = base();
        c.engines[2].address_v4 = None;
        c.engines[2].address_v6 = None;
        rejects(
            &c,
            "engines[2].address_v4",
            "needs address_v4 and/or address_v6",
        );
        // Either family alone is enough.
        c.engines[2].address_v6 = Some("2001:db8::3".parse().unwrap());
        c.validate().unwrap();
        c.engines[2].address_v6 = None;
        c.engines[2].address_v4 = Some("192.0.2.3".parse().unwrap());
        c.validate().unwrap();
    }

    #[test]
    fn tunnel_engine_address_must_be_unicast() {
        let mut c = base();
        c.engines[2].address_v4 = Some(Ipv4Addr::BROADCAST);
        rejects(&c, "engines[2].address_v4", "broadcast");
        let mut c = base();
        c.engines[2].address_v6 = Some(Ipv6Addr::UNSPECIFIED);
        rejects(&c, "engines[2].address_v6", "unspecified");
    }

    #[test]
    fn tunnel_v4_needs_tunnel_source_v4() {
        let mut c = base();
        c.daemon.tunnel_source_v4 = None;
        rejects(
            &c,
            "daemon.tunnel_source_v4",
            "engine 3 (engines[2]) tunnels over IPv4",
        );
        // Not needed when no engine tunnels over IPv4.
        c.engines[2].address_v4 = None;
        c.validate().unwrap();
    }

    #[test]
    fn tunnel_v6_needs_tunnel_source_v6() {
        let mut c = base();
        c.daemon.tunnel_source_v6 = None;
        rejects(
            &c,
            "daemon.tunnel_source_v6",
            "engine 3 (engines[2]) tunnels over IPv6",
        );
        c.engines[2].address_v6 = None;
        c.validate().unwrap();
    }

    #[test]
    fn l2_engines_need_no_tunnel_source() {
        let mut c = base();
        c.daemon.tunnel_source_v4 = None;
        c.daemon.tunnel_source_v6 = None;
        c.engines[2].mode = EngineMode::L2;
        c.validate().unwrap();
    }

    // ---- [[virtual_services]] ----

    #[test]
    fn vs_id_below_max_virtual_services() {
        let mut c = base();
        c.virtual_services[1].id = 64;
        rejects(
            &c,
            "virtual_services[1].id",
            "64 is out of range 0..=63 (daemon.max_virtual_services = 64)",
        );
        c.daemon.max_virtual_services = 65;
        c.validate().unwrap();
    }

    #[test]
    fn vs_ids_unique() {
        let mut c = base();
        c.virtual_services[1].id = 0;
        rejects(
            &c,
            "virtual_services[1].id",
            "virtual service id 0 is already used by virtual_services[0]",
        );
    }

    #[test]
    fn vs_name_non_empty() {
        let mut c = base();
        c.virtual_services[1].name = " ".into();
        rejects(&c, "virtual_services[1].name", "must not be empty");
    }

    #[test]
    fn vs_names_unique() {
        let mut c = base();
        c.virtual_services[1].name = "web".into();
        rejects(
            &c,
            "virtual_services[1].name",
            "\"web\" is already used by virtual_services[0]",
        );
    }

    #[test]
    fn vs_port_non_zero() {
        let mut c = base();
        c.virtual_services[0].port = 0;
        rejects(&c, "virtual_services[0].port", "must not be 0");
    }

    #[test]
    fn vs_vip_must_be_unicast() {
        for (vip, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let mut c = base();
            c.virtual_services[1].vip = vip.parse().unwrap();
            rejects(&c, "virtual_services[1].vip", why);
        }
    }

    #[test]
    fn vs_duplicate_vip_port_protocol() {
        let mut c = base();
        c.virtual_services.push(VirtualServiceConfig {
            id: 2,
            name: "web2".into(),
            ..c.virtual_services[0].clone()
        });
        rejects(
            &c,
            "virtual_services[2].vip",
            "10.100.0.10 port 80 tcp is already served by virtual_services[0] (\"web\")",
        );
        // Another port, or another protocol, is another virtual service.
        c.virtual_services[2].port = 8080;
        c.validate().unwrap();
        c.virtual_services[2].port = 80;
        c.virtual_services[2].protocol = Protocol::Udp;
        c.validate().unwrap();
    }

    #[test]
    fn vs_primary_must_be_defined() {
        let mut c = base();
        c.virtual_services[1].primary = 9;
        rejects(
            &c,
            "virtual_services[1].primary",
            "engine 9 is not defined in [[engines]]",
        );
    }

    #[test]
    fn vs_engines_non_empty() {
        let mut c = base();
        c.virtual_services[1].engines.clear();
        rejects(&c, "virtual_services[1].engines", "at least one engine");
    }

    #[test]
    fn vs_member_must_be_defined() {
        let mut c = base();
        c.virtual_services[0].engines[1].id = 9;
        rejects(
            &c,
            "virtual_services[0].engines[1].id",
            "engine 9 is not defined in [[engines]]",
        );
    }

    #[test]
    fn vs_member_listed_once() {
        let mut c = base();
        c.virtual_services[0].engines[2].id = 1;
        rejects(
            &c,
            "virtual_services[0].engines[2].id",
            "engine 1 is listed twice",
        );
    }

    #[test]
    fn vs_member_weight_range() {
        let mut c = base();
        c.virtual_services[0].engines[1].weight = 65536;
        rejects(
            &c,
            "virtual_services[0].engines[1].weight",
            "65536 is out of range 0..=65535",
        );
        c.virtual_services[0].engines[1].weight = 65535;
        c.validate().unwrap();
        c.virtual_services[0].engines[1].weight = 0;
        c.validate().unwrap();
    }

    #[test]
    fn vs_needs_a_positive_weight() {
        let mut c = base();
        for m in &mut c.virtual_services[0].engines {
            m.weight = 0;
        }
        rejects(
            &c,
            "virtual_services[0].engines",
            "at least one engine needs a weight above 0",
        );
    }

    #[test]
    fn first_error_in_file_order() {
        let mut c = base();
        c.virtual_services[1].port = 0;
        c.virtual_services[0].port = 0;
        c.engines[1].mac = None;
        rejects(&c, "engines[1].mac", "");
        c.engines[1].mac = Some(MacAddr([2, 0, 0, 0, 0, 2]));
        rejects(&c, "virtual_services[0].port", "must not be 0");
    }

    #[test]
    fn parse_reports_validation_errors() {
        let err = Config::parse(&BASE.replace("port = 53", "port = 0")).unwrap_err();
        assert_eq!(err.to_string(), "virtual_services[1].port: must not be 0");
    }
}
