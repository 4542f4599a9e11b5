//! `[bgp]`: route health injection. The engine announces the VIP of every virtual service with a
//! `bgp` section that it serves and that is healthy (at least one backend up, not draining), as a
//! host route (/32, /128) with its own address as next hop, to each configured router; the
//! routers spread flows over the engines by ECMP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::{ConfigError, check_unicast, invalid};

/// `AS_TRANS` (RFC 6793): the 2-octet "My AS" of a speaker whose ASN does not fit 16 bits.
pub const AS_TRANS: u16 = 23456;

/// Most standard communities `[bgp]` may put on a route.
pub const MAX_COMMUNITIES: usize = 64;

/// `[bgp]`: this engine's BGP speaker (announce-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// This engine's AS number (4-octet).
    pub asn: u32,
    /// BGP identifier (an IPv4 address of this engine, by custom).
    pub router_id: Ipv4Addr,
    /// Hold time offered to peers (0, or 3–65535 s); the session uses the smaller of both sides'.
    #[serde(default = "default_hold_time_s")]
    pub hold_time_s: u16,
    /// First wait before reconnecting after a session fails; doubles up to `max_backoff_s`.
    #[serde(default = "default_min_backoff_ms")]
    pub min_backoff_ms: u32,
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: u32,
    /// Standard communities (`"ASN:VALUE"`, each 0–65535) on every announced route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    pub peers: Vec<BgpPeerConfig>,
}

/// One router this engine announces to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Hold time offered to this peer instead of `bgp.hold_time_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_s: Option<u16>,
    /// BFD towards this peer (RFC 5880/5881), so a hung engine is withdrawn in the detection time
    /// instead of the hold time; unset: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdConfig>,
    /// Next hop of IPv4 VIPs; unset: the session's local address when it is IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop of IPv6 VIPs; unset: the session's local address when it is IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_v6: Option<Ipv6Addr>,
    /// TCP MD5 signatures on the session (RFC 2385) with this key, 1–80 bytes; unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Password>,
}

/// A TCP MD5 key: shown as `<redacted>` in debug output and logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Longest TCP MD5 key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_PASSWORD_BYTES: usize = 80;

/// `bgp.peers[].bfd`: the session's timers. The router fails the engine after `multiplier`
/// intervals without a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BfdConfig {
    /// Fastest interval this engine sends at once Up (10–10000 ms).
    #[serde(default = "default_bfd_interval_ms")]
    pub min_tx_ms: u32,
    /// Fastest interval this engine asks the router to send at (10–10000 ms).
    #[serde(default = "default_bfd_interval_ms")]
    pub min_rx_ms: u32,
    /// Intervals without a packet before the session is down (1–255).
    #[serde(default = "default_bfd_multiplier")]
    pub multiplier: u8,
}

impl Default for BfdConfig {
    fn default() -> Self {
        BfdConfig {
            min_tx_ms: default_bfd_interval_ms(),
            min_rx_ms: default_bfd_interval_ms(),
            multiplier: default_bfd_multiplier(),
        }
    }
}

fn default_bfd_interval_ms() -> u32 {
    100
}
fn default_bfd_multiplier() -> u8 {
    3
}

/// A virtual service's `bgp` section: its VIP is announced by BGP from every engine that serves
/// it, with these attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsBgpConfig {
    /// `MULTI_EXIT_DISC` on the route (sent to external peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub med: Option<u32>,
    /// `LOCAL_PREF` on the route (sent to internal peers, same ASN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

fn default_hold_time_s() -> u16 {
    90
}
fn default_min_backoff_ms() -> u32 {
    500
}
fn default_max_backoff_s() -> u32 {
    30
}
fn default_port() -> u16 {
    179
}

/// Parses a standard community `"ASN:VALUE"`.
pub fn parse_community(s: &str) -> Option<u32> {
    let (a, v) = s.split_once(':')?;
    let a: u16 = a.trim().parse().ok()?;
    let v: u16 = v.trim().parse().ok()?;
    Some((u32::from(a) << 16) | u32::from(v))
}

