//! Engine health from heartbeats, on the caller's clock (so tests run it on a virtual one).
//!
//! An engine that has sent nothing for more than `interval × max_missed` is failed at the next
//! tick; ticks come every `interval`, so a dead engine is marked failed within
//! `interval × (max_missed + 1)`. A failed engine that heartbeats again is healthy again, unless it
//! failed `flap_failures` times within `flap_window`: then it is flapping and kept out of placement
//! for `flap_hold`, heartbeats or not.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub max_missed: u32,
    pub flap_failures: usize,
    pub flap_window: Duration,
    pub flap_hold: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(1),
            max_missed: 3,
            flap_failures: 3,
            flap_window: Duration::from_mins(5),
            flap_hold: Duration::from_mins(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineHealth {
    Healthy,
    Failed,
    /// Out of placement until `until`.
    Flapping {
        until: Instant,
    },
}

impl EngineHealth {
    pub fn name(self) -> &'static str {
        match self {
            EngineHealth::Healthy => "healthy",
            EngineHealth::Failed => "failed",
            EngineHealth::Flapping { .. } => "flapping",
        }
    }

    pub fn is_healthy(self) -> bool {
        self == EngineHealth::Healthy
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Failed { engine: String, silent: Duration },
    Recovered { engine: String },
    Flapping { engine: String, failures: usize },
    FlapEnded { engine: String },
}

#[derive(Debug)]
struct Tracked {
    last_seen: Instant,
    state: EngineHealth,
    failures: VecDeque<Instant>,
}

#[derive(Debug)]
pub struct HealthManager {
    settings: HealthSettings,
    engines: BTreeMap<String, Tracked>,
}

impl HealthManager {
    pub fn new(settings: HealthSettings) -> Self {
        HealthManager {
            settings,
            engines: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> HealthSettings {
        self.settings
    }

    /// Starts tracking `engine` as healthy, last seen `now` (a registration, or every known engine
    /// when the controller starts: each gets the full allowance before it can fail).
    pub fn track(&mut self, engine: &str, now: Instant) {
        self.engines.entry(engine.to_owned()).or_insert(Tracked {
            last_seen: now,
            state: EngineHealth::Healthy,
            failures: VecDeque::new(),
        });
    }

    /// Starts tracking `engine` as failed (it was down in the last snapshot before a restart): it is
    /// healthy again at its first heartbeat.
    pub fn track_failed(&mut self, engine: &str, now: Instant) {
        self.engines.insert(
            engine.to_owned(),
            Tracked {
                last_seen: now,
                state: EngineHealth::Failed,
                failures: VecDeque::new(),
            },
        );
    }

    pub fn forget(&mut self, engine: &str) {
        self.engines.remove(engine);
    }

    pub fn state(&self, engine: &str) -> Option<EngineHealth> {
        self.engines.get(engine).map(|t| t.state)
    }

    pub fn last_seen(&self, engine: &str) -> Option<Instant> {
        self.engines.get(engine).map(|t| t.last_seen)
    }

    /// A heartbeat (or any message) from `engine`.
    pub fn heartbeat(&mut self, engine: &str, now: Instant) -> Option<Transition> {
        self.track(engine, now);
        let t = self.engines.get_mut(engine)?;
        t.last_seen = now;
        if t.state == EngineHealth::Failed {
            t.state = EngineHealth::Healthy;
            return Some(Transition::Recovered {
                engine: engine.to_owned(),
            });
        }
        None
    }

    /// Run every `interval`: fails silent engines, ends flapping holds.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let s = self.settings;
        let allowance = s.interval * s.max_missed;
        let mut out = Vec::new();
        for (name, t) in &mut self.engines {
            let silent = now.saturating_duration_since(t.last_seen);
            match t.state {
                EngineHealth::Healthy if silent > allowance => {
                    t.state = EngineHealth::Failed;
                    t.failures.push_back(now);
                    while t
                        .failures
                        .front()
                        .is_some_and(|f| now.saturating_duration_since(*f) > s.flap_window)
                    {
                        t.failures.pop_front();
                    }
                    out.push(Transition::Failed {
                        engine: name.clone(),
                        silent,
                    });
                    if t.failures.len() >= s.flap_failures {
                        t.state = EngineHealth::Flapping {
                            until: now + s.flap_hold,
                        };
                        out.push(Transition::Flapping {
                            engine: name.clone(),
                            failures: t.failures.len(),
                        });
                    }
                }
                EngineHealth::Flapping { until } if now >= until => {
                    t.failures.clear();
                    if silent > allowance {
                        t.state = EngineHealth::Failed;
                    } else {
                        t.state = EngineHealth::Healthy;
                        out.push(Transition::FlapEnded {
                            engine: name.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Ticks every interval from `from` to `to` ms, returning the transitions with their times.
    fn run(
        h: &mut HealthManager,
        start: Instant,
        from: u64,
        to: u64,
        beat: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Transition)> {
        let mut out = Vec::new();
        let mut ms = from;
        while ms <= to {
            if beat(ms)
                && let Some(t) = h.heartbeat("se1", at(start, ms))
            {
                out.push((ms, t));
            }
            if ms.is_multiple_of(1000) {
                out.extend(h.tick(at(start, ms)).into_iter().map(|t| (ms, t)));
            }
            ms += 100;
        }
        out
    }

    #[test]
    fn a_silent_engine_fails_within_interval_times_max_missed_plus_one() {
        let start = Instant::now();
        let mut h = HealthManager::new(HealthSettings::default());
        h.track("se1", start);
        // Heartbeats every second until 10 s (the last at 10.0 s), then silence.
        let t = run(&mut h, start, 0, 20_000, |ms| {
            ms <= 10_000 && ms % 1000 == 0
        });
        let failed: Vec<_> = t
            .iter()
            .filter(|(_, t)| matches!(t, Transition::Failed { .. }))
            .collect();
        assert_eq!(failed.len(), 1, "{t:?}");
        let (when, _) = failed[0];
        assert!(
            *when > 13_000 && *when <= 14_000,
            "failed at {when} ms: more than 3 s and at most 4 s after the last heartbeat"
        );
        assert_eq!(h.state("se1"), Some(EngineHealth::Failed));
        // It comes back.
        let t = h.heartbeat("se1", at(start, 20_500)).unwrap();
        assert_eq!(
            t,
            Transition::Recovered {
                engine: "se1".into()
            }
        );
        assert!(h.state("se1").unwrap().is_healthy());
    }

    #[test]
    fn jitter_within_the_allowance_never_fails() {
        let start = Instant::now();
        let mut h = HealthManager::new(HealthSettings::default());
        h.track("se1", start);
        // Heartbeats every 2.9 s: late, but never more than 3 intervals apart.
        let t = run(&mut h, start, 0, 60_000, |ms| ms % 2900 == 0);
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn three_failures_in_five_minutes_is_flapping_for_five_minutes() {
        let start = Instant::now();
        let mut h = HealthManager::new(HealthSettings::default());
        h.track("se1", start);
        // Up 10 s, down 10 s, three times.
        let t = run(&mut h, start, 0, 60_000, |ms| (ms / 10_000) % 2 == 0);
        let kinds: Vec<&str> = t
            .iter()
            .map(|(_, t)| match t {
                Transition::Failed { .. } => "failed",
                Transition::Recovered { .. } => "recovered",
                Transition::Flapping { .. } => "flapping",
                Transition::FlapEnded { .. } => "flap_ended",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "failed",
                "recovered",
                "failed",
                "recovered",
                "failed",
                "flapping"
            ]
        );
        let flapped_at = t.last().unwrap().0;
        // Heartbeats again: still flapping until the hold is over, then healthy.
        let t = run(&mut h, start, 60_100, 60_000 + 5 * 60_000 + 2000, |_| true);
        assert!(matches!(h.state("se1"), Some(EngineHealth::Healthy)));
        assert_eq!(t.len(), 1, "{t:?}");
        let (ended, tr) = &t[0];
        assert!(matches!(tr, Transition::FlapEnded { .. }));
        assert!(
            *ended >= flapped_at + 300_000 && *ended <= flapped_at + 301_000,
            "hold ended at {ended}, flapping from {flapped_at}"
        );
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let start = Instant::now();
        let mut h = HealthManager::new(HealthSettings::default());
        h.track("se1", start);
        // Down for 10 s every 4 minutes: never 3 failures within 5 minutes.
        let t = run(&mut h, start, 0, 15 * 60_000, |ms| ms % 240_000 >= 10_000);
        assert!(
            t.iter()
                .all(|(_, t)| !matches!(t, Transition::Flapping { .. })),
            "{t:?}"
        );
        assert!(
            t.iter()
                .filter(|(_, t)| matches!(t, Transition::Failed { .. }))
                .count()
                >= 3
        );
    }
}
