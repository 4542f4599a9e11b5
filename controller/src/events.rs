//! What happened, for operators: every placement, health, scaling, apply and anomaly change is an
//! [`Event`] with a wall-clock time, a kind, the objects it concerns and a human reason. The last
//! [`KEEP`] are listed by `ListEvents`; `WatchEvents` streams new ones.

use std::{collections::VecDeque, time::SystemTime};

use tokio::sync::broadcast;
use tracing::info;

/// Events kept for `ListEvents`.
pub const KEEP: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_unix_ms: i64,
    pub kind: &'static str,
    pub objects: Vec<String>,
    pub reason: String,
}

pub struct Events {
    log: VecDeque<Event>,
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            log: VecDeque::new(),
            tx: broadcast::channel(1024).0,
        }
    }
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Events {
    pub fn emit(&mut self, kind: &'static str, objects: &[String], reason: impl Into<String>) {
        let e = Event {
            time_unix_ms: unix_ms(SystemTime::now()),
            kind,
            objects: objects.to_vec(),
            reason: reason.into(),
        };
        info!(kind, objects = ?e.objects, reason = %e.reason, "event");
        if self.log.len() == KEEP {
            self.log.pop_front();
        }
        self.log.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    pub fn recent(&self) -> Vec<Event> {
        self.log.iter().cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
