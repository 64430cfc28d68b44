//! Existing connections: the iter/tcp program, run once in each network namespace where the
//! processes of a cgroup live, gives their sockets the policy that now decides for them.
use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use keepalive_common::{NetDefaults, DEFAULTS_MAP, SCOPE_MAP};

use super::{bpfsys, error::map_error, load::take_map, KernelError};

/// The iterator's link (None where the kernel cannot run it) and the maps it reads.
pub(super) struct Refresher {
    iter_link: Option<OwnedFd>,
    scope: BpfHashMap<MapData, u64, u64>,
    /// The keepalive sysctls of the namespace an iterator runs in (see `run_iterator_in`).
    defaults: Array<MapData, NetDefaults>,
}

impl Refresher {
    pub(super) fn take(
        ebpf: &mut aya::Ebpf,
        iter_link: Option<OwnedFd>,
    ) -> Result<Refresher, KernelError> {
        Ok(Refresher {
            iter_link,
            scope: BpfHashMap::try_from(take_map(ebpf, SCOPE_MAP)?)
                .map_err(|e| map_error(SCOPE_MAP, e))?,
            defaults: Array::try_from(take_map(ebpf, DEFAULTS_MAP)?)
                .map_err(|e| map_error(DEFAULTS_MAP, e))?,
        })
    }

    /// Gives the sockets of the cgroups in `scope` (cgroup id -> deciding policy id, 0 for
    /// none) the policy that decides for them, in each of the network namespaces `netns`.
    /// Returns the number of sockets updated.
    pub(super) fn refresh(
        &mut self,
        scope: &[(u64, u64)],
        netns: &[File],
    ) -> Result<u64, KernelError> {
        let Some(link) = &self.iter_link else {
            return Ok(0);
        };
        let mut errors = Vec::new();
        let mut filled = Vec::new();
        for (cgroup, policy) in scope {
            match self.scope.insert(cgroup, policy, 0) {
                Ok(()) => filled.push(*cgroup),
                Err(e) => {
                    errors.push(format!("scope map: {e}"));
                    break;
                }
            }
        }
        let mut updated = 0;
        if errors.is_empty() {
            for ns in netns {
                match run_iterator_in(link, ns, &mut self.defaults) {
                    Ok(n) => updated += n,
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for cgroup in filled {
            let _ = self.scope.remove(&cgroup);
        }
        if errors.is_empty() {
            Ok(updated)
        } else {
            Err(KernelError::Refresh(errors.join("; ")))
        }
    }
}

/// Runs the iterator once in the network namespace `ns`, on a thread of its own (setns
/// changes only the calling thread). Returns the number of sockets it updated.
fn run_iterator_in(
    link: &OwnedFd,
    ns: &File,
    defaults: &mut Array<MapData, NetDefaults>,
) -> io::Result<u64> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold; it affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // What a listener's option goes back to when it had none of its own: this
            // namespace's defaults (/proc/sys/net is the opener's namespace's).
            defaults
                .set(0, net_defaults(), 0)
                .map_err(|e| io::Error::other(format!("{DEFAULTS_MAP}: {e}")))?;
            // The namespace is fixed when the iterator is created: here, after setns.
            let iter = File::from(bpfsys::iter_create(link.as_fd())?);
            let mut out = Vec::new();
            (&iter).read_to_end(&mut out)?;
            Ok(out.len() as u64)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("iterator thread panicked")))
    })
}

/// The keepalive sysctls of the calling thread's network namespace; 0 for one it cannot read
/// (the program then leaves that option as it is).
fn net_defaults() -> NetDefaults {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    NetDefaults {
        idle: read("tcp_keepalive_time"),
        intvl: read("tcp_keepalive_intvl"),
        cnt: read("tcp_keepalive_probes"),
    }
}
