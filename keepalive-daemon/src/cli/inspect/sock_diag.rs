//! sock_diag netlink (`NETLINK_SOCK_DIAG`): every established TCP socket of a network
//! namespace, by inode, with its addresses, its TCP timer and its cgroup.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::{processes::proc_error, InspectError};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_ESTABLISHED: u32 = 1;
/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h): the socket's own cgroup, which
/// decides its policy (kernel 5.10 and later put it in every reply).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `idiag_timer` values (net/ipv4/inet_diag.c).
pub(super) const TIMER_NAMES: [&str; 5] = [
    "off",
    "retransmit",
    "keepalive",
    "time-wait",
    "zero-window-probe",
];

/// What sock_diag reports of one socket.
#[derive(Debug, Clone, Copy)]
pub(super) struct DiagRecord {
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) timer: u8,
    pub(super) retrans: u8,
    pub(super) expires: u32,
    pub(super) cgroup_id: Option<u64>,
}

/// sock_diag in the network namespace of `pid`, from a thread that enters it (setns affects
/// only the calling thread; the netlink socket belongs to the namespace it was made in).
pub(super) fn dump_in_netns_of(pid: u32) -> Result<HashMap<u64, DiagRecord>, InspectError> {
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
pub(super) fn dump_established() -> Result<HashMap<u64, DiagRecord>, InspectError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn short_messages_are_ignored() {
        assert!(parse_diag_msg(&[0u8; 10]).is_none());
    }
}
