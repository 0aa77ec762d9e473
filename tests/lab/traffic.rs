//! Real traffic: probes (TCP/UDP/ICMP, each bounded in time), echo servers, and held TCP
//! connections. Everything here runs inside a namespace via `netns::run_in`/`spawn_in`;
//! the functions in this file assume the calling thread is already in the right one.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Anything that names one IP address: `"10.20.1.11"`, an `IpAddr`, `Ipv4Addr`, `Ipv6Addr`.
pub trait IpLike {
    fn to_ip(&self) -> IpAddr;
}

impl IpLike for &str {
    fn to_ip(&self) -> IpAddr {
        self.parse()
            .unwrap_or_else(|_| panic!("{self:?} is not an IP address"))
    }
}
impl IpLike for String {
    fn to_ip(&self) -> IpAddr {
        self.as_str().to_ip()
    }
}
impl IpLike for IpAddr {
    fn to_ip(&self) -> IpAddr {
        *self
    }
}
impl IpLike for Ipv4Addr {
    fn to_ip(&self) -> IpAddr {
        IpAddr::V4(*self)
    }
}
impl IpLike for Ipv6Addr {
    fn to_ip(&self) -> IpAddr {
        IpAddr::V6(*self)
    }
}

/// `"10.0.0.1:80"`, `("10.0.0.1", 80)`, `"[fd00::1]:80"` or a `SocketAddr` -> `SocketAddr`.
/// IP literals only (no name resolution happens for them).
pub fn sockaddr(a: impl ToSocketAddrs + fmt::Debug) -> SocketAddr {
    a.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .unwrap_or_else(|| panic!("{a:?} is not a socket address"))
}

/// What became of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The flow went through both ways (TCP: connected and a line was echoed; UDP: the
    /// datagram was echoed; ICMP: echo reply from the destination).
    Passed,
    /// Nothing came back within the timeout: what a dropped packet looks like.
    TimedOut,
    /// TCP RST / ICMP port unreachable: the packet reached the destination host, which has
    /// no listener there. NOT a drop.
    Refused,
    /// An ICMP unreachable/time-exceeded came back (e.g. the gateway has no route). The
    /// kernel rate-limits these per source (a burst of 5, then about 1/s), so a test that
    /// sends many probes into nowhere should assert `!passed()` rather than this.
    Unreachable(String),
    /// Anything else, e.g. connected but no echo.
    Error(String),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        *self == Outcome::Passed
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed => write!(f, "passed"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::Refused => write!(f, "refused"),
            Outcome::Unreachable(s) => write!(f, "unreachable ({s})"),
            Outcome::Error(s) => write!(f, "error ({s})"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// One flow to try: `Probe::tcp("198.51.100.10:8883")`, `Probe::udp(..)`,
/// `Probe::icmp("10.20.2.21")`, optionally `.from("10.20.1.99")` to pick (or spoof: the
/// socket uses IP_TRANSPARENT) the source address.
///
/// A probe sends exactly one UDP datagram / one ICMP echo request; for TCP the kernel sends
/// the SYN (and retransmits it if the timeout is longer than the 1 s initial RTO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub proto: Proto,
    pub dst: SocketAddr,
    pub src: Option<IpAddr>,
}

impl Probe {
    pub fn tcp(dst: impl ToSocketAddrs + fmt::Debug) -> Probe {
        Probe {
            proto: Proto::Tcp,
            dst: sockaddr(dst),
            src: None,
        }
    }
    pub fn udp(dst: impl ToSocketAddrs + fmt::Debug) -> Probe {
        Probe {
            proto: Proto::Udp,
            dst: sockaddr(dst),
            src: None,
        }
    }
    /// ICMP echo (ICMPv6 echo for an IPv6 destination).
    pub fn icmp(dst: impl IpLike) -> Probe {
        Probe {
            proto: Proto::Icmp,
            dst: SocketAddr::new(dst.to_ip(), 0),
            src: None,
        }
    }
    /// Send from this source address (it need not be assigned: IP_TRANSPARENT).
    pub fn from(mut self, src: impl IpLike) -> Probe {
        self.src = Some(src.to_ip());
        self
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = self
            .src
            .map(|s| s.to_string())
            .unwrap_or_else(|| "*".into());
        match self.proto {
            Proto::Tcp => write!(f, "tcp {src} -> {}", self.dst),
            Proto::Udp => write!(f, "udp {src} -> {}", self.dst),
            Proto::Icmp => write!(f, "icmp echo {src} -> {}", self.dst.ip()),
        }
    }
}

fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (u64::from(std::process::id()) << 40) ^ (t << 16) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn domain(ip: IpAddr) -> Domain {
    if ip.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A socket of `dst`'s family, bound to `src` (freebind) when given.
fn socket_for(dst: IpAddr, src: Option<IpAddr>, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(domain(dst), ty, Some(proto))?;
    if let Some(src) = src {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source {src} and destination {dst} are of different families"),
            ));
        }
        // IP_TRANSPARENT (root only) both allows binding a non-local address and lets
        // the output route lookup accept it as a source; IP_FREEBIND only does the former.
        if src.is_ipv4() {
            sock.set_ip_transparent_v4(true)?;
        } else {
            sock.set_ip_transparent_v6(true)?;
        }
        sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    }
    Ok(sock)
}

