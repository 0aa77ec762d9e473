//! Reachability between two policies: who gains or loses which ports to what.
//!
//! Both policies are evaluated over the same finite set of parties, so that every kind of edit
//! (a rule added, removed or narrowed, a device moved, a zone's CIDRs changed) shows up as the
//! flows it opens or closes:
//!
//! - sources: each segment present in both policies, standing for its devices that stay in it
//!   (left out when there are none), groups of devices that are new, removed or moved between
//!   segments, quarantined devices (the Quarantine `allow` rules), and outside address blocks
//!   (`accept` rules);
//! - destinations: each device (collapsed into its segment when all of the segment's devices
//!   change alike), the gateway, and outside address blocks.
//!
//! Address blocks are the regions that the CIDRs of both policies cut the address space into:
//! a CIDR minus the narrower CIDRs inside it. Every address of a region is in the same zones
//! and CIDRs, so one region stands for all of them. The gateway is judged as such: offline its
//! addresses are unknown, so only `to: gateway` reaches it. A device is reached by a zone or
//! CIDR rule through any of its static addresses (as in `explain --to DEVICE`).
//!
//! Port 0 is not a usable port (SPEC §1) and is left out of port sets, so that `tcp` and
//! `1-65535/tcp` are the same.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::IpNet;

use super::{
    evaluate::{Evaluator, Place},
    model::{canonical_net, AllowRule, Mode, Policy, PortSpec, Protocol, Source, Target},
};

/// Everything that changed, sorted for review.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Sorted by source, then destination, gains before losses.
    pub reach: Vec<ReachChange>,
    /// Segments in both policies whose mode changed, by name.
    pub modes: Vec<ModeChange>,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.reach.is_empty() && self.modes.is_empty()
    }

    pub fn count(&self, change: Change) -> usize {
        self.reach.iter().filter(|r| r.change == change).count()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    Gained,
    Lost,
}

impl Change {
    pub fn sign(self) -> char {
        match self {
            Change::Gained => '+',
            Change::Lost => '-',
        }
    }
}

/// `from` may now (`Gained`) or no longer (`Lost`) open flows of `services` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReachChange {
    pub change: Change,
    pub from: Party,
    pub to: Party,
    pub services: Services,
}

impl fmt::Display for ReachChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} → {}: {}",
            self.change.sign(),
            self.from,
            self.to,
            self.services
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeChange {
    pub segment: String,
    pub old: Mode,
    pub new: Mode,
}

impl fmt::Display for ModeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match self.new {
            Mode::Audit => "its would-be drops now pass and are reported as audit_deny",
            Mode::Enforce => "its would-be drops are now dropped",
        };
        write!(
            f,
            "~ segment {}: mode {} → {}: {effect}",
            self.segment,
            mode_name(self.old),
            mode_name(self.new)
        )
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

/// One side of a change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Party {
    /// The devices that stay in a segment (source), or all of them (destination).
    Segment(String),
    /// Some devices, with their segment in the old and in the new policy.
    Devices {
        ids: Vec<String>,
        old_segment: Option<String>,
        new_segment: Option<String>,
    },
    /// Any quarantined device.
    Quarantined,
    /// The gateway itself.
    Gateway,
    /// Addresses outside the device network: `cidr` without the narrower `except` blocks;
    /// `zones` (of either policy) contain them.
    Addresses {
        cidr: IpNet,
        except: Vec<IpNet>,
        zones: Vec<String>,
    },
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Segment(name) => f.write_str(name),
            Party::Devices {
                ids,
                old_segment,
                new_segment,
            } => {
                let ids = ids.join(", ");
                match (old_segment, new_segment) {
                    (Some(old), Some(new)) if old == new => write!(f, "{ids} ({new})"),
                    (Some(old), Some(new)) => write!(f, "{ids} (moved {old} → {new})"),
                    (None, Some(new)) => write!(f, "{ids} (new in {new})"),
                    (Some(old), None) => write!(f, "{ids} (removed from {old})"),
                    (None, None) => f.write_str(&ids),
                }
            }
            Party::Quarantined => f.write_str("quarantined devices"),
            Party::Gateway => f.write_str("gateway"),
            Party::Addresses {
                cidr,
                except,
                zones,
            } => {
                write!(f, "{cidr}")?;
                if !except.is_empty() {
                    write!(f, " except {}", join(except))?;
                }
                match zones.as_slice() {
                    [] => Ok(()),
                    [zone] => write!(f, " (zone {zone})"),
                    zones => write!(f, " (zones {})", zones.join(", ")),
                }
            }
        }
    }
}

