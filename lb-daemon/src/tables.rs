//! What the data plane's maps should hold for a configuration, computed without touching the
//! kernel, and what changes between two such states. The daemon applies the difference, so a
//! reload writes only what changed — in particular only the ring slots that moved.

use std::collections::BTreeMap;

use lb_common::{
    ENGINE_ACTIVE, ENGINE_MODE_L2, ENGINE_MODE_LOCAL, ENGINE_MODE_TUNNEL, ENGINE_NONE, Engine,
    Globals, RING_SIZE, VS_F_ASK_OWNER, VS_F_PERSIST, VS_F_PRIMARY, VS_F_REFUSE_NEW, VipKey,
    VsEntry,
    addr::{ip_be, v4_be, v6_be},
    maglev::{self, Member},
    vip_port_bit,
};

use crate::config::{Config, EngineMode, EngineState, MIN_TUNNEL_MTU_V4, MIN_TUNNEL_MTU_V6};

/// What the daemon needs to know about a local interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// Looking up local interfaces by name (the kernel in the daemon; a table in tests).
pub trait Links {
    fn link(&self, name: &str) -> Result<Link, PlanError>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error(
        "engines[id={id}]: tunnel path MTU {mtu} (from interface {interface}) is below {min}: set engines[].mtu, or raise the interface's MTU"
    )]
    TunnelMtu {
        id: u32,
        mtu: u32,
        interface: String,
        min: u32,
    },
}

/// The full desired content of the control maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub globals: Globals,
    pub engines: BTreeMap<u32, Engine>,
    /// Engine id → egress ifindex, for engines reached through another interface.
    pub devmap: BTreeMap<u32, u32>,
    /// (VIP, port, protocol) → virtual service id.
    pub vips: BTreeMap<VipKey, u32>,
    /// Virtual service id → entry of the VS array.
    pub vs: BTreeMap<u32, VsEntry>,
    /// Non-zero words of the VIP port bitmap.
    pub vip_ports: BTreeMap<u32, u64>,
    /// VIP addresses (port 0, protocol 0) → number of virtual services on them.
    pub vip_addrs: BTreeMap<VipKey, u32>,
    /// Virtual service id → its full Maglev ring.
    pub rings: BTreeMap<u32, Vec<u32>>,
}

/// The path MTU of tunnel engine `e`: configured, or its egress interface's (`link_mtu`), and no
/// smaller than its address families need.
fn tunnel_mtu(
    e: &crate::config::EngineConfig,
    link_mtu: u32,
    main_interface: &str,
) -> Result<u16, PlanError> {
    let mtu = e.mtu.map_or(link_mtu, u32::from);
    let floor = if e.address_v6.is_some() {
        MIN_TUNNEL_MTU_V6
    } else {
        MIN_TUNNEL_MTU_V4
    };
    if mtu < u32::from(floor) {
        return Err(PlanError::TunnelMtu {
            id: e.id,
            mtu,
            interface: e
                .interface
                .clone()
                .unwrap_or_else(|| main_interface.to_owned()),
            min: u32::from(floor),
        });
    }
    Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
}

