//! Conversions between `std::net` addresses and the network-order words the maps hold.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::maps::{FAMILY_V4, FAMILY_V6};

/// An IPv4 address as the data plane reads it from a packet.
pub fn v4_be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// An IPv6 address as the data plane reads it from a packet.
pub fn v6_be(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Any address as `(family, words)`; IPv4 fills the first word only.
pub fn ip_be(a: IpAddr) -> (u8, [u32; 4]) {
    match a {
        IpAddr::V4(v4) => (FAMILY_V4, [v4_be(v4), 0, 0, 0]),
        IpAddr::V6(v6) => (FAMILY_V6, v6_be(v6)),
    }
}

/// The inverse of [`ip_be`].
pub fn ip_from_be(family: u8, words: [u32; 4]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for a in ["10.1.2.3", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = a.parse().unwrap();
            let (f, w) = ip_be(ip);
            assert_eq!(ip_from_be(f, w), Some(ip));
        }
        assert_eq!(
            v4_be("1.2.3.4".parse().unwrap()).to_ne_bytes(),
            [1, 2, 3, 4]
        );
        assert_eq!(ip_from_be(5, [0; 4]), None);
    }
}