fn join(items: &[impl fmt::Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A set of protocols and destination ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Services {
    tcp: PortSet,
    udp: PortSet,
    sctp: PortSet,
    icmp: bool,
    icmpv6: bool,
    /// Every protocol other than those above; only `any` grants it.
    other: bool,
}

impl Services {
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = &'a PortSpec>) -> Self {
        let mut services = Services::default();
        for spec in specs {
            services.add(spec);
        }
        services
    }

    fn all() -> Self {
        Services {
            tcp: PortSet::full(),
            udp: PortSet::full(),
            sctp: PortSet::full(),
            icmp: true,
            icmpv6: true,
            other: true,
        }
    }

    fn add(&mut self, spec: &PortSpec) {
        let (lo, hi) = (*spec.ports.start(), *spec.ports.end());
        match spec.protocol {
            Protocol::Tcp => self.tcp.insert(lo, hi),
            Protocol::Udp => self.udp.insert(lo, hi),
            Protocol::Sctp => self.sctp.insert(lo, hi),
            Protocol::Icmp => self.icmp = true,
            Protocol::Icmpv6 => self.icmpv6 = true,
            Protocol::Any => *self = Services::all(),
        }
    }

    pub fn difference(&self, other: &Services) -> Services {
        Services {
            tcp: self.tcp.difference(&other.tcp),
            udp: self.udp.difference(&other.udp),
            sctp: self.sctp.difference(&other.sctp),
            icmp: self.icmp && !other.icmp,
            icmpv6: self.icmpv6 && !other.icmpv6,
            other: self.other && !other.other,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Services::default()
    }

    /// The set as port specs in the segment files' syntax (`any` when complete); protocols
    /// that only `any` grants are written `other`.
    pub fn specs(&self) -> Vec<String> {
        if *self == Services::all() {
            return vec!["any".into()];
        }
        let mut specs = Vec::new();
        for (set, protocol) in [(&self.tcp, "tcp"), (&self.udp, "udp"), (&self.sctp, "sctp")] {
            specs.extend(set.specs(protocol));
        }
        for (on, name) in [
            (self.icmp, "icmp"),
            (self.icmpv6, "icmpv6"),
            (self.other, "other"),
        ] {
            if on {
                specs.push(name.into());
            }
        }
        specs
    }
}

impl fmt::Display for Services {
    /// `8883/tcp, icmp`, or `any except 443/tcp` when most protocols are in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.other && *self != Services::all() {
            let missing = Services::all().difference(self).specs();
            return write!(f, "any except {}", missing.join(", "));
        }
        f.write_str(&self.specs().join(", "))
    }
}

/// Sorted, disjoint, non-adjacent inclusive port ranges within 1-65535.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    fn full() -> Self {
        PortSet(vec![(1, u16::MAX)])
    }

    fn insert(&mut self, lo: u16, hi: u16) {
        let lo = lo.max(1);
        if lo > hi {
            return;
        }
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(self.0.len());
        for (lo, hi) in self.0.drain(..) {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        self.0 = merged;
    }

    fn difference(&self, other: &PortSet) -> PortSet {
        let mut out = Vec::new();
        for &(lo, hi) in &self.0 {
            let (mut start, hi) = (u32::from(lo), u32::from(hi));
            for &(cut_lo, cut_hi) in &other.0 {
                let (cut_lo, cut_hi) = (u32::from(cut_lo), u32::from(cut_hi));
                if cut_hi < start || cut_lo > hi {
                    continue;
                }
                if cut_lo > start {
                    out.push((start, cut_lo - 1));
                }
                start = cut_hi + 1;
            }
            if start <= hi {
                out.push((start, hi));
            }
        }
        // Every bound lies within the u16 ranges it came from.
        PortSet(
            out.into_iter()
                .filter_map(|(lo, hi)| Some((u16::try_from(lo).ok()?, u16::try_from(hi).ok()?)))
                .collect(),
        )
    }

    fn specs(&self, protocol: &str) -> Vec<String> {
        if *self == PortSet::full() {
            return vec![protocol.into()];
        }
        self.0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    format!("{lo}/{protocol}")
                } else {
                    format!("{lo}-{hi}/{protocol}")
                }
            })
            .collect()
    }
}

