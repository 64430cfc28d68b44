//! `kad inspect`: the established TCP connections of some processes and their real keepalive
//! state, read from the kernel: `/proc/PID/fd` for the sockets, sock_diag netlink for the
//! addresses, the keepalive timer and the socket's cgroup, and the socket itself (through
//! `pidfd_getfd`) for the options in force. Sockets kad did not set are shown just the same,
//! and each is compared with the policy in force for its cgroup.
//!
//! This file holds the command and the scan; `processes` finds the sockets a process has
//! open and reads their options, `sock_diag` asks the kernel for their connections.
mod processes;
mod sock_diag;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::{fd::RawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use clap::Args;
use serde::Serialize;

pub use processes::cgroup_pids;

use super::{
    args::{Target, TargetArgs},
    one_line, output,
};
use crate::{
    api::client,
    api::protocol::{PolicyEntry, Request, Response},
    host::cgroup,
    model::keepalive::KeepaliveState,
};

#[derive(Debug, Args)]
pub(super) struct InspectArgs {
    /// The processes of a cgroup (and below): given by path, by unit, or by one of its processes.
    #[command(flatten)]
    target: TargetArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kad inspect`: works without the daemon too, only not comparing with its policies.
pub(super) fn command(socket: &Path, args: &InspectArgs) -> anyhow::Result<()> {
    // --pid N as for every command: the cgroup N is in, and so all of its processes.
    let root = cgroup::find_root()?;
    if args.target.host() {
        Target::Host.cgroup()?;
    }
    // Which policy is in force is the daemon's to say; the values are the kernel's,
    // shown without it too.
    let policies = match client::call(socket, &Request::List) {
        Ok(Response::Policies { policies, .. }) => Some(policies),
        Ok(other) => anyhow::bail!("unexpected reply to list: {other:?}"),
        Err(e) => {
            eprintln!(
                "kad: warning: cannot ask the daemon which policies are in force ({}): connections are not compared with them",
                one_line(&anyhow::Error::new(e))
            );
            None
        }
    };
    let target = args
        .target
        .resolve_or_recorded(|| {
            policies
                .clone()
                .ok_or_else(|| anyhow::anyhow!("the daemon did not answer"))
        })
        .and_then(Target::cgroup);
    let target = match target {
        Err(e) => match e.downcast::<cgroup::CgroupError>() {
            Ok(cgroup::CgroupError::Root(root)) => anyhow::bail!(
                "{} is the cgroup2 root, which holds every process of the host: name a cgroup below it",
                root.display()
            ),
            Ok(other) => return Err(other.into()),
            Err(e) => return Err(e),
        },
        Ok(target) => target,
    };
    let cg = match (cgroup::resolve(&root, &target.cgroup), &target.container) {
        (Err(cgroup::CgroupError::NotFound(path)), Some(id)) => anyhow::bail!(
            "container {id} is not running: no connections (its policy waits at {})",
            path.display()
        ),
        (other, _) => other?,
    };
    let mut connections = inspect(&cgroup_pids(&cg.path))?;
    annotate(&mut connections, &root, policies.as_deref());
    output::connections(&connections, args.json)
}

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
    /// The socket's inode number (one socket shared by several processes is listed for each,
    /// once per process).
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
        let sockets = match processes::socket_fds(pid) {
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
            sock_diag::dump_established()
        } else {
            sock_diag::dump_in_netns_of(some_pid)
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
            let state = processes::socket_state(pid, fd).ok();
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
                timer: sock_diag::TIMER_NAMES
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
            (Some(policy), Some(state)) => policy.policy.differences(&state),
            _ => Vec::new(),
        };
    }
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
        os::fd::AsRawFd,
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

    /// One socket on two descriptors of a process (as a program's stdin and stdout) is one
    /// connection, shown with its lowest descriptor.
    #[test]
    fn a_socket_on_two_descriptors_is_listed_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let dup = stream.try_clone().unwrap();
        let local = stream.local_addr().unwrap().to_string();
        let connections = inspect(&[std::process::id()]).expect("inspect this process");
        let rows: Vec<&Connection> = connections.iter().filter(|c| c.local == local).collect();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].fd, stream.as_raw_fd().min(dup.as_raw_fd()));
    }

    #[test]
    fn timers_print_like_ss() {
        assert_eq!(format_ms(179_400), "2min59sec");
        assert_eq!(format_ms(1_500), "1.5sec");
    }
}