/// Asks for ICMP errors (net/host unreachable...) on a connected UDP socket, not only the
/// "hard" ones (port unreachable).
fn set_recverr(sock: &Socket, v6: bool) {
    let one: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    // SAFETY: valid fd, pointer to a c_int that lives across the call, correct length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn classify(e: &io::Error) -> Outcome {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock => Outcome::TimedOut,
        K::ConnectionRefused => Outcome::Refused,
        K::HostUnreachable | K::NetworkUnreachable => Outcome::Unreachable(e.to_string()),
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => {
                Outcome::Unreachable(e.to_string())
            }
            _ => Outcome::Error(e.to_string()),
        },
    }
}

fn remaining(deadline: Instant, floor: Duration) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(floor)
}

/// Runs one probe from the calling thread's namespace.
pub fn probe(p: &Probe, timeout: Duration) -> Outcome {
    match p.proto {
        Proto::Tcp => tcp_probe(p, timeout),
        Proto::Udp => udp_probe(p, timeout),
        Proto::Icmp => ping(p.dst.ip(), p.src, timeout),
    }
}

fn tcp_probe(p: &Probe, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut conn = match tcp_connect(p.src, p.dst, timeout) {
        Ok(c) => c,
        Err(e) => return classify(&e),
    };
    let line = format!("segward-lab tcp {:x}", nonce());
    match conn.roundtrip(&line, remaining(deadline, Duration::from_millis(300))) {
        Ok(reply) if reply == line => Outcome::Passed,
        Ok(reply) => Outcome::Error(format!("connected, but the echo was {reply:?}")),
        Err(e) => Outcome::Error(format!("connected, but no echo: {e}")),
    }
}

fn udp_probe(p: &Probe, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let run = || -> io::Result<Outcome> {
        let sock = socket_for(p.dst.ip(), p.src, Type::DGRAM, Protocol::UDP)?;
        set_recverr(&sock, p.dst.is_ipv6());
        sock.connect(&SockAddr::from(p.dst))?;
        let sock: UdpSocket = sock.into();
        let payload = format!("segward-lab udp {:x}", nonce());
        sock.send(payload.as_bytes())?;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Outcome::TimedOut);
            }
            sock.set_read_timeout(Some(left))?;
            let n = sock.recv(&mut buf)?;
            if &buf[..n] == payload.as_bytes() {
                return Ok(Outcome::Passed);
            }
        }
    };
    run().unwrap_or_else(|e| classify(&e))
}