/// What flows go to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Atom {
    Device(String),
    Gateway,
    Region(Region),
}

/// `cidr` without the narrower CIDRs `except` (never empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Region {
    cidr: IpNet,
    except: Vec<IpNet>,
    zones: Vec<String>,
}

impl Region {
    /// The region as is; [`merge_regions`] keys on it and writes the final form.
    fn party(&self) -> Party {
        Party::Addresses {
            cidr: self.cidr,
            except: self.except.clone(),
            zones: self.zones.clone(),
        }
    }
}

/// `cidr` without `except`, written as one CIDR when what is left is one.
fn addresses(cidr: IpNet, except: Vec<IpNet>, zones: &[String]) -> Party {
    let (cidr, except) = match remainder(cidr, &except) {
        Some(single) => (single, Vec::new()),
        None => (cidr, except),
    };
    Party::Addresses {
        cidr,
        except,
        zones: zones.to_vec(),
    }
}

/// The one CIDR that is left of `net` without the disjoint CIDRs `holes` inside it, if
/// what is left is a single CIDR.
fn remainder(net: IpNet, holes: &[IpNet]) -> Option<IpNet> {
    if holes.is_empty() {
        return Some(net);
    }
    let halves = net.subnets(net.prefix_len().checked_add(1)?).ok()?;
    let mut left = halves.filter_map(|half| {
        let inside: Vec<IpNet> = holes.iter().copied().filter(|h| half.contains(h)).collect();
        (!covered(half, &inside)).then_some((half, inside))
    });
    match (left.next(), left.next()) {
        (Some((half, inside)), None) => remainder(half, &inside),
        _ => None,
    }
}

/// A source of flows with its rules in each policy (`None`: it does not exist there).
struct SourceClass<'a> {
    party: Party,
    old: Option<&'a [AllowRule]>,
    new: Option<&'a [AllowRule]>,
}

/// The reachability changes from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let sides = [Evaluator::new(old, &[]), Evaluator::new(new, &[])];
    let regions = regions(old, new);
    let device_ids: Vec<&str> = [old, new]
        .iter()
        .flat_map(|p| p.segments.iter().flat_map(|s| &s.devices))
        .map(|d| d.id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let membership: BTreeMap<&str, [Option<&str>; 2]> = device_ids
        .iter()
        .map(|&id| {
            let [old, new] =
                [&sides[0], &sides[1]].map(|ev| ev.device(id).map(|d| d.segment.name.as_str()));
            (id, [old, new])
        })
        .collect();

    let mut atoms: Vec<Atom> = device_ids
        .iter()
        .map(|id| Atom::Device((*id).to_owned()))
        .collect();
    atoms.push(Atom::Gateway);
    atoms.extend(regions.iter().cloned().map(Atom::Region));

    let mut raw: Vec<(Change, Party, Atom, Services)> = Vec::new();
    let mut record = |from: &Party, to: &Atom, before: Services, after: Services| {
        for (change, services) in [
            (Change::Gained, after.difference(&before)),
            (Change::Lost, before.difference(&after)),
        ] {
            if !services.is_empty() {
                raw.push((change, from.clone(), to.clone(), services));
            }
        }
    };

    // Devices opening flows: `allow` rules (and the Quarantine's).
    for class in source_classes(old, new, &membership) {
        for atom in &atoms {
            let [before, after] =
                [(&sides[0], class.old), (&sides[1], class.new)].map(|(ev, rules)| {
                    match (rules, place(ev, atom)) {
                        (Some(rules), Some(place)) => Services::from_specs(
                            rules
                                .iter()
                                .filter(|r| ev.target_covers(&r.to, &place))
                                .flat_map(|r| &r.ports),
                        ),
                        _ => Services::default(),
                    }
                });
            record(&class.party, atom, before, after);
        }
    }
    // Outside sources opening flows to devices: `accept` rules.
    for region in &regions {
        for id in &device_ids {
            let [before, after] = [&sides[0], &sides[1]].map(|ev| match ev.device(id) {
                Some(d) => Services::from_specs(
                    d.segment
                        .accept
                        .iter()
                        .filter(|r| ev.source_covers(&r.from, &region.cidr))
                        .flat_map(|r| &r.ports),
                ),
                None => Services::default(),
            });
            record(
                &region.party(),
                &Atom::Device((*id).to_owned()),
                before,
                after,
            );
        }
    }

    let mut reach = merge_regions(collapse_destinations(raw, &membership), &regions);
    reach.sort_by_cached_key(|r| (r.from.to_string(), r.to.to_string(), r.change));

    let mut modes: Vec<ModeChange> = old
        .segments
        .iter()
        .filter_map(|o| {
            let n = new.segments.iter().find(|n| n.name == o.name)?;
            (o.mode != n.mode).then(|| ModeChange {
                segment: o.name.clone(),
                old: o.mode,
                new: n.mode,
            })
        })
        .collect();
    modes.sort_by(|a, b| a.segment.cmp(&b.segment));
    PolicyDiff { reach, modes }
}