impl Tables {
    /// Plans the maps for a validated `config`.
    #[allow(clippy::too_many_lines)]
    pub fn plan(config: &Config, links: &dyn Links) -> Result<Tables, PlanError> {
        let d = &config.daemon;
        let main = links.link(&d.interface)?;
        let mut t = Tables {
            globals: Globals {
                tunnel_src_v4_be: d.tunnel_source_v4.map_or(0, v4_be),
                peer_port_be: config.peers.as_ref().map_or(0, |p| p.port.to_be()),
                _pad: 0,
                tunnel_src_v6_be: d.tunnel_source_v6.map_or([0; 4], v6_be),
                peer_addr_v4_be: config
                    .engine(d.engine_id)
                    .and_then(|e| e.address_v4)
                    .map_or(0, v4_be),
            },
            ..Tables::default()
        };
        for e in &config.engines {
            let (egress, ifindex) = match &e.interface {
                Some(name) if *name != d.interface => {
                    let l = links.link(name)?;
                    (l, l.ifindex)
                }
                _ => (main, 0),
            };
            let mode = if e.id == d.engine_id {
                ENGINE_MODE_LOCAL
            } else if e.mode == EngineMode::Tunnel {
                ENGINE_MODE_TUNNEL
            } else {
                ENGINE_MODE_L2
            };
            let mtu = if mode == ENGINE_MODE_TUNNEL {
                tunnel_mtu(e, egress.mtu, &d.interface)?
            } else {
                0
            };
            if ifindex != 0 && mode != ENGINE_MODE_LOCAL {
                t.devmap.insert(e.id, ifindex);
            }
            t.engines.insert(
                e.id,
                Engine {
                    dst_mac: e.mac.map_or([0; 6], |m| m.0),
                    src_mac: egress.mac,
                    state: e.state.code(),
                    mode,
                    mtu,
                    ifindex,
                    addr_v4_be: e.address_v4.map_or(0, v4_be),
                    addr_v6_be: e.address_v6.map_or([0; 4], v6_be),
                },
            );
        }
        for vs in &config.virtual_services {
            let (family, addr_be) = ip_be(vs.vip);
            let mut flags = 0;
            if vs.steers_here(d.engine_id) {
                flags |= VS_F_PRIMARY;
            }
            if vs.persistence_timeout_s > 0 {
                flags |= VS_F_PERSIST;
            }
            if vs.draining {
                flags |= VS_F_REFUSE_NEW;
            }
            if vs.steers_here(d.engine_id) && config.peers.is_some() && vs.engines.len() > 1 {
                flags |= VS_F_ASK_OWNER;
            }
            let key = VipKey {
                addr_be,
                port_be: vs.port.to_be(),
                proto: vs.protocol.number(),
                family,
            };
            t.vips.insert(key, vs.id);
            let (word, bit) = vip_port_bit(key.proto, vs.port).expect("TCP or UDP");
            *t.vip_ports.entry(word).or_default() |= bit;
            *t.vip_addrs
                .entry(VipKey {
                    port_be: 0,
                    proto: 0,
                    ..key
                })
                .or_default() += 1;
            // Only active engines take new flows; draining and down ones keep (or lose) theirs
            // through the connection table.
            let mut members: Vec<Member> = vs
                .engines
                .iter()
                .filter(|m| {
                    config
                        .engine(m.id)
                        .is_some_and(|e| e.state == EngineState::Active)
                })
                .map(|m| Member {
                    engine_id: m.id,
                    weight: m.weight,
                })
                .collect();
            // Scaled by BGP: the router already chose this engine for the flow, so new flows stay
            // here; only while this engine takes none (draining, no backend up) do they go on to
            // the others. Flows that the router moves here mid-connection find their owner by the
            // owner queries, then the connection table.
            if vs.by_bgp()
                && members
                    .iter()
                    .any(|m| m.engine_id == d.engine_id && m.weight > 0)
            {
                members.retain(|m| m.engine_id == d.engine_id);
            }
            let ring = maglev::build(&members, RING_SIZE);
            let mut entry = VsEntry {
                vip: key,
                flags,
                persist_timeout_s: vs.persistence_timeout_s,
                ring_engines: Default::default(),
            };
            for &id in ring.iter().filter(|&&id| id != ENGINE_NONE) {
                entry.set_ring_engine(id);
            }
            t.vs.insert(vs.id, entry);
            t.rings.insert(vs.id, ring);
        }
        Ok(t)
    }
}