/// ICMP echo with a raw socket (no `ping` binary needed). Ok(Passed) only for an echo
/// reply from `dst` carrying our id, sequence and payload.
pub fn ping(dst: IpAddr, src: Option<IpAddr>, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let n = nonce();
    let id = (n >> 16) as u16;
    let seq = n as u16;
    let payload = format!("segward-lab icmp {n:x}");
    let v6 = dst.is_ipv6();
    let run = || -> io::Result<Outcome> {
        let proto = if v6 {
            Protocol::ICMPV6
        } else {
            Protocol::ICMPV4
        };
        let sock = socket_for(dst, src, Type::RAW, proto)?;
        let mut pkt = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(payload.as_bytes());
        if !v6 {
            // ICMPv6 checksums are filled in by the kernel on raw sockets; ICMPv4 not.
            let c = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        let sock: UdpSocket = sock.into(); // a plain datagram fd API for send_to/recv_from
        sock.send_to(&pkt, SocketAddr::new(dst, 0))?;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Outcome::TimedOut);
            }
            sock.set_read_timeout(Some(left))?;
            let (len, from) = sock.recv_from(&mut buf)?;
            let data = &buf[..len];
            // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
            let icmp = if v6 {
                data
            } else {
                let ihl = usize::from(data.first().map_or(0, |b| b & 0x0f)) * 4;
                data.get(ihl..).unwrap_or(&[])
            };
            if icmp.len() < 8 {
                continue;
            }
            let (ty, code) = (icmp[0], icmp[1]);
            let ours = |h: &[u8]| {
                h.len() >= 8 && h[4..6] == id.to_be_bytes() && h[6..8] == seq.to_be_bytes()
            };
            let reply = if v6 { 129 } else { 0 };
            if ty == reply && ours(icmp) && &icmp[8..] == payload.as_bytes() && from.ip() == dst {
                return Ok(Outcome::Passed);
            }
            // Errors quote our request: unreachable (3 / v6: 1), time exceeded (11 / v6: 3).
            let is_error = if v6 {
                ty == 1 || ty == 3
            } else {
                ty == 3 || ty == 11
            };
            if is_error {
                let inner = &icmp[8..];
                let quoted = if v6 {
                    inner.get(40..)
                } else {
                    let ihl = usize::from(inner.first().map_or(0, |b| b & 0x0f)) * 4;
                    inner.get(ihl..)
                };
                let request = if v6 { 128 } else { 8 };
                if let Some(q) = quoted {
                    if q.first() == Some(&request) && ours(q) {
                        return Ok(Outcome::Unreachable(format!(
                            "ICMP type {ty} code {code} from {}",
                            from.ip()
                        )));
                    }
                }
            }
        }
    };
    run().unwrap_or_else(|e| classify(&e))
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An open TCP connection to a line-echo server (see `TcpServer`). The socket belongs to
/// the namespace it was opened in; it can be used from any thread.
pub struct TcpConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