/// Where `atom` is in the policy of `ev` (`None`: a device that is not in it).
fn place<'p>(ev: &Evaluator<'p>, atom: &Atom) -> Option<Place<'p>> {
    match atom {
        Atom::Device(id) => Some(Place::Device {
            device: ev.device(id)?,
            address: None,
        }),
        Atom::Gateway => Some(Place::Gateway { address: None }),
        Atom::Region(region) => Some(Place::Outside(region.cidr)),
    }
}

/// Segments in both policies, then groups of devices that joined, left or changed segment,
/// then quarantined devices.
fn source_classes<'a>(
    old: &'a Policy,
    new: &'a Policy,
    membership: &BTreeMap<&str, [Option<&str>; 2]>,
) -> Vec<SourceClass<'a>> {
    let allow_of = |policy: &'a Policy, name: Option<&str>| {
        let name = name?;
        policy
            .segments
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.allow.as_slice())
    };
    // A segment stands for the devices that stay in it; without any, its changes reach
    // nobody (and its devices' moves are listed below).
    let stays = |name: &str| {
        membership
            .values()
            .any(|&[o, n]| o == Some(name) && n == Some(name))
    };
    let mut classes: Vec<SourceClass> = old
        .segments
        .iter()
        .filter(|o| stays(&o.name))
        .map(|o| SourceClass {
            party: Party::Segment(o.name.clone()),
            old: allow_of(old, Some(&o.name)),
            new: allow_of(new, Some(&o.name)),
        })
        .collect();
    let mut groups: BTreeMap<[Option<&str>; 2], Vec<String>> = BTreeMap::new();
    for (&id, &[o, n]) in membership {
        if o.is_none() || o != n {
            groups.entry([o, n]).or_default().push(id.to_owned());
        }
    }
    classes.extend(groups.into_iter().map(|([o, n], ids)| SourceClass {
        party: Party::Devices {
            ids,
            old_segment: o.map(str::to_owned),
            new_segment: n.map(str::to_owned),
        },
        old: allow_of(old, o),
        new: allow_of(new, n),
    }));
    let quarantine = |p: &'a Policy| p.quarantine.as_ref().map(|q| q.allow.as_slice());
    classes.push(SourceClass {
        party: Party::Quarantined,
        old: quarantine(old),
        new: quarantine(new),
    });
    classes
}

