//! Automatic quarantine: the Quarantine document's triggers, measured from kernel events
//! (SPEC §1 `triggers`). A device trips `denied_flows` when more than `count` distinct new
//! flows of it are denied within `window`, and `fanout` when it reaches more than
//! `destinations` distinct addresses (opened or denied) within `window`.
//!
//! Kernel events are rate-limited per device (20 per second), so a flood is seen in part;
//! thresholds are crossed all the same, only later than the flood itself.

use std::{
    collections::{hash_map::Entry, HashMap, HashSet, VecDeque},
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::policy::model::Quarantine;

/// What a device did, as far as the triggers care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A new flow was denied (`flow` tells retransmissions of one flow apart from others).
    Denied { flow: FlowId },
    /// A new flow was opened.
    Opened { dst: IpAddr },
}

/// A flow as a device opens it: protocol, destination, ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId {
    pub protocol: u8,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A trigger that fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trip {
    /// `denied_flows` or `fanout`.
    pub trigger: &'static str,
    /// For the audit log, e.g. "21 denied flows in 10s".
    pub detail: String,
}

/// The triggers of one policy and what each device did within their windows.
#[derive(Debug, Default)]
pub struct Triggers {
    denied_flows: Option<(u32, Duration)>,
    fanout: Option<(u32, Duration)>,
    exempt: HashSet<String>,
    denied: HashMap<String, DistinctWindow<FlowId>>,
    destinations: HashMap<String, DistinctWindow<IpAddr>>,
}

impl Triggers {
    pub fn new(quarantine: Option<&Quarantine>) -> Self {
        let Some(q) = quarantine else {
            return Triggers::default();
        };
        Triggers {
            denied_flows: q
                .triggers
                .denied_flows
                .as_ref()
                .map(|t| (t.count, t.window)),
            fanout: q
                .triggers
                .fanout
                .as_ref()
                .map(|t| (t.destinations, t.window)),
            exempt: q.exempt.iter().cloned().collect(),
            ..Triggers::default()
        }
    }

    /// Whether the fan-out trigger needs the kernel to report opened flows.
    pub fn wants_opened_flows(&self) -> bool {
        self.fanout.is_some()
    }

    /// Counts what `device` did at `now`; a trip the first time a threshold is crossed.
    /// The device's windows start afresh after a trip.
    pub fn observe(&mut self, device: &str, now: Instant, seen: Observation) -> Option<Trip> {
        if self.exempt.contains(device) {
            return None;
        }
        let trip = match seen {
            Observation::Denied { flow } => {
                let denied = self.denied_flows.and_then(|(count, window)| {
                    let n = window_of(&mut self.denied, device, window).add(now, flow);
                    (n > count as usize).then(|| Trip {
                        trigger: "denied_flows",
                        detail: format!(
                            "{n} denied flows in {}",
                            humantime::format_duration(window)
                        ),
                    })
                });
                denied.or_else(|| self.fanout_after(device, now, flow.dst))
            }
            Observation::Opened { dst } => self.fanout_after(device, now, dst),
        };
        if trip.is_some() {
            self.denied.remove(device);
            self.destinations.remove(device);
        }
        trip
    }

    fn fanout_after(&mut self, device: &str, now: Instant, dst: IpAddr) -> Option<Trip> {
        let (destinations, window) = self.fanout?;
        let n = window_of(&mut self.destinations, device, window).add(now, dst);
        (n > destinations as usize).then(|| Trip {
            trigger: "fanout",
            detail: format!("{n} destinations in {}", humantime::format_duration(window)),
        })
    }
}

fn window_of<'a, K: Eq + Hash + Copy>(
    windows: &'a mut HashMap<String, DistinctWindow<K>>,
    device: &str,
    window: Duration,
) -> &'a mut DistinctWindow<K> {
    match windows.entry(device.to_owned()) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(DistinctWindow::new(window)),
    }
}

/// Distinct keys seen within a sliding window.
#[derive(Debug)]
struct DistinctWindow<K> {
    window: Duration,
    seen: VecDeque<(Instant, K)>,
    counts: HashMap<K, usize>,
}

impl<K: Eq + Hash + Copy> DistinctWindow<K> {
    fn new(window: Duration) -> Self {
        DistinctWindow {
            window,
            seen: VecDeque::new(),
            counts: HashMap::new(),
        }
    }

