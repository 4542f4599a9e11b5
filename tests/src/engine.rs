//! Engine and client hosts.
//!
//! An engine is a namespace on the lab segment with nginx on `VIP:port` answering the engine's name.
//! The primary has the VIP (/32) on its segment interface, so it answers ARP for it and receives
//! all the VIP's traffic. A secondary has the VIP on `lo` with `arp_ignore=1` / `arp_announce=2`:
//! it accepts packets for the VIP that the primary steered to its MAC, but never answers ARP for it
//! and never uses it as the source of its own ARP requests.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;

use crate::lab::{Iface, Lab, Ns};
use crate::nginx::Nginx;

/// Where an engine holds the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// VIP /32 on the segment interface: answers ARP for it.
    Primary,
    /// VIP /32 on `lo`, ARP for it ignored.
    Secondary,
}

/// One engine host.
#[derive(Debug)]
pub struct EngineHost {
    /// Also the nginx answer and the namespace role (`se1`, ...).
    pub name: String,
    pub id: u8,
    pub ns: Ns,
    pub iface: Iface,
    pub vip: Ipv4Addr,
    pub role: Role,
    pub nginx: Nginx,
}

/// Sets the ARP sysctls a secondary needs (harmless on a primary: it answers ARP for addresses on
/// the interface the request came in on, which the VIP on its segment interface is).
pub fn arp_sysctls(lab: &Lab, ns: &Ns, ifname: &str) -> Result<()> {
    for dev in ["all", ifname] {
        lab.sysctl(ns, &format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
        lab.sysctl(ns, &format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
    }
    Ok(())
}

/// Creates namespace `name`, attaches it to the segment at `cidr` (`10.77.0.11/24`), places the VIP
/// for `role` and starts nginx on `VIP:port` answering `name`.
pub fn setup_engine(
    lab: &Lab,
    name: &str,
    id: u8,
    cidr: &str,
    vip: Ipv4Addr,
    port: u16,
    role: Role,
) -> Result<EngineHost> {
    let (ns, iface) = setup_engine_ns(lab, name, cidr, vip, role)?;
    let nginx = Nginx::start(lab, &ns, name, &[SocketAddr::from((vip, port))])?;
    Ok(EngineHost {
        name: name.to_owned(),
        id,
        ns,
        iface,
        vip,
        role,
        nginx,
    })
}

/// The namespace part of [`setup_engine`]: creates namespace `name`, attaches it to the segment at
/// `cidr`, sets the ARP sysctls and places the VIP for `role`, but starts nothing on the VIP (for
/// engines whose `lb-daemon` proxy listens there).
pub fn setup_engine_ns(
    lab: &Lab,
    name: &str,
    cidr: &str,
    vip: Ipv4Addr,
    role: Role,
) -> Result<(Ns, Iface)> {
    let ns = lab.add_ns(name)?;
    let iface = lab.attach(&ns, "eth0", cidr)?;
    arp_sysctls(lab, &ns, &iface.name)?;
    place_vip(lab, &ns, &iface.name, vip, role, None)?;
    Ok((ns, iface))
}

impl EngineHost {
    /// Moves the VIP for a new role (primary ↔ secondary). nginx keeps running: the address stays
    /// local throughout (added on the new device before removal from the old one).
    pub fn set_role(&mut self, lab: &Lab, role: Role) -> Result<()> {
        if role != self.role {
            place_vip(
                lab,
                &self.ns,
                &self.iface.name,
                self.vip,
                role,
                Some(self.role),
            )?;
            self.role = role;
        }
        Ok(())
    }
}

fn place_vip(
    lab: &Lab,
    ns: &Ns,
    ifname: &str,
    vip: Ipv4Addr,
    role: Role,
    old: Option<Role>,
) -> Result<()> {
    let dev = |r: Role| if r == Role::Primary { ifname } else { "lo" };
    let vip32 = format!("{vip}/32");
    lab.ip(ns, &["addr", "add", &vip32, "dev", dev(role)])?;
    if let Some(old) = old {
        lab.ip(ns, &["addr", "del", &vip32, "dev", dev(old)])?;
    }
    Ok(())
}

/// The lab's VIP network: clients reach it on-link over the segment (ARP for the VIP itself,
/// which only the primary answers).
pub const VIP_NET: &str = "10.78.0.0/24";

/// Sets the ephemeral port range of `ns` (`ip_local_port_range`). Phases of a test that must see
/// only new flows give each phase its own range: a reused 4-tuple matches the data plane's
/// connection entry from an earlier phase and goes to that phase's engine.
pub fn set_port_range(lab: &Lab, ns: &Ns, lo: u16, hi: u16) -> Result<()> {
    lab.sysctl(ns, "net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))
}

/// A client host.
#[derive(Debug)]
pub struct ClientHost {
    pub ns: Ns,
    pub iface: Iface,
}

/// Creates client namespace `name` on the segment at `cidr`, with the sysctls short-connection load
/// needs (`tcp_tw_reuse`, a wide ephemeral port range) and an on-link route to [`VIP_NET`].
pub fn setup_client(lab: &Lab, name: &str, cidr: &str) -> Result<ClientHost> {
    let ns = lab.add_ns(name)?;
    let iface = lab.attach(&ns, "eth0", cidr)?;
    lab.ip(&ns, &["route", "add", VIP_NET, "dev", &iface.name])?;
    lab.sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
    lab.sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
    Ok(ClientHost { ns, iface })
}