/// Merges device destinations that changed alike: all the devices that stay in a segment
/// become that segment, others are listed with their move.
fn collapse_destinations(
    raw: Vec<(Change, Party, Atom, Services)>,
    membership: &BTreeMap<&str, [Option<&str>; 2]>,
) -> Vec<ReachChange> {
    let mut stayers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (&id, &[o, n]) in membership {
        if let [Some(o), Some(n)] = [o, n] {
            if o == n {
                stayers.entry(o).or_default().insert(id);
            }
        }
    }
    type Key = (Change, Party, Services);
    let mut devices: BTreeMap<(Key, [Option<&str>; 2]), BTreeSet<&str>> = BTreeMap::new();
    let mut out = Vec::new();
    for (change, from, atom, services) in raw {
        let to = match atom {
            Atom::Device(id) => {
                let Some((&id, &segments)) = membership.get_key_value(id.as_str()) else {
                    continue;
                };
                devices
                    .entry(((change, from, services), segments))
                    .or_default()
                    .insert(id);
                continue;
            }
            Atom::Gateway => Party::Gateway,
            Atom::Region(region) => region.party(),
        };
        out.push(ReachChange {
            change,
            from,
            to,
            services,
        });
    }
    for (((change, from, services), [o, n]), ids) in devices {
        let whole_segment = match (o, n) {
            (Some(o), Some(n)) if o == n => stayers.get(o).filter(|all| **all == ids).map(|_| o),
            _ => None,
        };
        let to = match whole_segment {
            Some(segment) => Party::Segment(segment.to_owned()),
            None => Party::Devices {
                ids: ids.into_iter().map(str::to_owned).collect(),
                old_segment: o.map(str::to_owned),
                new_segment: n.map(str::to_owned),
            },
        };
        out.push(ReachChange {
            change,
            from,
            to,
            services,
        });
    }
    out
}

/// Merges address blocks that changed alike with the same peer into the block they are holes
/// of, so that a new `to: 0.0.0.0/0` reads as one line rather than one per zone, and writes
/// each block as simply as it can be.
fn merge_regions(changes: Vec<ReachChange>, regions: &[Region]) -> Vec<ReachChange> {
    let by_cidr: BTreeMap<IpNet, &Region> = regions.iter().map(|r| (r.cidr, r)).collect();
    // (change, the other party, services, whether the block is the source) → blocks.
    type Key = (Change, Party, Services, bool);
    let mut groups: BTreeMap<Key, BTreeSet<IpNet>> = BTreeMap::new();
    let mut out = Vec::new();
    for c in changes {
        match (&c.from, &c.to) {
            (Party::Addresses { cidr, .. }, other) | (other, Party::Addresses { cidr, .. }) => {
                let is_source = matches!(c.from, Party::Addresses { .. });
                groups
                    .entry((c.change, other.clone(), c.services.clone(), is_source))
                    .or_default()
                    .insert(*cidr);
            }
            _ => out.push(c),
        }
    }
    for ((change, other, services, is_source), blocks) in groups {
        let absorbed: BTreeSet<IpNet> = blocks
            .iter()
            .flat_map(|b| by_cidr.get(b).into_iter().flat_map(|r| &r.except))
            .filter(|hole| blocks.contains(hole))
            .copied()
            .collect();
        for block in blocks.difference(&absorbed) {
            let Some(region) = by_cidr.get(block) else {
                continue;
            };
            let mut except = Vec::new();
            let mut pending = region.except.clone();
            while let Some(hole) = pending.pop() {
                match by_cidr.get(&hole) {
                    Some(inner) if absorbed.contains(&hole) => pending.extend(&inner.except),
                    _ => except.push(hole),
                }
            }
            except.sort();
            let merged = addresses(region.cidr, except, &region.zones);
            let (from, to) = if is_source {
                (merged, other.clone())
            } else {
                (other.clone(), merged)
            };
            out.push(ReachChange {
                change,
                from,
                to,
                services: services.clone(),
            });
        }
    }
    out
}

