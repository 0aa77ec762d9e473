//! Where device addresses come from besides the policy: DHCP leases, `segward bind`.

pub mod leases;
