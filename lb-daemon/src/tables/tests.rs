use std::collections::HashMap;

use lb_common::{ENGINE_ACTIVE, ENGINE_DRAINING, ENGINE_NONE, FAMILY_V4, PROTO_TCP};

use super::*;

struct FakeLinks(HashMap<&'static str, Link>);

impl Links for FakeLinks {
    fn link(&self, name: &str) -> Result<Link, PlanError> {
        self.0
            .get(name)
            .copied()
            .ok_or_else(|| PlanError::Interface {
                name: name.into(),
                reason: "no such interface".into(),
            })
    }
}

fn links() -> FakeLinks {
    FakeLinks(HashMap::from([
        (
            "eth0",
            Link {
                ifindex: 2,
                mac: [2, 0, 0, 0, 0, 0xaa],
                mtu: 1500,
            },
        ),
        (
            "eth1",
            Link {
                ifindex: 3,
                mac: [2, 0, 0, 0, 0, 0xbb],
                mtu: 9000,
            },
        ),
    ]))
}

const BASE: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1
tunnel_source_v4 = "192.0.2.1"

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
interface = "eth1"

[[engines]]
id = 4
mac = "02:00:00:00:00:04"
mode = "tunnel"
address_v4 = "192.0.2.4"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]
"#;

fn plan(text: &str) -> Tables {
    Tables::plan(&Config::parse(text).unwrap(), &links()).unwrap()
}

