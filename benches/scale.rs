//! The policies the benchmarks run against: generated YAML, loaded by the real loader.
//!
//! A scale has `devices` devices in segments of equal size and `rules` allow rules spread
//! over the segments. Rules go to zones (the second of every ten to the next segment), on ports
//! that differ per rule, so no rule covers another. Zones are /24s in 172.16.0.0/12, two
//! CIDRs each; devices are numbered upwards from 10.64.0.1, with MACs 02:64:<number>.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub name: &'static str,
    pub devices: u32,
    pub rules: u32,
    pub zone_cidrs: u32,
}

impl Scale {
    pub const SMALL: Scale = Scale {
        name: "10 devices / 10 rules",
        devices: 10,
        rules: 10,
        zone_cidrs: 4,
    };
    pub const MEDIUM: Scale = Scale {
        name: "1k devices / 1k rules",
        devices: 1_000,
        rules: 1_000,
        zone_cidrs: 100,
    };
    pub const LARGE: Scale = Scale {
        name: "100k devices / 10k rules / 1k zone CIDRs",
        devices: 100_000,
        rules: 10_000,
        zone_cidrs: 1_000,
    };

    /// Devices per segment.
    fn segment_size(&self) -> u32 {
        match self.devices {
            0..=10 => 5,
            11..=1_000 => 100,
            _ => 1_000,
        }
    }

    pub fn segments(&self) -> u32 {
        self.devices.div_ceil(self.segment_size())
    }

    fn zones(&self) -> u32 {
        self.zone_cidrs.div_ceil(2)
    }
}

/// Device number `i` (0-based): its id and address.
pub fn device(i: u32) -> (String, Ipv4Addr) {
    (
        format!("dev-{i}"),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i),
    )
}

/// Device number `i`'s MAC address (DHCP leases name devices by it).
pub fn device_mac(i: u32) -> [u8; 6] {
    let [a, b, c, d] = i.to_be_bytes();
    [0x02, 0x64, a, b, c, d]
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Zone CIDR number `i`: a /24 in 172.16.0.0/12.
pub fn zone_cidr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + (i << 8))
}

/// The allow rules of segment `s`: (zone or segment name, port, protocol).
pub fn segment_rules(scale: &Scale, s: u32) -> Vec<(String, u16, &'static str)> {
    let per_segment = scale.rules / scale.segments();
    let extra = u32::from(s < scale.rules % scale.segments());
    (0..per_segment + extra)
        .map(|r| {
            let port = 1_000 + r as u16;
            if r % 10 == 1 {
                (format!("seg-{}", (s + 1) % scale.segments()), port, "udp")
            } else {
                (format!("zone-{}", (s * 7 + r) % scale.zones()), port, "tcp")
            }
        })
        .collect()
}

/// Writes the policy of `scale` as YAML files into `dir`; returns `dir`.
pub fn write_policy(scale: &Scale, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut zones = String::new();
    for z in 0..scale.zones() {
        let cidrs: Vec<String> = (0..2)
            .map(|c| 2 * z + c)
            .filter(|&i| i < scale.zone_cidrs)
            .map(|i| format!("{}/24", zone_cidr(i)))
            .collect();
        writeln!(
            zones,
            "---\nkind: Zone\nname: zone-{z}\ncidrs: [{}]",
            cidrs.join(", ")
        )?;
    }
    writeln!(
        zones,
        "---\nkind: Quarantine\nallow:\n  - to: zone-0\n    ports: [\"443/tcp\"]"
    )?;
    write(dir, "zones.yaml", &zones)?;
    let size = scale.segment_size();
    for s in 0..scale.segments() {
        let mut doc = format!("kind: Segment\nname: seg-{s}\ndevices:\n");
        for i in s * size..((s + 1) * size).min(scale.devices) {
            let (id, addr) = device(i);
            let mac = mac_text(device_mac(i));
            writeln!(
                doc,
                "  - id: {id}\n    mac: \"{mac}\"\n    addresses: [{addr}]"
            )?;
        }
        doc.push_str("allow:\n");
        for (to, port, proto) in segment_rules(scale, s) {
            writeln!(doc, "  - to: {to}\n    ports: [\"{port}/{proto}\"]")?;
        }
        write(dir, &format!("seg-{s}.yaml"), &doc)?;
    }
    Ok(dir.to_path_buf())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}
