//! Work on the interfaces of a named network namespace (`ip netns`) while the process
//! itself, its pins, socket and files stay in the host's namespaces (SPEC §3 `--netns`).
//!
//! Network namespaces are per thread: a scoped thread enters the namespace, does the
//! netlink/ifindex work there, and ends, so no other thread ever changes namespace.

use std::{fs::File, net::IpAddr, path::PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {name:?} not found ({path}): {source}")]
    Open {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name:?}: {source}")]
    Enter { name: String, source: nix::Error },
    #[error("cannot list the addresses of the gateway: {0}")]
    Addresses(nix::Error),
}

/// The namespace the gateway's interfaces live in: a named one, or the process's own.
#[derive(Debug)]
pub struct Netns {
    named: Option<(String, File)>,
}

impl Netns {
    pub fn current() -> Self {
        Netns { named: None }
    }

    /// A namespace made by `ip netns add NAME` (a bind mount in /run/netns).
    pub fn named(name: &str) -> Result<Self, NetnsError> {
        let path = PathBuf::from("/run/netns").join(name);
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            name: name.into(),
            path,
            source,
        })?;
        Ok(Netns {
            named: Some((name.into(), file)),
        })
    }

    /// Runs `f` with the calling thread's view of the network being this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let Some((name, file)) = &self.named else {
            return Ok(f());
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                        name: name.clone(),
                        source,
                    })?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The gateway's own addresses (every interface but loopback), for `gateway` targets.
    pub fn gateway_addresses(&self) -> Result<Vec<IpAddr>, NetnsError> {
        self.run(|| {
            let mut addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
                .map_err(NetnsError::Addresses)?
                .filter_map(|ifa| {
                    let a = ifa.address?;
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .filter(|ip| !ip.is_loopback())
                .collect();
            addrs.sort();
            addrs.dedup();
            Ok(addrs)
        })?
    }
}
