//! `kad inspect`: the established TCP connections of some processes and their real keepalive
//! state, read from the kernel: `/proc/PID/fd` for the sockets, sock_diag netlink for the
//! addresses, the keepalive timer and the socket's cgroup, and the socket itself (through
//! `pidfd_getfd`) for the options in force. Sockets kad did not set are shown just the same,
//! and each is compared with the policy in force for its cgroup.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{api::protocol::PolicyEntry, host::sockopt, model::keepalive::KeepaliveState};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_ESTABLISHED: u32 = 1;
/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h): the socket's own cgroup, which
/// decides its policy (kernel 5.10 and later put it in every reply).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `idiag_timer` values (net/ipv4/inet_diag.c).
const TIMER_NAMES: [&str; 5] = [
    "off",
    "retransmit",
    "keepalive",
    "time-wait",
    "zero-window-probe",
];

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no process {0}")]
    NoProcess(u32),
    #[error("permission denied reading the sockets of process {0}: run as root or as its owner")]
    PermissionDenied(u32),
    #[error("cannot read the sockets of process {pid}: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag netlink: {0}")]
    Netlink(io::Error),
    #[error("cannot enter the network namespace of process {pid}: {source}")]
    Netns {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// One established TCP connection of an inspected process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub pid: u32,
    pub command: String,
    pub fd: RawFd,
    pub local: String,
    pub remote: String,
    /// SO_KEEPALIVE, and the values in force (kernel defaults where unset); None if the socket
    /// could not be read (process gone, no permission).
    pub keepalive: Option<bool>,
    pub idle: Option<i32>,
    pub intvl: Option<i32>,
    pub cnt: Option<i32>,
    /// TCP_USER_TIMEOUT in milliseconds (0: not set).
    pub user_timeout: Option<i32>,
    /// The TCP timer running: "keepalive", "retransmit", ... or "off".
    pub timer: String,
    /// Milliseconds until the timer fires.
    pub timer_left_ms: u32,
    /// Keepalive probes sent without an answer (for the keepalive timer).
    pub probes: u8,
    /// The socket's inode number (one socket shared by several processes is listed for each).
    pub inode: u64,
    /// The socket's cgroup (where it was created; an accepted socket has its listener's),
    /// which decides its policy; the process's own cgroup if the kernel does not say.
    pub cgroup: Option<String>,
    /// The policy in force for that cgroup (its own or its nearest ancestor's), if any.
    pub policy: Option<PolicyEntry>,
    /// Whether the daemon could be asked which policy is in force.
    pub policy_known: bool,
    /// The options whose values differ from that policy's ("keepalive", "idle", "intvl",
    /// "cnt", "user_timeout"): the program set its own after kad.
    pub differs: Vec<&'static str>,
    /// The network namespace (`net:[N]`), to tell apart equal inodes of two namespaces.
    #[serde(skip)]
    pub netns: String,
    /// The socket's cgroup id, as sock_diag reported it.
    #[serde(skip)]
    pub cgroup_id: Option<u64>,
}

impl Connection {
    /// The socket's options as read, if they could be.
    pub fn state(&self) -> Option<KeepaliveState> {
        Some(KeepaliveState {
            keepalive: self.keepalive?,
            idle: self.idle?,
            intvl: self.intvl?,
            cnt: self.cnt?,
            user_timeout: self.user_timeout?,
        })
    }
}

/// What a scan of processes found.
#[derive(Debug, Default)]
pub struct Scan {
    pub connections: Vec<Connection>,
    /// Processes whose sockets could not be read (permission), when the scan skips them.
    pub unreadable: Vec<u32>,
}

/// (pid, fd, socket inode) of a socket a process has open.
type OpenSocket = (u32, RawFd, u64);

/// What sock_diag reports of one socket.
#[derive(Debug, Clone, Copy)]
struct DiagRecord {
    local: SocketAddr,
    remote: SocketAddr,
    timer: u8,
    retrans: u8,
    expires: u32,
    cgroup_id: Option<u64>,
}

/// The established TCP connections of `pids`, sorted by pid and fd. A process whose sockets
/// may not be read is an error.
pub fn inspect(pids: &[u32]) -> Result<Vec<Connection>, InspectError> {
    Ok(scan(pids, false)?.connections)
}

