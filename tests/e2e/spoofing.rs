//! Anti-spoofing (SPEC §2 rules 1 and 2): a device that forges a pinned device's address,
//! in IP or in ARP, is dropped.

use std::{os::fd::AsRawFd as _, time::Duration};

use socket2::{Domain, Socket, Type};

use crate::lab::{Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: ["123/udp"]
"#;

/// An ARP reply claiming that `ip` is at `mac`, as an ARP-poisoning tool sends it.
fn forged_arp(mac: [u8; 6], ip: [u8; 4], target_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&[10, 254, 254, 1]);
    f
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap();
    }
    out
}

/// Sends a raw Ethernet frame out of `eth0` of the calling thread's namespace.
fn send_raw(frame: &[u8]) {
    let socket = Socket::new(Domain::PACKET, Type::RAW, None).expect("AF_PACKET socket");
    let ifindex = nix::net::if_::if_nametoindex("eth0").expect("eth0");
    // SAFETY: a zeroed sockaddr_ll with family, ifindex and address length filled in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: frame and addr are valid for the call.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(sent, frame.len() as isize, "sending the raw frame");
}

#[test]
fn ip_and_arp_spoofers_are_dropped() {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["10.20.1.11"])
        .device_with_mac("impostor", "02:00:00:00:66:66", &["10.20.1.66"])
        .uplink_host("198.51.100.10")
        .build();
    lab.write_policy(POLICY);
    let ntp = lab.udp_echo_server(UPLINK, "198.51.100.10:123");
    let impostor_iface = lab.device_iface("impostor").to_string();
    // Unfiltered, the gateway would take the forged ARP into its neighbour table.
    lab.exec_ok(
        "gateway",
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{impostor_iface}.arp_accept=1"),
        ],
    );
    let mut daemon = lab.start_enforcing(&[]);

    // The real device may do what its segment allows.
    lab.assert_passes("temp-001", &Probe::udp("198.51.100.10:123"));
    let genuine = ntp.peers().len();

    // The impostor forges temp-001's address: what temp-001 may do, it may not.
    lab.assert_dropped(
        "impostor",
        &Probe::udp("198.51.100.10:123").from("10.20.1.11"),
    );
    assert_eq!(
        ntp.peers().len(),
        genuine,
        "a datagram with a forged source got through"
    );

    let gateway_mac = mac_bytes(lab.gateway_mac("impostor"));
    let impostor_mac = mac_bytes(lab.device_mac("impostor"));
    lab.run_in("impostor", || {
        for _ in 0..3 {
            send_raw(&forged_arp(impostor_mac, [10, 20, 1, 11], gateway_mac));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let neighbours = lab.exec_ok("gateway", &["ip", "neigh", "show", "dev", &impostor_iface]);
    assert!(
        !neighbours.contains("10.20.1.11"),
        "the forged ARP reached the gateway's neighbour table:\n{neighbours}"
    );

    daemon.stop();
    let spoofs = daemon.logged_counter(Some("spoof"), "packets").unwrap_or(0);
    assert!(
        spoofs >= 4,
        "the IP and ARP forgeries were counted as spoofs ({spoofs})\n{}",
        daemon.output_so_far()
    );
}
