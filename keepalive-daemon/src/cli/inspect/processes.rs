//! The processes to inspect and their sockets: a cgroup's processes (`cgroup.procs`), the
//! sockets a process has open (`/proc/PID/fd`) and their options, read on a duplicate of the
//! descriptor (`pidfd_getfd`).
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use super::InspectError;
use crate::{host::sockopt, model::keepalive::KeepaliveState};

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

/// (fd, inode) of each socket the process has open, once per socket (its lowest fd): a
/// process holding one socket on several descriptors (as stdin and stdout) has one connection.
pub(super) fn socket_fds(pid: u32) -> Result<Vec<(RawFd, u64)>, InspectError> {
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
    sockets.sort_unstable_by_key(|&(fd, inode)| (inode, fd));
    sockets.dedup_by_key(|&mut (_, inode)| inode);
    sockets.sort_unstable();
    Ok(sockets)
}

/// What an error reading `/proc/PID/...` means for the user.
pub(super) fn proc_error(pid: u32, e: io::Error) -> InspectError {
    match e.kind() {
        io::ErrorKind::NotFound => InspectError::NoProcess(pid),
        io::ErrorKind::PermissionDenied => InspectError::PermissionDenied(pid),
        _ => InspectError::Proc { pid, source: e },
    }
}

/// The options of another process's socket, read on a duplicate of its descriptor.
pub(super) fn socket_state(pid: u32, fd: RawFd) -> io::Result<KeepaliveState> {
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