/// As [`inspect`]; with `skip_unreadable`, processes (or network namespaces) that may not be
/// read are listed in [`Scan::unreadable`] instead of failing the whole scan.
pub fn scan(pids: &[u32], skip_unreadable: bool) -> Result<Scan, InspectError> {
    let mut unreadable = Vec::new();
    // Sockets by inode, per network namespace (a dump shows only its own namespace).
    let mut by_netns: BTreeMap<String, (u32, Vec<OpenSocket>)> = BTreeMap::new();
    for &pid in pids {
        let sockets = match socket_fds(pid) {
            Ok(sockets) => sockets,
            // A process that exited meanwhile has no connections left to show.
            Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => continue,
            Err(InspectError::PermissionDenied(pid)) if skip_unreadable => {
                unreadable.push(pid);
                continue;
            }
            Err(e) => return Err(e),
        };
        let netns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        let entry = by_netns.entry(netns).or_insert_with(|| (pid, Vec::new()));
        entry
            .1
            .extend(sockets.into_iter().map(|(fd, inode)| (pid, fd, inode)));
    }
    let own_netns = std::fs::read_link("/proc/self/ns/net")
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    let mut connections = Vec::new();
    for (netns, (some_pid, sockets)) in by_netns {
        if sockets.is_empty() {
            continue;
        }
        let records = if netns == own_netns {
            dump_established()
        } else {
            dump_in_netns_of(some_pid)
        };
        let records = match records {
            Ok(records) => records,
            Err(
                InspectError::Netns { .. }
                | InspectError::NoProcess(_)
                | InspectError::PermissionDenied(_),
            ) if skip_unreadable => {
                let mut pids: Vec<u32> = sockets.iter().map(|s| s.0).collect();
                pids.dedup();
                unreadable.extend(pids);
                continue;
            }
            Err(e) => return Err(e),
        };
        for (pid, fd, inode) in sockets {
            let Some(record) = records.get(&inode) else {
                continue; // not TCP, or not established
            };
            let state = socket_state(pid, fd).ok();
            connections.push(Connection {
                pid,
                command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default(),
                fd,
                local: record.local.to_string(),
                remote: record.remote.to_string(),
                keepalive: state.map(|s| s.keepalive),
                idle: state.map(|s| s.idle),
                intvl: state.map(|s| s.intvl),
                cnt: state.map(|s| s.cnt),
                user_timeout: state.map(|s| s.user_timeout),
                timer: TIMER_NAMES
                    .get(record.timer as usize)
                    .unwrap_or(&"other")
                    .to_string(),
                timer_left_ms: record.expires,
                probes: if record.timer == 2 { record.retrans } else { 0 },
                inode,
                cgroup: None, // filled in by `annotate`
                policy: None,
                policy_known: false,
                differs: Vec::new(),
                netns: netns.clone(),
                cgroup_id: record.cgroup_id,
            });
        }
    }
    connections.sort_by_key(|c| (c.pid, c.fd));
    unreadable.sort_unstable();
    unreadable.dedup();
    Ok(Scan {
        connections,
        unreadable,
    })
}

/// Every cgroup directory of the tree at `root`, by id (its inode number).
pub fn cgroups_by_id(root: &Path) -> HashMap<u64, PathBuf> {
    crate::host::cgroup::subtree(root)
        .into_iter()
        .filter_map(|path| Some((std::fs::metadata(&path).ok()?.ino(), path)))
        .collect()
}

/// Fills in each connection's cgroup path, the policy in force for it (nearest ancestor with
/// a policy in `policies`, `--off` included; `None` when the daemon could not be asked), and
/// the options that differ from that policy.
pub fn annotate(connections: &mut [Connection], root: &Path, policies: Option<&[PolicyEntry]>) {
    let ids = cgroups_by_id(root);
    let by_path: HashMap<&Path, &PolicyEntry> = policies
        .unwrap_or_default()
        .iter()
        .map(|p| (Path::new(&p.cgroup), p))
        .collect();
    for c in connections {
        let socket_cgroup = c.cgroup_id.and_then(|id| ids.get(&id).cloned());
        // A socket whose cgroup is gone (or a kernel that does not say): the process's.
        let path = socket_cgroup.or_else(|| crate::host::target::pid_path(root, c.pid).ok());
        c.cgroup = path.as_ref().map(|p| p.display().to_string());
        c.policy_known = policies.is_some();
        c.policy = path.as_deref().and_then(|path| {
            path.ancestors()
                .take_while(|p| p.starts_with(root) && *p != root)
                .find_map(|p| by_path.get(p).map(|e| (*e).clone()))
        });
        c.differs = match (&c.policy, c.state()) {
            (Some(policy), Some(state)) => policy.policy().differences(&state),
            _ => Vec::new(),
        };
    }
}