/// Connects from the calling thread's namespace, bounded by `timeout`.
pub fn tcp_connect(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> io::Result<TcpConn> {
    let sock = socket_for(dst.ip(), src, Type::STREAM, Protocol::TCP)?;
    sock.connect_timeout(&SockAddr::from(dst), timeout)?;
    let stream: TcpStream = sock.into();
    stream.set_nodelay(true)?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok(TcpConn { stream, reader })
}

impl TcpConn {
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        assert!(!line.contains('\n'), "send_line: one line at a time");
        self.stream
            .set_write_timeout(Some(Duration::from_secs(5)))?;
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    /// Next line (without its newline); UnexpectedEof if the peer closed, TimedOut/
    /// WouldBlock if nothing came within `timeout`.
    pub fn recv_line(&mut self, timeout: Duration) -> io::Result<String> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = Vec::new();
        let n = self.reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.pop();
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Sends a line and returns what came back (the echo server sends it back verbatim).
    pub fn roundtrip(&mut self, line: &str, timeout: Duration) -> io::Result<String> {
        self.send_line(line)?;
        self.recv_line(timeout)
    }

    /// True if a line makes it there and back within `timeout`.
    pub fn echoes(&mut self, timeout: Duration) -> bool {
        let line = format!("segward-lab conn {:x}", nonce());
        matches!(self.roundtrip(&line, timeout), Ok(r) if r == line)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Shared bookkeeping of a server thread.
struct ServerState {
    stop: AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
}

/// A line-echo TCP server in some namespace; stops (and closes its connections) on drop.
pub struct TcpServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    thread: Option<JoinHandle<()>>,
}

/// A UDP echo server in some namespace; stops on drop.
pub struct UdpServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    thread: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

fn bound_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> Result<Socket, String> {
    let err = |what: &str, e: io::Error| format!("{what} {addr}: {e}");
    let sock = Socket::new(domain(addr.ip()), ty, Some(proto)).map_err(|e| err("socket", e))?;
    sock.set_reuse_address(true)
        .map_err(|e| err("SO_REUSEADDR", e))?;
    if addr.is_ipv4() {
        sock.set_freebind_v4(true)
            .map_err(|e| err("IP_FREEBIND", e))?;
    } else {
        sock.set_only_v6(true).map_err(|e| err("IPV6_V6ONLY", e))?;
        sock.set_freebind_v6(true)
            .map_err(|e| err("IPV6_FREEBIND", e))?;
    }
    sock.bind(&SockAddr::from(addr))
        .map_err(|e| err("bind", e))?;
    Ok(sock)
}

impl TcpServer {
    pub(crate) fn start(ns: &str, addr: SocketAddr) -> Result<TcpServer, String> {
        let state = Arc::new(ServerState {
            stop: AtomicBool::new(false),
            peers: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let (addr, thread) = super::netns::spawn_in(
            ns,
            "tcp-echo",
            move || {
                let sock = bound_socket(addr, Type::STREAM, Protocol::TCP)?;
                sock.listen(128)
                    .map_err(|e| format!("listen {addr}: {e}"))?;
                let listener: TcpListener = sock.into();
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let local = listener.local_addr().map_err(|e| e.to_string())?;
                Ok((listener, local))
            },
            move |listener| tcp_accept_loop(listener, st),
        )?;
        Ok(TcpServer {
            addr,
            state,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// Source addresses of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers.lock().unwrap().clone()
    }
    pub fn accepted(&self) -> usize {
        self.state.peers.lock().unwrap().len()
    }
}

fn tcp_accept_loop(listener: TcpListener, st: Arc<ServerState>) {
    let mut conns = Vec::new();
    while !st.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                st.peers.lock().unwrap().push(peer);
                let st = st.clone();
                conns.push(std::thread::spawn(move || tcp_echo(stream, st)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn tcp_echo(stream: TcpStream, st: Arc<ServerState>) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !st.stop.load(Ordering::Relaxed) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) if line.last() == Some(&b'\n') => {
                if writer.write_all(&line).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => return, // EOF in the middle of a line
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl UdpServer {
    pub(crate) fn start(ns: &str, addr: SocketAddr) -> Result<UdpServer, String> {
        let state = Arc::new(ServerState {
            stop: AtomicBool::new(false),
            peers: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let (addr, thread) = super::netns::spawn_in(
            ns,
            "udp-echo",
            move || {
                let sock: UdpSocket = bound_socket(addr, Type::DGRAM, Protocol::UDP)?.into();
                sock.set_read_timeout(Some(POLL))
                    .map_err(|e| e.to_string())?;
                let local = sock.local_addr().map_err(|e| e.to_string())?;
                Ok((sock, local))
            },
            move |sock| {
                let mut buf = [0u8; 65536];
                while !st.stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        st.peers.lock().unwrap().push(peer);
                        let _ = sock.send_to(&buf[..n], peer);
                    }
                }
            },
        )?;
        Ok(UdpServer {
            addr,
            state,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// Sources of the datagrams received so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers.lock().unwrap().clone()
    }
    pub fn received(&self) -> usize {
        self.state.peers.lock().unwrap().len()
    }
}

fn stop(state: &ServerState, thread: &mut Option<JoinHandle<()>>) {
    state.stop.store(true, Ordering::Relaxed);
    if let Some(t) = thread.take() {
        let _ = t.join();
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        stop(&self.state, &mut self.thread);
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        stop(&self.state, &mut self.thread);
    }
}
