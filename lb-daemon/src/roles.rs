//! Who is the primary of each virtual service, decided by every engine the same way from what it
//! hears, so that it works with the controller down.
//!
//! Inputs: the desired state (per virtual service: its primary, its epoch, its succession —
//! [`VirtualServiceConfig::succession`]), the peers' [`View`] (whose daemon replies, whose data
//! plane echoes, who claims which service at which epoch), and this engine's own claims.
//!
//! The rule, per virtual service:
//! 1. The *current* primary is the highest claim among the desired primary (at the desired epoch),
//!    this engine's own claim, and the claims of every peer that is not gone. Equal epochs (two
//!    sides of a healed partition promoted at once) go to the engine earlier in the succession.
//! 2. If the current primary is this engine, it is primary at that epoch.
//! 3. If the current primary answers (its daemon, or only its data plane: a crashed daemon's data
//!    plane still steers, so it is **not** replaced), this engine follows it.
//! 4. If it is gone (neither answers for `down_after` intervals), the first engine of the
//!    succession whose daemon answers takes over at the next epoch. If that is this engine, it
//!    promotes itself.
//!
//! So an old primary that comes back hears a higher epoch and rejoins as a secondary, and after a
//! partition heals the side with the higher epoch keeps the role. A freshly started engine (no data
//! plane steering before it) claims nothing for a hold time (a few probe intervals), so that it
//! hears the current claims before it could take a role it lost while away.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, VirtualServiceConfig},
    peers::{Claim, View},
};

/// A change of role this engine sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This engine took over the primary role (a promotion, or a role it was given).
    Promoted { vs_id: u32, epoch: u64 },
    /// This engine is no longer primary: `to` is, at `epoch`.
    Demoted { vs_id: u32, to: u32, epoch: u64 },
    /// Another engine is now primary (this one follows it).
    Followed {
        vs_id: u32,
        primary: u32,
        epoch: u64,
    },
}

/// The primary of a virtual service as this engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    pub primary: u32,
    pub epoch: u64,
}

/// The roles this engine took, saved so a restarted daemon carries on with them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    /// Virtual service id → epoch this engine is primary at.
    primary_of: BTreeMap<u32, u64>,
}

pub struct Roles {
    self_id: u32,
    file: Option<PathBuf>,
    /// Virtual service id → the epoch this engine claims it at.
    mine: BTreeMap<u32, u64>,
    /// Virtual service id → the primary this engine follows or is.
    current: BTreeMap<u32, Role>,
    holding: bool,
}

impl Roles {
    /// `file`: where the claims are saved (and loaded from, if `adopted`: the data plane was
    /// steering before this daemon started). A fresh start (`adopted` false) holds.
    pub fn new(self_id: u32, file: Option<PathBuf>, adopted: bool) -> Roles {
        let mine = match (&file, adopted) {
            (Some(f), true) => load(f).primary_of,
            _ => BTreeMap::new(),
        };
        Roles {
            self_id,
            file,
            mine,
            current: BTreeMap::new(),
            holding: !adopted,
        }
    }

    /// Ends the start hold.
    pub fn end_hold(&mut self) {
        self.holding = false;
    }

    pub fn holding(&self) -> bool {
        self.holding
    }

    /// What this engine claims (carried in its probes).
    pub fn claims(&self) -> Vec<Claim> {
        self.mine
            .iter()
            .map(|(vs_id, epoch)| Claim {
                vs_id: *vs_id,
                epoch: *epoch,
            })
            .collect()
    }

    pub fn role(&self, vs_id: u32) -> Option<Role> {
        self.current.get(&vs_id).copied()
    }

    /// Whether this engine steers `vs_id` now.
    pub fn is_primary(&self, vs_id: u32) -> bool {
        self.mine.contains_key(&vs_id)
    }

    /// Each virtual service's primary as decided (`u32::MAX`, no engine, where this engine would
    /// be but does not claim it: held at start).
    pub fn primaries(&self, config: &Config) -> BTreeMap<u32, u32> {
        config
            .virtual_services
            .iter()
            .filter(|vs| !vs.by_bgp())
            .map(|vs| {
                let primary = if self.mine.contains_key(&vs.id) {
                    self.self_id
                } else {
                    match self.current.get(&vs.id) {
                        Some(r) => r.primary,
                        None => vs.primary,
                    }
                };
                let primary = if primary == self.self_id && !self.mine.contains_key(&vs.id) {
                    u32::MAX
                } else {
                    primary
                };
                (vs.id, primary)
            })
            .collect()
    }