fn check_hold(field: &str, h: u16) -> Result<(), ConfigError> {
    if h == 1 || h == 2 {
        return Err(invalid(
            field,
            format!("{h} s: a hold time is 0 or at least 3 s (RFC 4271)"),
        ));
    }
    Ok(())
}

impl BgpConfig {
    /// A speaker of AS `asn` with identifier `router_id`, announcing to `peers`, with the default
    /// hold time, backoff and no communities.
    pub fn new(asn: u32, router_id: Ipv4Addr, peers: Vec<BgpPeerConfig>) -> Self {
        BgpConfig {
            asn,
            router_id,
            hold_time_s: default_hold_time_s(),
            min_backoff_ms: default_min_backoff_ms(),
            max_backoff_s: default_max_backoff_s(),
            communities: Vec::new(),
            peers,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.asn == 0 || self.asn == u32::from(AS_TRANS) {
            return Err(invalid("bgp.asn", format!("{} is reserved", self.asn)));
        }
        if self.router_id.is_unspecified() {
            return Err(invalid("bgp.router_id", "0.0.0.0 is not a BGP identifier"));
        }
        check_hold("bgp.hold_time_s", self.hold_time_s)?;
        if self.min_backoff_ms == 0 || self.min_backoff_ms > 60_000 {
            return Err(invalid("bgp.min_backoff_ms", "1–60000"));
        }
        if self.max_backoff_s == 0
            || self.max_backoff_s > 3600
            || u64::from(self.max_backoff_s) * 1000 < u64::from(self.min_backoff_ms)
        {
            return Err(invalid(
                "bgp.max_backoff_s",
                "1–3600, and not below min_backoff_ms",
            ));
        }
        // 4 octets each: 64 keep an UPDATE far below BGP's 4096-octet limit.
        if self.communities.len() > MAX_COMMUNITIES {
            return Err(invalid(
                "bgp.communities",
                format!(
                    "{} listed, at most {MAX_COMMUNITIES}",
                    self.communities.len()
                ),
            ));
        }
        for (i, c) in self.communities.iter().enumerate() {
            if parse_community(c).is_none() {
                return Err(invalid(
                    format!("bgp.communities[{i}]"),
                    format!("{c:?} is not ASN:VALUE with both 0–65535"),
                ));
            }
        }
        if self.peers.is_empty() {
            return Err(invalid("bgp.peers", "no peer: nothing to announce to"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("bgp.peers[{i}]");
            check_unicast(&format!("{at}.address"), p.address)?;
            if !seen.insert((p.address, p.port)) {
                return Err(invalid(
                    format!("{at}.address"),
                    format!("{} is listed twice", p.address),
                ));
            }
            if p.asn == 0 {
                return Err(invalid(format!("{at}.asn"), "0 is reserved"));
            }
            if p.port == 0 {
                return Err(invalid(format!("{at}.port"), "0 is not a port"));
            }
            if let Some(h) = p.hold_time_s {
                check_hold(&format!("{at}.hold_time_s"), h)?;
            }
            if let Some(Password(key)) = &p.password
                && !(1..=MAX_PASSWORD_BYTES).contains(&key.len())
            {
                return Err(invalid(
                    format!("{at}.password"),
                    format!(
                        "{} bytes: a TCP MD5 key is 1–{MAX_PASSWORD_BYTES}",
                        key.len()
                    ),
                ));
            }
            if let Some(b) = &p.bfd {
                for (name, v) in [("min_tx_ms", b.min_tx_ms), ("min_rx_ms", b.min_rx_ms)] {
                    if !(10..=10_000).contains(&v) {
                        return Err(invalid(
                            format!("{at}.bfd.{name}"),
                            format!("{v}: 10–10000 ms"),
                        ));
                    }
                }
                if b.multiplier == 0 {
                    return Err(invalid(format!("{at}.bfd.multiplier"), "0: at least 1"));
                }
            }
        }
        Ok(())
    }
}