/// Writes that turn one [`Tables`] into another. [`Changes::steps`] orders them so that every
/// intermediate state is safe: what an entry points at is written before it and removed after it;
/// an engine becomes usable before a ring names it and unusable after rings stop naming it.
/// The data plane applies exactly [`Changes::steps`], in that order; `lb-daemon --check
/// --show-writes` prints them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub globals: Option<Globals>,
    /// Engines whose new state is active (or that are this host), and all new devmap entries.
    pub engines_enable: Vec<(u32, Engine)>,
    pub devmap_set: Vec<(u32, u32)>,
    /// Ring slot writes: (virtual service, slot, engine).
    pub ring_set: Vec<(u32, u32, u32)>,
    /// Engines whose new state is draining or down.
    pub engines_disable: Vec<(u32, Engine)>,
    pub vs_set: Vec<(u32, VsEntry)>,
    /// Port bitmap words grown to old | new before VIPs are added.
    pub vip_ports_grow: Vec<(u32, u64)>,
    pub vip_addrs_set: Vec<(VipKey, u32)>,
    pub vips_set: Vec<(VipKey, u32)>,
    // Removals, applied after everything above.
    pub vips_remove: Vec<VipKey>,
    pub vip_addrs_remove: Vec<VipKey>,
    /// Port bitmap words shrunk to their final value once VIPs are gone.
    pub vip_ports_shrink: Vec<(u32, u64)>,
    /// VS array entries of removed virtual services, cleared.
    pub vs_clear: Vec<u32>,
    /// Rings of removed virtual services, reset to empty.
    pub rings_clear: Vec<u32>,
    pub devmap_remove: Vec<u32>,
    pub engines_remove: Vec<u32>,
}

impl Changes {
    /// The writes from `old` (`None`: empty maps) to `new`.
    pub fn between(old: Option<&Tables>, new: &Tables) -> Changes {
        let empty = Tables::default();
        let old = old.unwrap_or(&empty);
        let mut c = Changes::default();
        if old.globals != new.globals || old.engines.is_empty() {
            c.globals = Some(new.globals);
        }
        let (enable, disable): (Vec<_>, Vec<_>) = changed(&old.engines, &new.engines)
            .into_iter()
            .partition(|(_, e)| e.state == ENGINE_ACTIVE || e.mode == ENGINE_MODE_LOCAL);
        c.engines_enable = enable;
        c.engines_disable = disable;
        c.devmap_set = changed(&old.devmap, &new.devmap);
        for (vs, ring) in &new.rings {
            match old.rings.get(vs) {
                Some(before) => c.ring_set.extend(
                    maglev::diff(before, ring)
                        .into_iter()
                        .map(|(s, e)| (*vs, s, e)),
                ),
                None => c
                    .ring_set
                    .extend(ring.iter().enumerate().map(|(s, e)| (*vs, slot(s), *e))),
            }
        }
        c.vs_set = changed(&old.vs, &new.vs);
        let words: std::collections::BTreeSet<u32> = old
            .vip_ports
            .keys()
            .chain(new.vip_ports.keys())
            .copied()
            .collect();
        for w in words {
            let (before, after) = (
                old.vip_ports.get(&w).copied().unwrap_or(0),
                new.vip_ports.get(&w).copied().unwrap_or(0),
            );
            if before | after != before {
                c.vip_ports_grow.push((w, before | after));
            }
            if after != before | after {
                c.vip_ports_shrink.push((w, after));
            }
        }
        c.vip_addrs_set = changed(&old.vip_addrs, &new.vip_addrs);
        c.vips_set = changed(&old.vips, &new.vips);
        c.vips_remove = removed(&old.vips, &new.vips);
        c.vip_addrs_remove = removed(&old.vip_addrs, &new.vip_addrs);
        c.vs_clear = removed(&old.vs, &new.vs);
        c.rings_clear = removed(&old.rings, &new.rings);
        c.devmap_remove = removed(&old.devmap, &new.devmap);
        c.engines_remove = removed(&old.engines, &new.engines);
        c
    }

    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// The writes in the order they must be applied (batches that are empty are left out).
    pub fn steps(&self) -> Vec<Write<'_>> {
        let steps = [
            self.globals.map(Write::Globals),
            Some(Write::EnginesEnable(&self.engines_enable)),
            Some(Write::DevmapSet(&self.devmap_set)),
            Some(Write::RingSlots(&self.ring_set)),
            Some(Write::EnginesDisable(&self.engines_disable)),
            Some(Write::VsSet(&self.vs_set)),
            Some(Write::VipPortsGrow(&self.vip_ports_grow)),
            Some(Write::VipAddrsSet(&self.vip_addrs_set)),
            Some(Write::VipsSet(&self.vips_set)),
            Some(Write::VipsRemove(&self.vips_remove)),
            Some(Write::VipAddrsRemove(&self.vip_addrs_remove)),
            Some(Write::VipPortsShrink(&self.vip_ports_shrink)),
            Some(Write::VsClear(&self.vs_clear)),
            Some(Write::RingsClear(&self.rings_clear)),
            Some(Write::DevmapRemove(&self.devmap_remove)),
            Some(Write::EnginesRemove(&self.engines_remove)),
        ];
        steps
            .into_iter()
            .flatten()
            .filter(|w| !w.is_empty())
            .collect()
    }
}

