//! Where device addresses come from besides the policy: DHCP leases ([`leases`]) and
//! `segward bind` from an external identity system.
//!
//! An address has one owner at a time. The policy's static addresses win over everything
//! (a lease or bind for one of them is ignored), and a `bind` wins over a lease: an external
//! identity system is a deliberate statement, a lease only what DHCP handed out.

pub mod leases;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

/// Where a learned address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingSource {
    Lease,
    Bind,
}

impl BindingSource {
    pub fn name(self) -> &'static str {
        match self {
            BindingSource::Lease => "lease",
            BindingSource::Bind => "bind",
        }
    }
}

/// Addresses learned at run time, by source (device ids as values).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bindings {
    /// From `segward bind`; kept in the daemon's state directory.
    pub binds: BTreeMap<IpAddr, String>,
    /// From the lease file; read again at start.
    pub leases: BTreeMap<IpAddr, String>,
}

/// An address that changed owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub address: IpAddr,
    pub from: Option<(String, BindingSource)>,
    pub to: Option<(String, BindingSource)>,
}

impl Bindings {
    /// Who owns each learned address, leaving out the addresses that the policy binds
    /// statically (`is_static`).
    pub fn owners(
        &self,
        is_static: impl Fn(IpAddr) -> bool,
    ) -> BTreeMap<IpAddr, (String, BindingSource)> {
        let leases = self
            .leases
            .iter()
            .map(|(a, d)| (*a, (d.clone(), BindingSource::Lease)));
        let binds = self
            .binds
            .iter()
            .map(|(a, d)| (*a, (d.clone(), BindingSource::Bind)));
        // Later entries win: binds over leases.
        leases
            .chain(binds)
            .filter(|(a, _)| !is_static(*a))
            .collect()
    }

    /// The learned addresses by device, as the compiler takes them.
    pub fn by_device(
        &self,
        is_static: impl Fn(IpAddr) -> bool,
    ) -> BTreeMap<String, BTreeSet<IpAddr>> {
        let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for (address, (device, _)) in self.owners(is_static) {
            out.entry(device).or_default().insert(address);
        }
        out
    }
}

/// The addresses whose owner differs between `before` and `after`.
pub fn moves(
    before: &BTreeMap<IpAddr, (String, BindingSource)>,
    after: &BTreeMap<IpAddr, (String, BindingSource)>,
) -> Vec<Move> {
    let addresses: BTreeSet<&IpAddr> = before.keys().chain(after.keys()).collect();
    addresses
        .into_iter()
        .filter_map(|a| {
            let (from, to) = (before.get(a), after.get(a));
            (from != to).then(|| Move {
                address: *a,
                from: from.cloned(),
                to: to.cloned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binds_win_over_leases_and_statics_over_both() {
        let is_static = |a: IpAddr| a == ip("10.0.0.1");
        let mut b = Bindings::default();
        b.leases.insert(ip("10.0.0.1"), "cam".into());
        b.leases.insert(ip("10.0.0.2"), "cam".into());
        b.binds.insert(ip("10.0.0.2"), "sensor".into());
        b.leases.insert(ip("10.0.0.3"), "cam".into());
        let owners = b.owners(is_static);
        assert_eq!(
            owners.get(&ip("10.0.0.1")),
            None,
            "a static address is never learned"
        );
        assert_eq!(
            owners.get(&ip("10.0.0.2")),
            Some(&("sensor".to_string(), BindingSource::Bind))
        );
        assert_eq!(
            owners.get(&ip("10.0.0.3")),
            Some(&("cam".to_string(), BindingSource::Lease))
        );
        let by_device = b.by_device(is_static);
        assert_eq!(by_device["cam"], BTreeSet::from([ip("10.0.0.3")]));
    }

    #[test]
    fn moves_name_every_changed_owner() {
        let is_static = |_| false;
        let mut b = Bindings::default();
        b.leases.insert(ip("10.0.0.5"), "a".into());
        b.leases.insert(ip("10.0.0.6"), "a".into());
        let before = b.owners(is_static);
        b.leases.insert(ip("10.0.0.5"), "b".into());
        b.leases.remove(&ip("10.0.0.6"));
        b.binds.insert(ip("10.0.0.7"), "c".into());
        let m = moves(&before, &b.owners(is_static));
        let summary: Vec<_> = m
            .iter()
            .map(|m| {
                (
                    m.address.to_string(),
                    m.from.as_ref().map(|f| f.0.as_str()),
                    m.to.as_ref().map(|t| t.0.as_str()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("10.0.0.5".into(), Some("a"), Some("b")),
                ("10.0.0.6".into(), Some("a"), None),
                ("10.0.0.7".into(), None, Some("c")),
            ]
        );
    }
}