    /// Adds `key` at `now`; the number of distinct keys within the window.
    fn add(&mut self, now: Instant, key: K) -> usize {
        while let Some(&(at, old)) = self.seen.front() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.seen.pop_front();
            if let Entry::Occupied(mut e) = self.counts.entry(old) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        self.seen.push_back((now, key));
        *self.counts.entry(key).or_default() += 1;
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{DeniedFlowsTrigger, FanoutTrigger, Location, Triggers as Spec};

    fn quarantine(denied: Option<(u32, u64)>, fanout: Option<(u32, u64)>) -> Quarantine {
        Quarantine {
            allow: vec![],
            triggers: Spec {
                denied_flows: denied.map(|(count, s)| DeniedFlowsTrigger {
                    count,
                    window: Duration::from_secs(s),
                }),
                fanout: fanout.map(|(destinations, s)| FanoutTrigger {
                    destinations,
                    window: Duration::from_secs(s),
                }),
            },
            exempt: vec!["plc-7".into()],
            location: Location {
                file: std::sync::Arc::new("q.yaml".into()),
                line: 1,
                column: 1,
            },
        }
    }

    fn denied(port: u16) -> Observation {
        Observation::Denied {
            flow: FlowId {
                protocol: 6,
                dst: "10.0.0.9".parse().unwrap(),
                sport: 40000,
                dport: port,
            },
        }
    }

    #[test]
    fn denied_flows_trips_above_count_within_the_window() {
        let q = quarantine(Some((3, 10)), None);
        let mut t = Triggers::new(Some(&q));
        let t0 = Instant::now();
        for port in 1..=3 {
            assert_eq!(t.observe("cam", t0, denied(port)), None);
        }
        // Retransmissions of a flow already counted are not new flows.
        assert_eq!(t.observe("cam", t0, denied(3)), None);
        let trip = t
            .observe("cam", t0, denied(4))
            .expect("the 4th distinct flow trips");
        assert_eq!(trip.trigger, "denied_flows");
        assert_eq!(trip.detail, "4 denied flows in 10s");
        // Windows start afresh after a trip.
        assert_eq!(t.observe("cam", t0, denied(5)), None);
    }

    #[test]
    fn old_denials_leave_the_window() {
        let q = quarantine(Some((2, 10)), None);
        let mut t = Triggers::new(Some(&q));
        let t0 = Instant::now();
        t.observe("cam", t0, denied(1));
        t.observe("cam", t0, denied(2));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(t.observe("cam", later, denied(3)), None);
        assert_eq!(t.observe("cam", later, denied(4)), None);
        assert!(t.observe("cam", later, denied(5)).is_some());
    }

    #[test]
    fn fanout_counts_distinct_destinations_opened_or_denied() {
        let q = quarantine(None, Some((3, 60)));
        let mut t = Triggers::new(Some(&q));
        assert!(t.wants_opened_flows());
        let t0 = Instant::now();
        let opened = |n: u8| Observation::Opened {
            dst: IpAddr::from([10, 0, 0, n]),
        };
        assert_eq!(t.observe("cam", t0, opened(1)), None);
        assert_eq!(t.observe("cam", t0, opened(1)), None);
        assert_eq!(t.observe("cam", t0, opened(2)), None);
        assert_eq!(
            t.observe("cam", t0, denied(80)),
            None,
            "10.0.0.9 is the 3rd"
        );
        let trip = t.observe("cam", t0, opened(4)).unwrap();
        assert_eq!(
            (trip.trigger, trip.detail.as_str()),
            ("fanout", "4 destinations in 1m")
        );
    }

    #[test]
    fn exempt_devices_and_missing_triggers_never_trip() {
        let q = quarantine(Some((1, 10)), Some((1, 10)));
        let mut t = Triggers::new(Some(&q));
        let t0 = Instant::now();
        for port in 1..100 {
            assert_eq!(t.observe("plc-7", t0, denied(port)), None);
        }
        let mut none = Triggers::new(None);
        assert!(!none.wants_opened_flows());
        for port in 1..100 {
            assert_eq!(none.observe("cam", t0, denied(port)), None);
        }
        // Devices are counted apart.
        assert_eq!(t.observe("cam", t0, denied(1)), None);
        assert!(t.observe("cam", t0, denied(2)).is_some());
    }
}