/// The blocks of outside addresses that the CIDRs of both policies single out.
fn regions(old: &Policy, new: &Policy) -> Vec<Region> {
    let mut cidrs = BTreeSet::new();
    let mut zones: Vec<(&str, IpNet)> = Vec::new();
    for policy in [old, new] {
        for zone in &policy.zones {
            for &cidr in &zone.cidrs {
                cidrs.insert(canonical_net(cidr));
                zones.push((&zone.name, canonical_net(cidr)));
            }
        }
        let allow = policy
            .segments
            .iter()
            .flat_map(|s| &s.allow)
            .chain(policy.quarantine.iter().flat_map(|q| &q.allow));
        for rule in allow {
            if let Target::Cidr(cidr) = rule.to {
                cidrs.insert(canonical_net(cidr));
            }
        }
        for rule in policy.segments.iter().flat_map(|s| &s.accept) {
            if let Source::Cidr(cidr) = rule.from {
                cidrs.insert(canonical_net(cidr));
            }
        }
    }
    cidrs
        .iter()
        .filter_map(|&cidr| {
            let inside: Vec<IpNet> = cidrs
                .iter()
                .copied()
                .filter(|&c| c != cidr && cidr.contains(&c))
                .collect();
            // CIDRs nest or are disjoint: the widest ones inside are the holes.
            let except: Vec<IpNet> = inside
                .iter()
                .copied()
                .filter(|&c| !inside.iter().any(|&o| o != c && o.contains(&c)))
                .collect();
            if covered(cidr, &except) {
                return None;
            }
            let names: BTreeSet<String> = zones
                .iter()
                .filter(|(_, c)| c.contains(&cidr))
                .map(|(name, _)| (*name).to_owned())
                .collect();
            Some(Region {
                cidr,
                except,
                zones: names.into_iter().collect(),
            })
        })
        .collect()
}

