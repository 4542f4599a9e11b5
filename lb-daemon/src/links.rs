//! Local interfaces as the kernel reports them (index, MAC and MTU).

use nix::{ifaddrs::getifaddrs, net::if_::if_nametoindex};

use crate::tables::{Link, Links, PlanError};

/// Reads interfaces from the kernel, in the daemon's network namespace.
pub struct SystemLinks;

impl Links for SystemLinks {
    fn link(&self, name: &str) -> Result<Link, PlanError> {
        let err = |reason: String| PlanError::Interface {
            name: name.into(),
            reason,
        };
        let ifindex = if_nametoindex(name).map_err(|e| err(format!("no such interface ({e})")))?;
        let mac = getifaddrs()
            .map_err(|e| err(format!("listing interfaces: {e}")))?
            .filter(|a| a.interface_name == name)
            .find_map(|a| {
                a.address
                    .and_then(|s| s.as_link_addr().and_then(nix::sys::socket::LinkAddr::addr))
            })
            .ok_or_else(|| err("has no link-layer address".into()))?;
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
            .map_err(|e| err(format!("reading its MTU: {e}")))?
            .trim()
            .parse()
            .map_err(|e| err(format!("its MTU: {e}")))?;
        Ok(Link { ifindex, mac, mtu })
    }
}
