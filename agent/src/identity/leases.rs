//! dnsmasq's lease file: which device (MAC) holds which address, and until when.
//!
//! One lease per line. DHCPv4: `<expiry> <MAC> <IPv4> <hostname|*> <client-id|*>`. DHCPv6,
//! after a `duid <server DUID>` line: `<expiry> <[T]IAID> <IPv6> <hostname|*> <client DUID|*>`.
//! The expiry is in seconds since the epoch, 0 meaning never. A DHCPv6 lease names no MAC; it
//! is taken from the client's DUID when that is a DUID-LLT or DUID-LL of an Ethernet interface.
//!
//! dnsmasq rewrites the file in place (truncate, then write), so a reader may see it half
//! written. Parsing therefore never fails as a whole: each bad line is a [`LeaseProblem`] and
//! the other lines still count. A line cut short loses fields or bytes of its DUID, so it is a
//! problem rather than a lease with a wrong address or MAC.

use std::{
    collections::{btree_map::Entry, BTreeMap},
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::watch::Watch;

/// How long the watcher waits for a burst of changes to end before it reports them.
const DEBOUNCE: Duration = Duration::from_millis(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// `None`: the lease never expires.
    pub expires: Option<SystemTime>,
    pub mac: [u8; 6],
    /// IPv4 addresses are always `IpAddr::V4`.
    pub address: IpAddr,
    pub hostname: Option<String>,
}

/// A line that yields no lease. `line` is 1-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseProblem {
    pub line: usize,
    pub message: String,
}

impl LeaseProblem {
    /// `{path}:{line}: {message}`
    pub fn display<'a>(&'a self, path: &'a Path) -> impl fmt::Display + 'a {
        struct WithPath<'a>(&'a LeaseProblem, &'a Path);
        impl fmt::Display for WithPath<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "{}:{}: {}",
                    self.1.display(),
                    self.0.line,
                    self.0.message
                )
            }
        }
        WithPath(self, path)
    }
}

impl fmt::Display for LeaseProblem {
    /// `line {line}: {message}` (see [`LeaseProblem::display`] for the form with the path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseFile {
    pub leases: Vec<Lease>,
    pub problems: Vec<LeaseProblem>,
}

#[derive(thiserror::Error, Debug)]
pub enum LeaseError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Parses the text of a lease file. Blank lines and the `duid` line are skipped.
pub fn parse(text: &str) -> LeaseFile {
    let mut file = LeaseFile::default();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || fields[0] == "duid" {
            continue;
        }
        match parse_line(&fields) {
            Ok(lease) => file.leases.push(lease),
            Err(message) => file.problems.push(LeaseProblem {
                line: index + 1,
                message,
            }),
        }
    }
    file
}

