//! `[proxy]` and `[[pools]]`: how an engine terminates the virtual services it serves and which
//! backend servers it connects to.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, check_unicast, invalid};

/// `[proxy]`: the engine's L4 proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Source address of connections to IPv4 backends (source NAT). Default: the kernel's choice,
    /// the address of the interface the backend is routed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v4: Option<Ipv4Addr>,
    /// Source address of connections to IPv6 backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v6: Option<Ipv6Addr>,
    /// Giving up on a backend that does not accept.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u32,
    /// A TCP connection with no byte in either direction for this long is closed (this also times
    /// out clients that connect and send nothing).
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u32,
    /// A UDP session with no datagram in either direction for this long is forgotten.
    #[serde(default = "default_udp_idle_timeout_s")]
    pub udp_idle_timeout_s: u32,
    /// How long connections of a draining engine or virtual service may continue before they are
    /// reset (scale-in).
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u32,
    /// The open-files limit the daemon raises itself to (capped by the hard limit).
    #[serde(default = "default_max_open_files")]
    pub max_open_files: u64,
    /// Receive and send buffers of each UDP socket of the proxy (the VIP's and every session's),
    /// 64 KiB–256 MiB: what a burst may queue while the proxy is busy.
    #[serde(default = "default_udp_buffer_bytes")]
    pub udp_buffer_bytes: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            source_v4: None,
            source_v6: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            idle_timeout_s: default_idle_timeout_s(),
            udp_idle_timeout_s: default_udp_idle_timeout_s(),
            drain_timeout_s: default_drain_timeout_s(),
            max_open_files: default_max_open_files(),
            udp_buffer_bytes: default_udp_buffer_bytes(),
        }
    }
}

fn default_connect_timeout_ms() -> u32 {
    3000
}
fn default_idle_timeout_s() -> u32 {
    300
}
fn default_udp_idle_timeout_s() -> u32 {
    30
}
fn default_drain_timeout_s() -> u32 {
    30
}
fn default_max_open_files() -> u64 {
    1 << 20
}
fn default_udp_buffer_bytes() -> u32 {
    4 << 20
}

/// `[[pools]]`: backend servers and how connections are spread over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub algorithm: Algorithm,
    pub backends: Vec<BackendConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
}

/// How a pool picks the backend of a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each usable backend in turn.
    #[default]
    RoundRobin,
    /// In turn, in proportion to the weights (smooth: no bursts to one backend).
    WeightedRoundRobin,
    /// The usable backend with the fewest active connections relative to its weight.
    LeastConnections,
    /// By client address (Maglev over the backends): a client keeps its backend while the set of
    /// usable backends does not change.
    ConsistentHash,
}

/// One backend server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: u16,
    /// `0..=65535`; 0 takes no new connections.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl BackendConfig {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

/// `[pools.health_check]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Port to check when not the backend's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP: request path.
    #[serde(default = "default_http_path")]
    pub http_path: String,
    /// HTTP: `Host` header (default: the backend's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_host: Option<String>,
    /// HTTP: the status a healthy backend answers.
    #[serde(default = "default_expected_status")]
    pub expected_status: u16,
}

/// What a health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET http_path` answers `expected_status`.
    Http,
}

fn default_interval_ms() -> u32 {
    2000
}
fn default_check_timeout_ms() -> u32 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_http_path() -> String {
    "/".into()
}
fn default_expected_status() -> u16 {
    200
}

const MAX_WEIGHT: u32 = 65535;

impl Config {
    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub(super) fn validate_proxy(&self) -> Result<(), ConfigError> {
        let p = &self.proxy;
        for (field, v) in [
            ("proxy.connect_timeout_ms", p.connect_timeout_ms),
            ("proxy.idle_timeout_s", p.idle_timeout_s),
            ("proxy.udp_idle_timeout_s", p.udp_idle_timeout_s),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if !(64 << 10..=256 << 20).contains(&p.udp_buffer_bytes) {
            return Err(invalid(
                "proxy.udp_buffer_bytes",
                format!("{} is outside 65536–268435456", p.udp_buffer_bytes),
            ));
        }
        if p.max_open_files < 1024 {
            return Err(invalid(
                "proxy.max_open_files",
                format!("{} is less than 1024", p.max_open_files),
            ));
        }
        if let Some(a) = p.source_v4 {
            check_unicast("proxy.source_v4", IpAddr::V4(a))?;
        }
        if let Some(a) = p.source_v6 {
            check_unicast("proxy.source_v6", IpAddr::V6(a))?;
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            if pool.name.trim().is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            if let Some(first) = names.insert(&pool.name, i) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("{:?} is already used by pools[{first}]", pool.name),
                ));
            }
            if pool.backends.is_empty() {
                return Err(invalid(
                    format!("{at}.backends"),
                    "must list at least one backend",
                ));
            }
            let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
            for (j, b) in pool.backends.iter().enumerate() {
                let bat = format!("{at}.backends[{j}]");
                check_unicast(&format!("{bat}.address"), b.address)?;
                if b.port == 0 {
                    return Err(invalid(format!("{bat}.port"), "must not be 0"));
                }
                if b.weight > MAX_WEIGHT {
                    return Err(invalid(
                        format!("{bat}.weight"),
                        format!("{} is out of range 0..={MAX_WEIGHT}", b.weight),
                    ));
                }
                if let Some(first) = seen.insert(b.socket_addr(), j) {
                    return Err(invalid(
                        format!("{bat}.address"),
                        format!("{} is already {at}.backends[{first}]", b.socket_addr()),
                    ));
                }
            }
            if let Some(h) = &pool.health_check {
                validate_health_check(&format!("{at}.health_check"), h)?;
            }
        }
        for (i, vs) in self.virtual_services.iter().enumerate() {
            if let Some(name) = vs.pool.as_ref().filter(|n| self.pool(n).is_none()) {
                return Err(invalid(
                    format!("virtual_services[{i}].pool"),
                    format!("pool {name:?} is not defined in [[pools]]"),
                ));
            }
        }
        Ok(())
    }
}

fn validate_health_check(at: &str, h: &HealthCheckConfig) -> Result<(), ConfigError> {
    if h.interval_ms < 100 {
        return Err(invalid(
            format!("{at}.interval_ms"),
            format!("{} is less than 100", h.interval_ms),
        ));
    }
    if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
        return Err(invalid(
            format!("{at}.timeout_ms"),
            format!(
                "{} must be in 1..=interval_ms ({})",
                h.timeout_ms, h.interval_ms
            ),
        ));
    }
    for (field, v) in [("rise", h.rise), ("fall", h.fall)] {
        if !(1..=100).contains(&v) {
            return Err(invalid(
                format!("{at}.{field}"),
                format!("{v} is out of range 1..=100"),
            ));
        }
    }
    if h.port == Some(0) {
        return Err(invalid(format!("{at}.port"), "must not be 0"));
    }
    if h.kind == HealthCheckKind::Http {
        if !h.http_path.starts_with('/')
            || h.http_path
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(invalid(
                format!("{at}.http_path"),
                format!(
                    "{:?} must start with / and contain no spaces or control characters",
                    h.http_path
                ),
            ));
        }
        if !(100..=599).contains(&h.expected_status) {
            return Err(invalid(
                format!("{at}.expected_status"),
                format!("{} is not an HTTP status", h.expected_status),
            ));
        }
        if let Some(host) = h.http_host.as_ref().filter(|h| {
            h.is_empty()
                || h.chars()
                    .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        }) {
            return Err(invalid(
                format!("{at}.http_host"),
                format!("{host:?} is not a host name"),
            ));
        }
    }
    Ok(())
}