/// (fd, inode) of each socket the process has open.
fn socket_fds(pid: u32) -> Result<Vec<(RawFd, u64)>, InspectError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| proc_error(pid, e))?;
    let mut sockets = Vec::new();
    for entry in dir.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            sockets.push((fd, inode));
        }
    }
    Ok(sockets)
}

/// What an error reading `/proc/PID/...` means for the user.
fn proc_error(pid: u32, e: io::Error) -> InspectError {
    match e.kind() {
        io::ErrorKind::NotFound => InspectError::NoProcess(pid),
        io::ErrorKind::PermissionDenied => InspectError::PermissionDenied(pid),
        _ => InspectError::Proc { pid, source: e },
    }
}

/// The options of another process's socket, read on a duplicate of its descriptor.
fn socket_state(pid: u32, fd: RawFd) -> io::Result<KeepaliveState> {
    // SAFETY: plain syscalls; every descriptor returned is owned right away.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    let dup = unsafe { OwnedFd::from_raw_fd(dup as RawFd) };
    sockopt::keepalive_of(dup.as_raw_fd())
}

/// sock_diag in the network namespace of `pid`, from a thread that enters it (setns affects
/// only the calling thread; the netlink socket belongs to the namespace it was made in).
fn dump_in_netns_of(pid: u32) -> Result<HashMap<u64, DiagRecord>, InspectError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| proc_error(pid, e))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace descriptor we own, in this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(InspectError::Netns {
                pid,
                source: io::Error::last_os_error(),
            });
        }
        dump_established()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(InspectError::Netlink(io::Error::other(
            "netlink thread panicked",
        )))
    })
}

/// Every established TCP socket of this network namespace, IPv4 and IPv6, by inode.
fn dump_established() -> Result<HashMap<u64, DiagRecord>, InspectError> {
    let mut records = HashMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump_family(family, &mut records).map_err(InspectError::Netlink)?;
    }
    Ok(records)
}

fn dump_family(family: u8, records: &mut HashMap<u64, DiagRecord>) -> io::Result<()> {
    // SAFETY: socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
    let mut request = [0u8; 72];
    request[0..4].copy_from_slice(&72u32.to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[16] = family;
    request[17] = libc::IPPROTO_TCP as u8;
    request[20..24].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    // SAFETY: a zeroed sockaddr_nl addresses the kernel; the buffer outlives the call.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into a buffer we own, of the length given.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the dump ended without NLMSG_DONE",
            ));
        }
        if parse_replies(&buf[..n as usize], records)? {
            return Ok(());
        }
    }
}

/// Reads one datagram of netlink replies into `records`; true once the dump is done. Lengths
/// come from the kernel but are checked all the same: a short message is an error, not a
/// panic.
fn parse_replies(data: &[u8], records: &mut HashMap<u64, DiagRecord>) -> io::Result<bool> {
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message");
    let u32_at = |o: usize| -> io::Result<u32> {
        data.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .ok_or_else(truncated)
    };
    let mut offset = 0;
    while offset + 16 <= data.len() {
        let len = u32_at(offset)? as usize;
        let kind = u16::from_ne_bytes([data[offset + 4], data[offset + 5]]);
        if len < 16 || offset + len > data.len() {
            return Err(truncated());
        }
        match kind as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                // struct nlmsgerr starts with the (negative) errno, inside this message.
                if len < 20 {
                    return Err(truncated());
                }
                let errno = u32_at(offset + 16)? as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ => {
                if let Some((inode, record)) = parse_diag_msg(&data[offset + 16..offset + len]) {
                    records.insert(inode, record);
                }
            }
        }
        offset += (len + 3) & !3;
    }
    Ok(false)
}

/// struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue,
/// wqueue, uid, inode.
fn parse_diag_msg(msg: &[u8]) -> Option<(u64, DiagRecord)> {
    if msg.len() < 72 {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(msg[o..o + 4].try_into().unwrap_or([0; 4]));
    let port = |o: usize| u16::from_be_bytes([msg[o], msg[o + 1]]);
    let addr = |o: usize| -> IpAddr {
        if msg[0] == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(msg[o], msg[o + 1], msg[o + 2], msg[o + 3]))
        } else {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&msg[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    };
    let record = DiagRecord {
        local: SocketAddr::new(addr(8), port(4)),
        remote: SocketAddr::new(addr(24), port(6)),
        timer: msg[2],
        retrans: msg[3],
        expires: u32_at(52),
        cgroup_id: attribute(&msg[72..], INET_DIAG_CGROUP_ID)
            .and_then(|v| v.get(..8)?.try_into().ok())
            .map(u64::from_ne_bytes),
    };
    Some((u64::from(u32_at(68)), record))
}

/// The payload of the netlink attribute `kind` among `attrs` (struct rtattr: length, type,
/// payload, padded to 4 bytes).
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let this = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if this & 0x3fff == kind {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

/// The processes of a cgroup and every cgroup below it.
pub fn cgroup_pids(path: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// "2min59sec" / "1.5sec", the way ss prints timers.
pub fn format_ms(ms: u32) -> String {
    let secs = ms / 1000;
    match secs {
        0..=59 => format!("{}.{}sec", secs, (ms % 1000) / 100),
        _ => format!("{}min{}sec", secs / 60, secs % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
    };

    #[test]
    fn finds_our_own_connections_and_their_options() {
        // This test runs in a cgroup without a kad policy (kad never attaches to the root,
        // and the tests' cgroups are their own): the sockets have what we set here.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let plain = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let tuned = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _tuned_server = listener.accept().unwrap();
        let set = |name: i32, level: i32, value: i32| {
            // SAFETY: setsockopt on a socket we own, with an int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    tuned.as_raw_fd(),
                    level,
                    name,
                    (&value as *const i32).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
        };
        set(libc::SO_KEEPALIVE, libc::SOL_SOCKET, 1);
        set(libc::TCP_KEEPIDLE, libc::IPPROTO_TCP, 1234);
        set(libc::TCP_KEEPINTVL, libc::IPPROTO_TCP, 56);
        set(libc::TCP_KEEPCNT, libc::IPPROTO_TCP, 7);

        let connections = inspect(&[std::process::id()]).expect("inspect this process");
        let find = |stream: &TcpStream| {
            let local = stream.local_addr().unwrap().to_string();
            connections
                .iter()
                .find(|c| c.local == local)
                .unwrap_or_else(|| panic!("{local} listed in {connections:?}"))
                .clone()
        };
        let plain_row = find(&plain);
        assert_eq!(plain_row.pid, std::process::id());
        assert_eq!(plain_row.fd, plain.as_raw_fd());
        assert_eq!(plain_row.remote, listener.local_addr().unwrap().to_string());
        assert_eq!(plain_row.keepalive, Some(false));
        assert_eq!(plain_row.timer, "off");
        let tuned_row = find(&tuned);
        assert_eq!(
            (
                tuned_row.keepalive,
                tuned_row.idle,
                tuned_row.intvl,
                tuned_row.cnt
            ),
            (Some(true), Some(1234), Some(56), Some(7))
        );
        assert_eq!(tuned_row.timer, "keepalive");
        assert!(
            tuned_row.timer_left_ms <= 1_234_000 && tuned_row.timer_left_ms > 1_200_000,
            "{tuned_row:?}"
        );
        let _ = server.set_nonblocking(true);
        let _ = server.read(&mut [0u8; 1]);
    }

    /// A netlink message header: length, type, flags, sequence, port.
    fn header(len: u32, kind: i32) -> Vec<u8> {
        let mut m = len.to_ne_bytes().to_vec();
        m.extend((kind as u16).to_ne_bytes());
        m.extend([0u8; 10]);
        m
    }

    #[test]
    fn short_and_error_replies_are_errors_not_panics() {
        let mut records = HashMap::new();
        // NLMSG_ERROR whose length covers only the header: no room for the errno.
        let short = header(16, libc::NLMSG_ERROR);
        let err = parse_replies(&short, &mut records).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A length that runs past the datagram.
        let long = header(400, 99);
        assert!(parse_replies(&long, &mut records).is_err());
        let zero = header(0, 99);
        assert!(parse_replies(&zero, &mut records).is_err());
        // A real error: -EACCES.
        let mut denied = header(20, libc::NLMSG_ERROR);
        denied.extend((-libc::EACCES).to_ne_bytes());
        let err = parse_replies(&denied, &mut records).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        // An acknowledgement (errno 0), then the end of the dump.
        let mut ack = header(20, libc::NLMSG_ERROR);
        ack.extend(0i32.to_ne_bytes());
        ack.extend(header(16, libc::NLMSG_DONE));
        assert!(parse_replies(&ack, &mut records).unwrap());
        // Fewer bytes than a header: nothing to read, not done.
        assert!(!parse_replies(&[0u8; 10], &mut records).unwrap());
        assert!(records.is_empty());
    }

    #[test]
    fn timers_print_like_ss() {
        assert_eq!(format_ms(179_400), "2min59sec");
        assert_eq!(format_ms(1_500), "1.5sec");
    }

    #[test]
    fn short_messages_are_ignored() {
        assert!(parse_diag_msg(&[0u8; 10]).is_none());
    }
}