/// Reads and parses a lease file. A missing file holds no leases (dnsmasq has not written it
/// yet); any other I/O error is an error. Bytes that are not UTF-8 only spoil their line.
pub fn read(path: &Path) -> Result<LeaseFile, LeaseError> {
    match fs::read(path) {
        Ok(bytes) => Ok(parse(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LeaseFile::default()),
        Err(source) => Err(LeaseError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The address → MAC bindings in force at `now`: unexpired leases; when two leases name the
/// same address, the one that expires last wins (on a tie, the later line).
pub fn active(file: &LeaseFile, now: SystemTime) -> BTreeMap<IpAddr, [u8; 6]> {
    // `None` (infinite) sorts after every `Some`, so it wins; this is what we want.
    let lasts_longer = |a: Option<SystemTime>, b: Option<SystemTime>| match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a >= b,
    };
    let mut chosen: BTreeMap<IpAddr, &Lease> = BTreeMap::new();
    for lease in &file.leases {
        if lease.expires.is_some_and(|expires| expires <= now) {
            continue;
        }
        match chosen.entry(lease.address) {
            Entry::Vacant(entry) => {
                entry.insert(lease);
            }
            Entry::Occupied(mut entry) => {
                if lasts_longer(lease.expires, entry.get().expires) {
                    entry.insert(lease);
                }
            }
        }
    }
    chosen
        .into_iter()
        .map(|(address, lease)| (address, lease.mac))
        .collect()
}

/// Watches the lease file: [`Watch::changes`] gets a message after each change (debounced
/// by ~10 ms to coalesce bursts), also when the file is created, replaced by a rename or
/// removed. The parent directory is watched, since the file may be replaced.
pub fn watch(path: &Path) -> Result<Watch, LeaseError> {
    let name = path
        .file_name()
        .ok_or_else(|| LeaseError::Watch {
            path: path.to_path_buf(),
            source: notify::Error::generic("the lease file path does not end in a file name"),
        })?
        .to_owned();
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    crate::watch::watch(&[(&dir, false)], DEBOUNCE, move |p| {
        p.file_name() == Some(name.as_os_str())
    })
    .map_err(|e| LeaseError::Watch {
        path: e.path,
        source: e.source,
    })
}

fn parse_line(fields: &[&str]) -> Result<Lease, String> {
    let [expiry, id, address, hostname, client] = *fields else {
        return Err(format!(
            "expected 5 fields (expiry, MAC or IAID, address, hostname, client id), found {}",
            fields.len()
        ));
    };
    let expires = match expiry.parse::<u64>() {
        Ok(0) => None,
        Ok(secs) => Some(
            UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .ok_or_else(|| format!("expiry {expiry} is out of range"))?,
        ),
        Err(_) => {
            return Err(format!(
                "invalid expiry {expiry:?} (expected epoch seconds)"
            ))
        }
    };
    let (address, mac) = if let Ok(v4) = address.parse::<Ipv4Addr>() {
        let mac = parse_mac(id).ok_or_else(|| {
            format!("invalid MAC address {id:?} (expected an Ethernet MAC, aa:bb:cc:dd:ee:ff)")
        })?;
        (IpAddr::V4(v4), mac)
    } else if let Ok(v6) = address.parse::<Ipv6Addr>() {
        let iaid = id.strip_prefix('T').unwrap_or(id);
        if iaid.parse::<u32>().is_err() {
            return Err(format!("invalid IAID {id:?} in a DHCPv6 lease"));
        }
        (IpAddr::V6(v6).to_canonical(), mac_from_duid(client)?)
    } else {
        return Err(format!("invalid IP address {address:?}"));
    };
    Ok(Lease {
        expires,
        mac,
        address,
        hostname: (hostname != "*").then(|| hostname.to_owned()),
    })
}

/// Colon-separated pairs of hex digits.
fn parse_hex(text: &str) -> Option<Vec<u8>> {
    text.split(':')
        .map(|pair| {
            (pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u8::from_str_radix(pair, 16).ok())
                .flatten()
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    parse_hex(text)?.try_into().ok()
}

/// The MAC inside a DUID-LLT (type 1) or DUID-LL (type 3) of hardware type 1 (Ethernet).
fn mac_from_duid(duid: &str) -> Result<[u8; 6], String> {
    if duid == "*" {
        return Err("DHCPv6 lease without a client DUID: no MAC to bind, skipped".into());
    }
    let bytes = parse_hex(duid).ok_or_else(|| format!("invalid client DUID {duid:?}"))?;
    let mac = match bytes.as_slice() {
        [0, 1, 0, 1, _, _, _, _, mac @ ..] | [0, 3, 0, 1, mac @ ..] => mac.try_into().ok(),
        _ => None,
    };
    mac.ok_or_else(|| {
        format!(
            "client DUID {duid} is not a DUID-LLT or DUID-LL of an Ethernet interface: \
             no MAC to bind, lease skipped"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC1: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x01];
    const MAC2: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x02];

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v4_and_v6_leases() {
        let file = parse(
            "1700000000 02:00:00:00:10:01 10.20.1.11 temp-001 01:02:00:00:00:10:01\n\
             0 02:00:00:00:10:02 10.20.1.12 * *\n\
             duid 00:01:00:01:2c:5a:3b:1e:52:54:00:12:34:56\n\
             1700000100 12345 2001:db8::11 temp-001 00:01:00:01:2c:5a:3b:1e:02:00:00:00:10:01\n\
             0 T7 2001:db8::12 * 00:03:00:01:02:00:00:00:10:02\n\
             1700000100 1 2001:db8::13 * 00:02:00:00:ab:11:01:02:03:04\n",
        );
        assert_eq!(
            file.leases,
            vec![
                Lease {
                    expires: Some(at(1_700_000_000)),
                    mac: MAC1,
                    address: ip("10.20.1.11"),
                    hostname: Some("temp-001".into()),
                },
                Lease {
                    expires: None,
                    mac: MAC2,
                    address: ip("10.20.1.12"),
                    hostname: None,
                },
                Lease {
                    expires: Some(at(1_700_000_100)),
                    mac: MAC1,
                    address: ip("2001:db8::11"),
                    hostname: Some("temp-001".into()),
                },
                Lease {
                    expires: None,
                    mac: MAC2,
                    address: ip("2001:db8::12"),
                    hostname: None,
                },
            ]
        );
        assert!(matches!(file.leases[0].address, IpAddr::V4(_)));
        // The DUID-EN lease names no MAC: skipped with a note.
        assert_eq!(file.problems.len(), 1, "{:?}", file.problems);
        assert_eq!(file.problems[0].line, 6);
        assert!(
            file.problems[0]
                .message
                .contains("not a DUID-LLT or DUID-LL"),
            "{}",
            file.problems[0].message
        );
        assert_eq!(
            file.problems[0]
                .display(Path::new("/var/lib/misc/dnsmasq.leases"))
                .to_string(),
            format!(
                "/var/lib/misc/dnsmasq.leases:6: {}",
                file.problems[0].message
            )
        );
    }

    #[test]
    fn duids_that_name_no_ethernet_mac() {
        for duid in [
            "*",
            // DUID-LL of a non-Ethernet hardware type.
            "00:03:00:06:02:00:00:00:10:02",
            // DUID-LLT and DUID-LL cut short, or too long.
            "00:01:00:01:2c:5a:3b:1e:02:00:00:00:10",
            "00:03:00:01:02:00:00:00:10",
            "00:03:00:01:02:00:00:00:10:02:03",
            "00:03:00:01:02:00:00:00:10:0",
            "00:03:00:01:02:00:00:00:10:",
            // DUID-UUID.
            "00:04:01:02:03:04:05:06:07:08:09:0a:0b:0c:0d:0e:0f:10",
        ] {
            let file = parse(&format!("0 1 2001:db8::1 * {duid}\n"));
            assert!(file.leases.is_empty(), "{duid}: {:?}", file.leases);
            assert_eq!(file.problems.len(), 1, "{duid}");
        }
    }

    #[test]
    fn bad_lines_are_problems_and_the_rest_still_count() {
        let file = parse(
            "garbage\n\
             \n\
             1700000000 02:00:00:00:10:01 10.20.1.11 a *\n\
             soon 02:00:00:00:10:01 10.20.1.13 a *\n\
             1700000000 02:00:00:00:10 10.20.1.14 a *\n\
             1700000000 02:00:00:00:10:01 10.20.1.300 a *\n\
             1700000000 06-02:00:00:00:10:01 10.20.1.15 a *\n\
             1700000000 x 2001:db8::1 a 00:03:00:01:02:00:00:00:10:02\n\
             1700000000 02:00:00:00:10:02 10.20.1.12 b *\n\
             1700000000 02:00:00:00:10:03 10.20",
        );
        let addresses: Vec<_> = file.leases.iter().map(|l| l.address).collect();
        assert_eq!(addresses, [ip("10.20.1.11"), ip("10.20.1.12")]);
        let lines: Vec<_> = file.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [1, 4, 5, 6, 7, 8, 10]);
        assert!(file.problems[0].message.contains("expected 5 fields"));
        assert!(file.problems[1].message.contains("invalid expiry"));
        assert!(file.problems[2].message.contains("invalid MAC"));
        assert!(file.problems[3].message.contains("invalid IP address"));
        assert!(file.problems[5].message.contains("invalid IAID"));
    }

    #[test]
    fn a_file_cut_anywhere_yields_only_true_leases() {
        let text = "1700000000 02:00:00:00:10:01 10.20.1.11 temp-001 01:02:00:00:00:10:01\n\
                    duid 00:01:00:01:2c:5a:3b:1e:52:54:00:12:34:56\n\
                    0 12345 2001:db8::11 temp-001 00:01:00:01:2c:5a:3b:1e:02:00:00:00:10:01\n\
                    0 7 2001:db8::12 * 00:03:00:01:02:00:00:00:10:02\n";
        let whole = parse(text);
        assert_eq!(whole.leases.len(), 3);
        assert!(whole.problems.is_empty());
        for cut in 0..text.len() {
            let part = parse(&text[..cut]);
            for lease in &part.leases {
                let same = whole
                    .leases
                    .iter()
                    .any(|l| l.address == lease.address && l.mac == lease.mac);
                assert!(same, "cut at {cut}: {lease:?}");
            }
            let complete_lines = text[..cut].matches('\n').count();
            assert!(part.problems.iter().all(|p| p.line > complete_lines));
        }
    }

    #[test]
    fn active_bindings() {
        let file = parse(
            "100 02:00:00:00:10:01 10.0.0.1 * *\n\
             300 02:00:00:00:10:02 10.0.0.1 * *\n\
             200 02:00:00:00:10:01 10.0.0.1 * *\n\
             0 02:00:00:00:10:01 10.0.0.2 * *\n\
             500 02:00:00:00:10:02 10.0.0.2 * *\n\
             150 02:00:00:00:10:01 10.0.0.3 * *\n\
             400 02:00:00:00:10:02 10.0.0.4 * *\n\
             400 02:00:00:00:10:01 10.0.0.4 * *\n",
        );
        let bindings = active(&file, at(150));
        assert_eq!(
            bindings.into_iter().collect::<Vec<_>>(),
            [
                // Latest expiry wins, whatever the order of the lines.
                (ip("10.0.0.1"), MAC2),
                // Infinite beats any expiry.
                (ip("10.0.0.2"), MAC1),
                // 10.0.0.3 expires at exactly `now`: gone. A tie goes to the later line.
                (ip("10.0.0.4"), MAC1),
            ]
        );
        // Once the latest lease has expired, the address is free, even though an earlier
        // lease of another device had been listed.
        let bindings = active(&file, at(1000));
        assert_eq!(
            bindings.into_iter().collect::<Vec<_>>(),
            [(ip("10.0.0.2"), MAC1)]
        );
    }

    #[test]
    fn missing_file_is_empty_and_other_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("dnsmasq.leases");
        assert_eq!(read(&missing).unwrap(), LeaseFile::default());

        let err = read(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}:", dir.path().display())),
            "{err}"
        );

        fs::write(&missing, b"0 02:00:00:00:10:01 10.0.0.1 \xff *\n").unwrap();
        let file = read(&missing).unwrap();
        assert_eq!(file.leases.len(), 1);
    }

    #[tokio::test]
    async fn watcher_reports_changes_to_the_file_only() {
        use tokio::time::{sleep, timeout};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnsmasq.leases");
        let mut watch = watch(&path).unwrap();
        let rx = &mut watch.changes;

        async fn changed(rx: &mut tokio::sync::mpsc::Receiver<()>, what: &str) {
            timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no notification after {what}"))
                .expect("watcher ended");
            // Let the burst end, then forget whatever else it reported.
            sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
        }
        async fn quiet(rx: &mut tokio::sync::mpsc::Receiver<()>, what: &str) {
            let got = timeout(Duration::from_millis(300), rx.recv()).await;
            assert!(got.is_err(), "notified after {what}");
        }

        quiet(rx, "nothing").await;
        fs::write(&path, "0 02:00:00:00:10:01 10.0.0.1 * *\n").unwrap();
        changed(rx, "creating the file").await;

        fs::write(dir.path().join("other"), "x").unwrap();
        quiet(rx, "writing another file").await;

        // Reading the file (open, close) is not a change.
        read(&path).unwrap();
        quiet(rx, "reading the file").await;

        let tmp = dir.path().join("dnsmasq.leases.new");
        fs::write(&tmp, "0 02:00:00:00:10:02 10.0.0.1 * *\n").unwrap();
        fs::rename(&tmp, &path).unwrap();
        changed(rx, "replacing the file by a rename").await;

        fs::write(&path, "0 02:00:00:00:10:03 10.0.0.1 * *\n").unwrap();
        changed(rx, "rewriting the file in place").await;

        fs::remove_file(&path).unwrap();
        changed(rx, "removing the file").await;
        quiet(rx, "the removal's burst").await;
    }
}