    /// Decides every virtual service of `config` from `view`; returns what changed.
    pub fn decide(&mut self, config: &Config, view: &View) -> Vec<Change> {
        let mut changes = Vec::new();
        // A service scaled by BGP has no primary: every engine of it steers its own share.
        let roled = |id: u32| {
            config
                .virtual_services
                .iter()
                .any(|v| v.id == id && !v.by_bgp())
        };
        self.mine.retain(|id, _| roled(*id));
        self.current.retain(|id, _| roled(*id));
        for vs in config.virtual_services.iter().filter(|v| !v.by_bgp()) {
            let role = self.decide_one(vs, view);
            let was_mine = self.mine.contains_key(&vs.id);
            let is_mine = role.primary == self.self_id && !self.holding;
            if is_mine {
                self.mine.insert(vs.id, role.epoch);
            } else {
                self.mine.remove(&vs.id);
            }
            let before = self.current.insert(vs.id, role);
            match (was_mine, is_mine) {
                (false, true) => changes.push(Change::Promoted {
                    vs_id: vs.id,
                    epoch: role.epoch,
                }),
                (true, false) => changes.push(Change::Demoted {
                    vs_id: vs.id,
                    to: role.primary,
                    epoch: role.epoch,
                }),
                (false, false) if before != Some(role) && role.primary != self.self_id => {
                    changes.push(Change::Followed {
                        vs_id: vs.id,
                        primary: role.primary,
                        epoch: role.epoch,
                    });
                }
                _ => {}
            }
        }
        if changes
            .iter()
            .any(|c| matches!(c, Change::Promoted { .. } | Change::Demoted { .. }))
        {
            self.save();
        }
        changes
    }

    fn decide_one(&self, vs: &VirtualServiceConfig, view: &View) -> Role {
        let me = self.self_id;
        let succession = vs.succession();
        let pos = |id: u32| {
            succession
                .iter()
                .position(|x| *x == id)
                .unwrap_or(usize::MAX)
        };
        // An engine this one cannot probe (no address) is taken to be alive: no promotion on no news.
        let alive = |id: u32| id == me || view.get(&id).is_none_or(|s| !s.gone());
        let serving = |id: u32| id == me || view.get(&id).is_some_and(|s| s.daemon_up);
        let better = |a: Role, b: Role| {
            a.epoch > b.epoch || (a.epoch == b.epoch && pos(a.primary) < pos(b.primary))
        };
        let mut best = Role {
            primary: vs.primary,
            epoch: vs.epoch,
        };
        let mut consider = |r: Role| {
            if better(r, best) {
                best = r;
            }
        };
        if let Some(e) = self.mine.get(&vs.id) {
            consider(Role {
                primary: me,
                epoch: *e,
            });
        }
        for (peer, status) in view.iter().filter(|(_, s)| !s.gone()) {
            for c in status.claims.iter().filter(|c| c.vs_id == vs.id) {
                consider(Role {
                    primary: *peer,
                    epoch: c.epoch,
                });
            }
        }
        if alive(best.primary) {
            return best;
        }
        match succession
            .iter()
            .find(|id| **id != best.primary && serving(**id))
        {
            Some(next) => Role {
                primary: *next,
                epoch: best.epoch.saturating_add(1),
            },
            None => best,
        }
    }

    fn save(&self) {
        let Some(f) = &self.file else { return };
        let saved = Saved {
            primary_of: self.mine.clone(),
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = f.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&saved)?)?;
            std::fs::rename(&tmp, f)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %f.display(), "saving the roles: {e}");
        }
    }
}

fn load(f: &Path) -> Saved {
    match std::fs::read(f) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %f.display(), "the saved roles do not parse ({e}); starting from the desired state");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// Where engine `engine_id` saves its roles.