/// Whether the disjoint CIDRs `parts` (all inside `net`) cover all of it.
fn covered(net: IpNet, parts: &[IpNet]) -> bool {
    if parts.contains(&net) {
        return true;
    }
    if parts.is_empty() || net.prefix_len() == net.max_prefix_len() {
        return false;
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return false;
    };
    halves.into_iter().all(|half| {
        let inside: Vec<IpNet> = parts.iter().copied().filter(|p| half.contains(p)).collect();
        covered(half, &inside)
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::*;
    use crate::policy::load::load_dir;

    /// `segments/` (the smart factory) as it is and with `edit` applied to a copy of it.
    fn factory_change(edit: impl FnOnce(&Path)) -> PolicyDiff {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let tmp = tempfile::TempDir::new().expect("a temporary directory");
        for side in ["old", "new"] {
            fs::create_dir(tmp.path().join(side)).expect("a policy directory");
            for entry in fs::read_dir(&source).expect("segments/ is readable") {
                let path = entry.expect("a directory entry").path();
                let name = path.file_name().expect("a file name");
                fs::copy(&path, tmp.path().join(side).join(name)).expect("copied");
            }
        }
        edit(&tmp.path().join("new"));
        let old = load_dir(&tmp.path().join("old")).expect("the old policy loads");
        let new = load_dir(&tmp.path().join("new")).expect("the new policy loads");
        diff(&old, &new)
    }

    /// Replaces `from` (which must be there) with `to` in `dir/file`.
    fn replace(dir: &Path, file: &str, from: &str, to: &str) {
        let path = dir.join(file);
        let text = fs::read_to_string(&path).expect("readable");
        assert!(text.contains(from), "{from:?} is not in {file}");
        fs::write(&path, text.replacen(from, to, 1)).expect("writable");
    }

    fn lines(diff: &PolicyDiff) -> Vec<String> {
        let reach = diff.reach.iter().map(ToString::to_string);
        reach
            .chain(diff.modes.iter().map(ToString::to_string))
            .collect()
    }

    #[test]
    fn an_unchanged_policy_has_no_changes() {
        let diff = factory_change(|_| {});
        assert!(diff.is_empty(), "{:?}", lines(&diff));
    }

    #[test]
    fn ports_added_changed_and_removed() {
        let diff = factory_change(|dir| {
            replace(
                dir,
                "sensors.yaml",
                "[\"8883/tcp\"]",
                "[\"8883/tcp\", \"1883/tcp\"]",
            );
            replace(dir, "cameras.yaml", "[\"8883/tcp\"]", "[\"8884-8885/tcp\"]");
            replace(
                dir,
                "plcs.yaml",
                "  - to: robots\n    ports: [\"502/tcp\"]\n",
                "",
            );
        });
        assert_eq!(
            lines(&diff),
            [
                "+ cameras → mqtt-broker: 8884-8885/tcp",
                "- cameras → mqtt-broker: 8883/tcp",
                "- plcs → robots: 502/tcp",
                "+ sensors → mqtt-broker: 1883/tcp",
            ]
        );
        assert_eq!(
            (diff.count(Change::Gained), diff.count(Change::Lost)),
            (2, 2)
        );
    }

    #[test]
    fn a_device_moved_between_segments() {
        let diff = factory_change(|dir| {
            let vib =
                "  - id: vib-001\n    mac: \"02:00:00:00:10:03\"\n    addresses: [10.20.1.21]\n";
            replace(dir, "sensors.yaml", vib, "");
            replace(dir, "plcs.yaml", "allow:", &format!("{vib}allow:"));
        });
        // As a source it now has the PLCs' rules; as a destination their accept rules.
        assert_eq!(
            lines(&diff),
            [
                "+ 192.0.2.0/24 (zone ops-vpn) → vib-001 (moved sensors → plcs): 22/tcp",
                "+ 2001:db8:9::/48 (zone ops-vpn) → vib-001 (moved sensors → plcs): 22/tcp",
                "+ vib-001 (moved sensors → plcs) → robots: 502/tcp",
            ]
        );
    }

    #[test]
    fn devices_added_and_removed() {
        let diff = factory_change(|dir| {
            replace(
                dir,
                "cameras.yaml",
                "allow:",
                "  - id: cam-02\n    addresses: [10.20.2.22]\nallow:",
            );
            replace(
                dir,
                "plcs.yaml",
                "  - id: robot-1\n    mac: \"02:00:00:00:40:01\"\n    addresses: [10.20.4.1]\n",
                "",
            );
        });
        assert_eq!(
            lines(&diff),
            [
                "+ cam-02 (new in cameras) → 198.51.100.123/32 (zone ntp): 123/udp",
                "+ cam-02 (new in cameras) → mqtt-broker: 8883/tcp",
                "- plcs → robot-1 (removed from robots): 502/tcp",
                "- robot-1 (removed from robots) → 198.51.100.123/32 (zone ntp): 123/udp",
            ]
        );
    }

    #[test]
    fn a_zone_gains_and_loses_cidrs() {
        let diff = factory_change(|dir| {
            replace(dir, "zones.yaml", "[192.0.2.0/24,", "[192.0.3.0/25,");
            replace(dir, "zones.yaml", "[198.51.100.0/26]", "[198.51.100.0/25]");
        });
        assert_eq!(
            lines(&diff),
            [
                "- 192.0.2.0/24 (zone ops-vpn) → plcs: 22/tcp",
                "+ 192.0.3.0/25 (zone ops-vpn) → plcs: 22/tcp",
                "+ mqtt-broker → 198.51.100.64/26 (zone cloud-telemetry): 443/tcp, 8883/tcp",
            ]
        );
    }

    #[test]
    fn a_wide_rule_reads_as_one_block_with_what_it_already_had_left_out() {
        let diff = factory_change(|dir| {
            replace(
                dir,
                "broker.yaml",
                "  - to: ntp\n",
                "  - to: 0.0.0.0/0\n    ports: [any]\n  - to: ntp\n",
            );
        });
        assert_eq!(
            lines(&diff),
            [
                "+ mqtt-broker → 0.0.0.0/0 except 198.51.100.0/26, 198.51.100.123/32: any",
                "+ mqtt-broker → 198.51.100.0/26 (zone cloud-telemetry): any except 443/tcp, \
                 8883/tcp",
                "+ mqtt-broker → 198.51.100.123/32 (zone ntp): any except 123/udp",
                "+ mqtt-broker → cameras: any",
                "+ mqtt-broker → mqtt-broker: any",
                "+ mqtt-broker → plcs: any",
                "+ mqtt-broker → robots: any",
                "+ mqtt-broker → sensors: any",
            ]
        );
    }

    #[test]
    fn quarantine_rules_and_modes() {
        let diff = factory_change(|dir| {
            replace(
                dir,
                "quarantine.yaml",
                "[\"443/tcp\"]",
                "[\"443/tcp\", \"80/tcp\"]",
            );
            replace(dir, "cameras.yaml", "devices:", "mode: audit\ndevices:");
        });
        assert_eq!(
            lines(&diff),
            [
                "+ quarantined devices → 203.0.113.0/28 (zone remediation): 80/tcp",
                "~ segment cameras: mode enforce → audit: its would-be drops now pass and are \
                 reported as audit_deny",
            ]
        );
    }

    #[test]
    fn rules_to_a_device_and_to_the_gateway() {
        let diff = factory_change(|dir| {
            replace(
                dir,
                "sensors.yaml",
                "allow:",
                "allow:\n  - to: plc-7\n    ports: [\"502/tcp\"]\n  - to: gateway\n    \
                 ports: [\"53/udp\", icmp]",
            );
        });
        assert_eq!(
            lines(&diff),
            [
                "+ sensors → gateway: 53/udp, icmp",
                "+ sensors → plc-7 (plcs): 502/tcp",
            ]
        );
    }

    fn spec(protocol: Protocol, lo: u16, hi: u16) -> PortSpec {
        PortSpec {
            protocol,
            ports: lo..=hi,
            location: crate::policy::model::Location {
                file: std::sync::Arc::new("t.yaml".into()),
                line: 1,
                column: 1,
            },
        }
    }

    #[test]
    fn service_sets_subtract_and_print() {
        let all = Services::from_specs(&[spec(Protocol::Any, 0, u16::MAX)]);
        let web = Services::from_specs(&[
            spec(Protocol::Tcp, 443, 443),
            spec(Protocol::Tcp, 80, 80),
            spec(Protocol::Tcp, 81, 90),
        ]);
        assert_eq!(web.to_string(), "80-90/tcp, 443/tcp");
        assert_eq!(all.to_string(), "any");
        assert_eq!(all.specs(), ["any"]);
        assert_eq!(
            all.difference(&web).to_string(),
            "any except 80-90/tcp, 443/tcp"
        );
        assert_eq!(
            all.difference(&web).specs(),
            [
                "1-79/tcp",
                "91-442/tcp",
                "444-65535/tcp",
                "udp",
                "sctp",
                "icmp",
                "icmpv6",
                "other"
            ]
        );
        assert!(web.difference(&all).is_empty());
        // Port 0 is not a port: `tcp` is `1-65535/tcp`.
        let tcp = Services::from_specs(&[spec(Protocol::Tcp, 0, u16::MAX)]);
        assert!(tcp
            .difference(&Services::from_specs(&[spec(Protocol::Tcp, 1, u16::MAX)]))
            .is_empty());
        assert_eq!(tcp.to_string(), "tcp");
        let icmp = Services::from_specs(&[spec(Protocol::Icmp, 0, u16::MAX)]);
        assert_eq!(tcp.difference(&icmp), tcp);
        assert_eq!(icmp.to_string(), "icmp");
        assert_eq!(Services::default().to_string(), "");
    }

    #[test]
    fn covered_blocks_are_not_regions() {
        let net = |s: &str| s.parse::<IpNet>().expect("a CIDR");
        let halves = [net("10.0.0.0/25"), net("10.0.0.128/25")];
        assert!(covered(net("10.0.0.0/24"), &halves));
        assert!(!covered(net("10.0.0.0/23"), &halves));
        assert!(!covered(net("10.0.0.0/24"), &halves[..1]));
        assert!(covered(net("::/0"), &[net("::/1"), net("8000::/1")]));
        assert!(!covered(net("::/0"), &[]));
    }

    #[test]
    fn a_block_with_holes_is_one_cidr_when_it_can_be() {
        let net = |s: &str| s.parse::<IpNet>().expect("a CIDR");
        assert_eq!(
            remainder(net("10.0.0.0/15"), &[net("10.0.0.0/16")]),
            Some(net("10.1.0.0/16"))
        );
        assert_eq!(
            remainder(
                net("10.0.0.0/24"),
                &[net("10.0.0.0/26"), net("10.0.0.64/26")]
            ),
            Some(net("10.0.0.128/25"))
        );
        assert_eq!(remainder(net("10.0.0.0/24"), &[net("10.0.0.64/26")]), None);
        assert_eq!(remainder(net("10.0.0.0/24"), &[]), Some(net("10.0.0.0/24")));
        assert_eq!(remainder(net("10.0.0.1/32"), &[net("10.0.0.1/32")]), None);
    }
}