/// One batch of map writes of [`Changes::steps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<'a> {
    Globals(Globals),
    EnginesEnable(&'a [(u32, Engine)]),
    DevmapSet(&'a [(u32, u32)]),
    /// (virtual service, slot, engine).
    RingSlots(&'a [(u32, u32, u32)]),
    EnginesDisable(&'a [(u32, Engine)]),
    VsSet(&'a [(u32, VsEntry)]),
    VipPortsGrow(&'a [(u32, u64)]),
    VipAddrsSet(&'a [(VipKey, u32)]),
    VipsSet(&'a [(VipKey, u32)]),
    VipsRemove(&'a [VipKey]),
    VipAddrsRemove(&'a [VipKey]),
    VipPortsShrink(&'a [(u32, u64)]),
    VsClear(&'a [u32]),
    /// Every slot of these rings reset to `ENGINE_NONE`.
    RingsClear(&'a [u32]),
    DevmapRemove(&'a [u32]),
    EnginesRemove(&'a [u32]),
}

impl Write<'_> {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries written (ring slots for the ring batches).
    pub fn len(&self) -> usize {
        match self {
            Write::Globals(_) => 1,
            Write::EnginesEnable(w) | Write::EnginesDisable(w) => w.len(),
            Write::DevmapSet(w) => w.len(),
            Write::RingSlots(w) => w.len(),
            Write::VsSet(w) => w.len(),
            Write::VipPortsGrow(w) | Write::VipPortsShrink(w) => w.len(),
            Write::VipAddrsSet(w) | Write::VipsSet(w) => w.len(),
            Write::VipsRemove(w) | Write::VipAddrsRemove(w) => w.len(),
            Write::RingsClear(w) => w.len() * RING_SIZE as usize,
            Write::VsClear(w) | Write::DevmapRemove(w) | Write::EnginesRemove(w) => w.len(),
        }
    }

    /// The map written and what the batch does, for logs and `--show-writes`.
    pub fn what(&self) -> (&'static str, &'static str) {
        match self {
            Write::Globals(_) => ("GLOBALS", "set"),
            Write::EnginesEnable(_) => ("ENGINES", "set (active or this host)"),
            Write::DevmapSet(_) => ("DEVMAP", "set"),
            Write::RingSlots(_) => ("RING", "set slots"),
            Write::EnginesDisable(_) => ("ENGINES", "set (draining or down)"),
            Write::VsSet(_) => ("VS", "set"),
            Write::VipPortsGrow(_) => ("VIP_PORTS", "grow"),
            Write::VipAddrsSet(_) => ("VIP_ADDRS", "set"),
            Write::VipsSet(_) => ("VIPS", "set"),
            Write::VipsRemove(_) => ("VIPS", "remove"),
            Write::VipAddrsRemove(_) => ("VIP_ADDRS", "remove"),
            Write::VipPortsShrink(_) => ("VIP_PORTS", "shrink"),
            Write::VsClear(_) => ("VS", "clear"),
            Write::RingsClear(_) => ("RING", "clear rings"),
            Write::DevmapRemove(_) => ("DEVMAP", "remove"),
            Write::EnginesRemove(_) => ("ENGINES", "remove"),
        }
    }
}

impl std::fmt::Display for Write<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (map, what) = self.what();
        write!(f, "{map:<10} {what}: {} entries", self.len())
    }
}

fn slot(s: usize) -> u32 {
    u32::try_from(s).expect("ring slot fits u32")
}

fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    new.iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect()
}

fn removed<K: Ord + Copy, V>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Vec<K> {
    old.keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests;