pub fn file_of(state_dir: &Path, engine_id: u32) -> PathBuf {
    state_dir.join(format!("roles-{engine_id}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::PeerStatus;

    const TEXT: &str = r#"
[daemon]
interface = "eth0"
engine_id = 2

[peers]
key = "00112233445566778899aabbccddeeff"

[[engines]]
id = 1
mac = "02:00:00:00:00:01"
address_v4 = "10.0.0.1"

[[engines]]
id = 2
mac = "02:00:00:00:00:02"
address_v4 = "10.0.0.2"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
address_v4 = "10.0.0.3"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]
"#;

    fn config(engine_id: u32) -> Config {
        Config::parse(&TEXT.replace("engine_id = 2", &format!("engine_id = {engine_id}"))).unwrap()
    }

    fn up(claims: &[(u32, u64)]) -> PeerStatus {
        PeerStatus {
            daemon_up: true,
            dataplane_up: true,
            claims: claims
                .iter()
                .map(|(vs_id, epoch)| Claim {
                    vs_id: *vs_id,
                    epoch: *epoch,
                })
                .collect(),
            unserving: Vec::new(),
        }
    }

    fn gone() -> PeerStatus {
        PeerStatus {
            daemon_up: false,
            dataplane_up: false,
            claims: Vec::new(),
            unserving: Vec::new(),
        }
    }

    fn crashed(claims: &[(u32, u64)]) -> PeerStatus {
        PeerStatus {
            daemon_up: false,
            ..up(claims)
        }
    }

    /// Three engines, each with its own roles, deciding from what the others say: a replay of a
    /// failover step by step (each step is one probe exchange).
    struct Cluster {
        roles: BTreeMap<u32, Roles>,
        /// Which engines are up (daemon, data plane).
        state: BTreeMap<u32, (bool, bool)>,
    }

    impl Cluster {
        fn new() -> Cluster {
            let mut roles = BTreeMap::new();
            for id in 1..=3 {
                let mut r = Roles::new(id, None, false);
                r.end_hold();
                roles.insert(id, r);
            }
            Cluster {
                roles,
                state: (1..=3).map(|id| (id, (true, true))).collect(),
            }
        }

        fn view_of(&self, me: u32) -> View {
            self.state
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, (daemon, dp))| {
                    let claims = if *daemon || *dp {
                        self.roles[id].claims()
                    } else {
                        Vec::new()
                    };
                    (
                        *id,
                        PeerStatus {
                            daemon_up: *daemon,
                            dataplane_up: *dp,
                            claims,
                            unserving: Vec::new(),
                        },
                    )
                })
                .collect()
        }

        /// One round: every live daemon decides.
        fn round(&mut self) -> Vec<(u32, Change)> {
            let views: BTreeMap<u32, View> = (1..=3).map(|id| (id, self.view_of(id))).collect();
            let mut all = Vec::new();
            for (id, r) in &mut self.roles {
                if self.state[id].0 {
                    for c in r.decide(&config(*id), &views[id]) {
                        all.push((*id, c));
                    }
                }
            }
            all
        }

        fn primaries(&self) -> Vec<u32> {
            self.roles
                .iter()
                .filter(|(id, r)| self.state[id].0 && r.is_primary(0))
                .map(|(id, _)| *id)
                .collect()
        }
    }

    #[test]
    fn a_service_scaled_by_bgp_has_no_roles() {
        let text = format!(
            "{}bgp = {{ med = 10 }}\n\n[bgp]\nasn = 65001\nrouter_id = \"10.0.0.2\"\n\
             [[bgp.peers]]\naddress = \"10.0.0.254\"\nasn = 65000\n",
            TEXT.replace("engine_id = 2", "engine_id = 1")
        );
        let cfg = Config::parse(&text).unwrap();
        let mut r = Roles::new(1, None, false);
        let view: View = [(2, gone()), (3, up(&[]))].into_iter().collect();
        assert!(
            r.decide(&cfg, &view).is_empty(),
            "no promotion, no following"
        );
        assert!(r.claims().is_empty(), "no VIP claimed");
        assert!(r.primaries(&cfg).is_empty());
        assert!(cfg.virtual_services[0].steers_here(1) && cfg.virtual_services[0].steers_here(3));
    }

    #[test]
    fn the_desired_primary_steers_and_the_others_follow() {
        let mut c = Cluster::new();
        let changes = c.round();
        assert!(changes.contains(&(1, Change::Promoted { vs_id: 0, epoch: 0 })));
        assert_eq!(c.primaries(), [1]);
        assert_eq!(
            c.roles[&2].role(0),
            Some(Role {
                primary: 1,
                epoch: 0
            })
        );
        assert!(c.round().is_empty(), "stable");
    }

    #[test]
    fn a_gone_primary_is_replaced_by_the_next_in_succession_at_the_next_epoch() {
        let mut c = Cluster::new();
        c.round();
        c.state.insert(1, (false, false));
        let changes = c.round();
        assert!(
            changes.contains(&(2, Change::Promoted { vs_id: 0, epoch: 1 })),
            "{changes:?}"
        );
        assert!(
            changes.contains(&(
                3,
                Change::Followed {
                    vs_id: 0,
                    primary: 2,
                    epoch: 1
                }
            )),
            "{changes:?}"
        );
        assert_eq!(c.primaries(), [2]);
        assert_eq!(c.roles[&2].primaries(&config(2))[&0], 2);
        // The old primary comes back, its desired state still naming it at epoch 0.
        c.state.insert(1, (true, true));
        let changes = c.round();
        assert!(
            !changes
                .iter()
                .any(|(id, _)| *id == 1 && matches!(changes[0].1, Change::Promoted { .. }))
        );
        assert_eq!(
            c.roles[&1].role(0),
            Some(Role {
                primary: 2,
                epoch: 1
            }),
            "it follows the higher epoch"
        );
        assert_eq!(c.primaries(), [2], "never a second primary");
        assert_eq!(c.roles[&1].primaries(&config(1))[&0], 2);
    }

    #[test]
    fn a_primary_whose_data_plane_still_steers_is_not_replaced() {
        let mut c = Cluster::new();
        c.round();
        c.state.insert(1, (false, true));
        assert!(c.round().is_empty());
        // Its own roles do not run (its daemon is down), but its claim is what it last said.
        let view = c.view_of(2);
        assert_eq!(view[&1], crashed(&[(0, 0)]));
        assert_eq!(
            c.roles[&2].role(0),
            Some(Role {
                primary: 1,
                epoch: 0
            })
        );
    }

    #[test]
    fn a_fresh_engine_holds_then_takes_its_role_unless_someone_claims_higher() {
        let cfg = config(1);
        let mut r = Roles::new(1, None, false);
        let view: View = [(2, up(&[])), (3, up(&[]))].into();
        assert!(r.decide(&cfg, &view).is_empty(), "holding: claims nothing");
        assert_eq!(r.primaries(&cfg)[&0], u32::MAX, "steers nothing");
        r.end_hold();
        assert_eq!(
            r.decide(&cfg, &view),
            [Change::Promoted { vs_id: 0, epoch: 0 }]
        );
        // Another fresh start, this time someone took over while it was away.
        let mut r = Roles::new(1, None, false);
        let view: View = [(2, up(&[(0, 1)])), (3, up(&[]))].into();
        r.decide(&cfg, &view);
        r.end_hold();
        assert_eq!(r.decide(&cfg, &view), []);
        assert_eq!(
            r.role(0),
            Some(Role {
                primary: 2,
                epoch: 1
            })
        );
        assert!(!r.is_primary(0));
    }

    #[test]
    fn a_healed_partition_keeps_one_primary() {
        // 1 is gone; 2 and 3 cannot see each other, so each promotes itself at epoch 1.
        let cfg2 = config(2);
        let cfg3 = config(3);
        let mut r2 = Roles::new(2, None, true);
        let mut r3 = Roles::new(3, None, true);
        let alone: View = [(1, gone()), (3, gone())].into();
        r2.decide(&cfg2, &alone);
        let alone3: View = [(1, gone()), (2, gone())].into();
        assert_eq!(
            r3.decide(&cfg3, &alone3),
            [Change::Promoted { vs_id: 0, epoch: 1 }]
        );
        assert!(
            r2.is_primary(0) && r3.is_primary(0),
            "split brain while partitioned"
        );
        // Healed: equal epochs go to the engine earlier in the succession (2).
        let v2: View = [(1, gone()), (3, up(&[(0, 1)]))].into();
        let v3: View = [(1, gone()), (2, up(&[(0, 1)]))].into();
        assert_eq!(r2.decide(&cfg2, &v2), []);
        assert_eq!(
            r3.decide(&cfg3, &v3),
            [Change::Demoted {
                vs_id: 0,
                to: 2,
                epoch: 1
            }]
        );
    }

    #[test]
    fn a_controller_migration_at_a_higher_epoch_wins_over_a_promotion() {
        let mut cfg = config(2);
        let mut r = Roles::new(2, None, true);
        r.decide(&cfg, &[(1, gone()), (3, up(&[]))].into());
        assert!(r.is_primary(0));
        cfg.virtual_services[0].primary = 3;
        cfg.virtual_services[0].epoch = 2;
        let changes = r.decide(&cfg, &[(1, gone()), (3, up(&[]))].into());
        assert_eq!(
            changes,
            [Change::Demoted {
                vs_id: 0,
                to: 3,
                epoch: 2
            }]
        );
    }

    #[test]
    fn roles_are_saved_and_a_restarted_daemon_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_of(dir.path(), 2);
        let cfg = config(2);
        let mut r = Roles::new(2, Some(f.clone()), true);
        r.decide(&cfg, &[(1, gone()), (3, up(&[]))].into());
        assert!(r.is_primary(0));
        // Restarted while its data plane steered: it is primary at once, before hearing anyone.
        let r = Roles::new(2, Some(f.clone()), true);
        assert_eq!(r.claims(), [Claim { vs_id: 0, epoch: 1 }]);
        // A fresh host does not trust what it saved.
        let r = Roles::new(2, Some(f), false);
        assert!(r.claims().is_empty());
    }
}
