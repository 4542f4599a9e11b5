//! End to end: restarting the primary's daemon keeps the connection table (pinned under bpffs), so
//! established connections stay on their engines even though the restarted daemon builds a
//! different ring; SIGTERM detaches the XDP program.
//!
//! Topology as in `e2e_steering`: client + se1 (primary) + se2 + se3, weights 1,1,2 at first.

use std::time::Duration;

use lb_tests::client::HeldConnection;
use lb_tests::daemon::Member;
use lb_tests::require_root;
use lb_tests::steering::{Options, Steering};

const HELD: usize = 40;

#[test]
fn restart_keeps_established_flows_on_their_engines() {
    if !require_root() {
        return;
    }
    let mut lab = Steering::build(&Options {
        lab_prefix: "lbtr".to_owned(),
        ..Options::default()
    })
    .expect("build the steering topology");
    let client = lab.clients[0].ns.clone();

    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut c = HeldConnection::open(&client, lab.vip(), Duration::from_secs(3)).unwrap();
        let name = c.get().unwrap();
        held.push((c, name));
    }
    let on_others = held.iter().filter(|(_, n)| n != "se1").count();
    assert!(on_others > 0, "no held connection went to a secondary");

    // Restart with se3 alone taking new flows: the new ring differs from the old one everywhere
    // se1 and se2 had slots, so any connection that lost its table entry would move to se3 (and
    // be reset there).
    lab.restart_daemon(
        1,
        vec![
            Member { id: 1, weight: 0 },
            Member { id: 2, weight: 0 },
            Member { id: 3, weight: 1 },
        ],
    )
    .expect("restart the primary's daemon");

    for (i, (c, before)) in held.iter_mut().enumerate() {
        let after = c.get().unwrap_or_else(|e| {
            panic!("held connection {i} (on {before}) broke after restart: {e:#}")
        });
        assert_eq!(&after, before, "held connection {i} moved after restart");
    }

    // New connections follow the new ring: all to se3.
    let r = lab.load(200).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.per_engine.get("se3").copied(), Some(200), "{r}");
}