fn vip_key(port: u16) -> VipKey {
    VipKey {
        addr_be: [v4_be("10.100.0.10".parse().unwrap()), 0, 0, 0],
        port_be: port.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

#[test]
fn engines_get_mode_egress_and_macs() {
    let t = plan(BASE);
    let local = t.engines[&1];
    assert_eq!(
        (local.mode, local.state),
        (ENGINE_MODE_LOCAL, ENGINE_ACTIVE)
    );
    let l2 = t.engines[&2];
    assert_eq!(
        (l2.mode, l2.dst_mac, l2.src_mac, l2.ifindex),
        (ENGINE_MODE_L2, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 0xaa], 0)
    );
    let other_if = t.engines[&3];
    assert_eq!(
        (other_if.src_mac, other_if.ifindex),
        ([2, 0, 0, 0, 0, 0xbb], 3)
    );
    assert_eq!(t.devmap, BTreeMap::from([(3, 3)]));
    let tun = t.engines[&4];
    assert_eq!(
        (tun.mode, tun.addr_v4_be),
        (ENGINE_MODE_TUNNEL, v4_be("192.0.2.4".parse().unwrap()))
    );
    // Only tunnel engines carry a path MTU, by default their egress interface's.
    assert_eq!((tun.mtu, l2.mtu, other_if.mtu, local.mtu), (1500, 0, 0, 0));
}

#[test]
fn tunnel_path_mtu_from_config_or_interface() {
    let t = plan(&BASE.replace(
        "address_v4 = \"192.0.2.4\"",
        "address_v4 = \"192.0.2.4\"\nmtu = 1400",
    ));
    assert_eq!(t.engines[&4].mtu, 1400);
    let t = plan(&BASE.replace(
        "address_v4 = \"192.0.2.4\"",
        "address_v4 = \"192.0.2.4\"\ninterface = \"eth1\"",
    ));
    assert_eq!(t.engines[&4].mtu, 9000, "the egress interface's MTU");
    let mut small = links();
    small.0.get_mut("eth0").unwrap().mtu = 500;
    let err = Tables::plan(&Config::parse(BASE).unwrap(), &small).unwrap_err();
    assert_eq!(
        err.to_string(),
        "engines[id=4]: tunnel path MTU 500 (from interface eth0) is below 576: set engines[].mtu, or raise the interface's MTU"
    );
    assert_eq!(
        t.globals.tunnel_src_v4_be,
        v4_be("192.0.2.1".parse().unwrap())
    );
}

#[test]
fn virtual_service_maps_to_vip_entry_and_full_ring() {
    let t = plan(BASE);
    assert_eq!(t.vips[&vip_key(80)], 0);
    assert_eq!(
        t.vs[&0],
        VsEntry {
            vip: vip_key(80),
            flags: VS_F_PRIMARY,
            persist_timeout_s: 0,
            // Engines 1, 2 and 3.
            ring_engines: [0b1110, 0, 0, 0, 0, 0, 0, 0],
        }
    );
    // Port 80 is bit 16 of TCP word 1.
    assert_eq!(t.vip_ports, BTreeMap::from([(1, 1 << 16)]));
    assert_eq!(
        t.vip_addrs[&VipKey {
            port_be: 0,
            proto: 0,
            ..vip_key(80)
        }],
        1
    );
    let ring = &t.rings[&0];
    assert_eq!(ring.len(), RING_SIZE as usize);
    assert!(ring.iter().all(|e| [1, 2, 3].contains(e)));
}

#[test]
fn secondary_and_persistent_flags() {
    let t = plan(&BASE.replace("primary = 1", "primary = 2\npersistence_timeout_s = 300"));
    let vs = t.vs[&0];
    assert_eq!(vs.flags, VS_F_PERSIST);
    assert_eq!(vs.persist_timeout_s, 300);
}

#[test]
fn draining_and_down_engines_leave_the_ring_but_keep_their_entry() {
    let text = BASE.replace(
        "id = 2\nmac = \"02:00:00:00:00:02\"",
        "id = 2\nmac = \"02:00:00:00:00:02\"\nstate = \"draining\"",
    );
    let t = plan(&text);
    assert_eq!(t.engines[&2].state, ENGINE_DRAINING);
    assert!(!t.rings[&0].contains(&2));
    assert!(t.rings[&0].contains(&1) && t.rings[&0].contains(&3));
    let vs = t.vs[&0];
    assert!(vs.rings(1) && !vs.rings(2) && vs.rings(3) && !vs.rings(4));
}

#[test]
fn unknown_interface_is_an_error() {
    let text = BASE.replace("interface = \"eth1\"", "interface = \"eth9\"");
    let err = Tables::plan(&Config::parse(&text).unwrap(), &links()).unwrap_err();
    assert_eq!(err.to_string(), "interface eth9: no such interface");
}

#[test]
fn same_config_changes_nothing() {
    let t = plan(BASE);
    assert!(Changes::between(Some(&t), &t).is_empty());
}

#[test]
fn first_apply_writes_everything() {
    let t = plan(BASE);
    let c = Changes::between(None, &t);
    assert_eq!(c.ring_set.len(), RING_SIZE as usize);
    // Engines 1-4 are active: all enabled before the ring is written.
    assert_eq!(c.engines_enable.len(), 4);
    assert!(c.engines_disable.is_empty());
    assert_eq!((c.vips_set.len(), c.vs_set.len()), (1, 1));
    assert_eq!(c.vip_ports_grow, vec![(1, 1 << 16)]);
    assert!(c.globals.is_some());
}

#[test]
fn adding_an_engine_writes_only_the_slots_that_move() {
    let before = plan(BASE);
    let after = plan(&BASE.replace("{ id = 3 } ]", "{ id = 3 }, { id = 4 } ]"));
    let c = Changes::between(Some(&before), &after);
    assert!(c.engines_enable.is_empty() && c.vips_set.is_empty() && c.globals.is_none());
    let moved = c.ring_set.len();
    // A fourth engine takes a quarter of the ring; Maglev moves a little more than that.
    assert!((16_000..=18_000).contains(&moved), "moved {moved}");
    assert!(c.ring_set.iter().filter(|(_, _, e)| *e == 4).count() >= 16_000);
}

#[test]
fn removing_a_virtual_service_removes_vip_then_clears_ring() {
    let before = plan(&BASE.replace("[[virtual_services]]", "[[virtual_services]]\nid = 1\nname = \"web2\"\nvip = \"10.100.0.10\"\nport = 81\nprotocol = \"tcp\"\nprimary = 1\nengines = [ { id = 2 } ]\n\n[[virtual_services]]"));
    assert_eq!(
        before.vip_addrs[&VipKey {
            port_be: 0,
            proto: 0,
            ..vip_key(80)
        }],
        2
    );
    let after = plan(BASE);
    let c = Changes::between(Some(&before), &after);
    assert_eq!(c.vips_remove, vec![vip_key(81)]);
    assert_eq!(c.rings_clear, vec![1]);
    assert_eq!(c.vs_clear, vec![1]);
    // Port 81 (bit 17 of word 1) goes only after its VIP is removed; port 80 stays.
    assert!(c.vip_ports_grow.is_empty());
    assert_eq!(c.vip_ports_shrink, vec![(1, 1 << 16)]);
    // The address still carries one service: updated, not removed.
    assert!(c.vip_addrs_remove.is_empty());
    assert_eq!(
        c.vip_addrs_set,
        vec![(
            VipKey {
                port_be: 0,
                proto: 0,
                ..vip_key(80)
            },
            1
        )]
    );
}

#[test]
fn zero_weight_engine_takes_no_slots() {
    let t = plan(&BASE.replace("{ id = 3 } ]", "{ id = 3, weight = 0 } ]"));
    assert!(!t.rings[&0].contains(&3));
    assert!(!t.rings[&0].contains(&ENGINE_NONE));
}

#[test]
fn draining_an_engine_writes_the_ring_before_the_engine() {
    let before = plan(BASE);
    let after = plan(&BASE.replace(
        "id = 2\nmac = \"02:00:00:00:00:02\"",
        "id = 2\nmac = \"02:00:00:00:00:02\"\nstate = \"draining\"",
    ));
    let c = Changes::between(Some(&before), &after);
    assert!(c.engines_enable.is_empty());
    assert_eq!(
        c.engines_disable
            .iter()
            .map(|(id, e)| (*id, e.state))
            .collect::<Vec<_>>(),
        vec![(2, ENGINE_DRAINING)]
    );
    // Every slot engine 2 had moves to engine 1 or 3.
    assert!(!c.ring_set.is_empty() && c.ring_set.iter().all(|(_, _, e)| *e == 1 || *e == 3));
    // And back: the engine is enabled (before) the ring names it again.
    let c = Changes::between(Some(&after), &before);
    assert_eq!(c.engines_enable.len(), 1);
    assert!(c.engines_disable.is_empty());
}

/// The order the data plane writes in: what an entry points at before it, removals last.
#[test]
fn steps_come_in_the_safe_order() {
    let with_dns = format!(
        "{BASE}
[[virtual_services]]
id = 1
name = \"dns\"
vip = \"10.100.0.53\"
port = 53
protocol = \"udp\"
primary = 1
engines = [ {{ id = 1 }}, {{ id = 2 }} ]
"
    );
    let base = plan(BASE);
    let grown = plan(&with_dns);
    let order = |c: &Changes| -> Vec<(&'static str, &'static str)> {
        c.steps().iter().map(Write::what).collect()
    };
    let fresh = Changes::between(None, &base);
    assert_eq!(
        order(&fresh),
        [
            ("GLOBALS", "set"),
            ("ENGINES", "set (active or this host)"),
            ("DEVMAP", "set"),
            ("RING", "set slots"),
            ("VS", "set"),
            ("VIP_PORTS", "grow"),
            ("VIP_ADDRS", "set"),
            ("VIPS", "set"),
        ]
    );
    let add = Changes::between(Some(&base), &grown);
    assert_eq!(
        order(&add),
        [
            ("RING", "set slots"),
            ("VS", "set"),
            ("VIP_PORTS", "grow"),
            ("VIP_ADDRS", "set"),
            ("VIPS", "set"),
        ]
    );
    let ring = add.steps()[0];
    assert_eq!(ring.len(), RING_SIZE as usize, "one full new ring");
    assert_eq!(ring.to_string(), "RING       set slots: 65537 entries");
    let remove = Changes::between(Some(&grown), &base);
    assert_eq!(
        order(&remove),
        [
            ("VIPS", "remove"),
            ("VIP_ADDRS", "remove"),
            ("VIP_PORTS", "shrink"),
            ("VS", "clear"),
            ("RING", "clear rings"),
        ]
    );
    assert!(
        Changes::between(Some(&base), &plan(BASE))
            .steps()
            .is_empty()
    );
}

/// `BASE` with its service scaled by BGP (primary 2, so that only the BGP rule makes engine 1 steer)
/// and `[peers]`.
fn bgp_scaled(engine_1_state: &str) -> String {
    format!(
        "{}bgp = {{ med = 10 }}\n\n[peers]\nkey = \"00112233445566778899aabbccddeeff\"\n\n\
         [bgp]\nasn = 65001\nrouter_id = \"192.0.2.1\"\n[[bgp.peers]]\naddress = \"192.0.2.254\"\nasn = 65000\n",
        BASE.replace("primary = 1", "primary = 2").replace(
            "[[engines]]\nid = 1\n",
            &format!("[[engines]]\nid = 1\nstate = \"{engine_1_state}\"\n")
        )
    )
}

#[test]
fn a_service_scaled_by_bgp_is_steered_by_each_engine_and_keeps_new_flows_here() {
    let t = plan(&bgp_scaled("active"));
    let vs = t.vs[&0];
    assert_eq!(
        vs.flags,
        VS_F_PRIMARY | VS_F_ASK_OWNER,
        "steers and asks about unknown flows"
    );
    assert!(
        t.rings[&0].iter().all(|&id| id == 1),
        "new flows stay on this engine"
    );
    assert!(vs.rings(1) && !vs.rings(2) && !vs.rings(3));
    // The other engines stay in the engine table: flows the router moved here go to their owner.
    assert_eq!(t.engines[&2].state, ENGINE_ACTIVE);
    // Draining, this engine hands new flows to the others while the router still sends them.
    let t = plan(&bgp_scaled("draining"));
    assert!(!t.rings[&0].contains(&1));
    assert!(t.rings[&0].contains(&2) && t.rings[&0].contains(&3));
}
