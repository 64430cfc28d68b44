//! The kernel side, and the only code that calls `bpf(2)`: loading kad's programs and finding
//! what the kernel supports, their maps, the anchor cgroups the programs are attached to, the
//! refresh of existing connections in each network namespace, bpffs (mount, pins, lock), BTF
//! offsets and the kernel's kill events. Imports [`crate::host`] and [`crate::model`].
//!
//! The daemon's logic reaches it through one narrow interface, [`Kernel`]: [`Enforcer`] is the
//! real kernel, `fake::FakeKernel` (tests only) records what it is asked.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::PathBuf,
    sync::Arc,
};

use keepalive_common::{Counters, PathKey, PolicyValue};

mod anchors;
pub mod bpffs;
pub mod bpfsys;
pub mod btf;
mod enforcer;
mod error;
#[cfg(test)]
pub mod fake;
pub mod keys;
pub mod killlog;
mod load;
mod maps;
mod refresh;
pub mod slots;

pub use enforcer::Enforcer;
pub use error::KernelError;
pub use maps::Reader;

/// What this kernel lets kad do beyond the core (sock_ops); each is `Err` with the reason
/// when it is not available.
#[derive(Debug, Clone)]
pub struct Features {
    /// iter/tcp with `bpf_setsockopt` (5.15): policies reach existing connections.
    pub existing: Result<(), String>,
    /// tp_btf/cgroup_mkdir: a cgroup created at a policy path has it from its first socket.
    pub mkdir: Result<(), String>,
    /// cgroup/setsockopt: a program's own keepalive options are counted (and enforced).
    pub setsockopt: Result<(), String>,
    /// tp_btf/inet_sk_error_report: keepalive kills are counted.
    pub kills: Result<(), String>,
}

/// The kernel as the daemon's logic sees it: put and remove a policy, set the anchors,
/// refresh existing connections, read what is pinned and counted.
pub trait Kernel {
    /// Puts a policy in force for a path and, if the cgroup exists, for its id. The path
    /// entry lets the kernel apply it to a cgroup created there later, inside `mkdir`. The
    /// value counts in the path's counters slot; returns that slot.
    fn put(
        &mut self,
        key: &PathKey,
        id: Option<u64>,
        value: PolicyValue,
    ) -> Result<u32, KernelError>;
    /// Forgets a path's policy (its cgroup's entry is removed with `remove_id`); its counters
    /// slot is free for another path.
    fn remove_path(&mut self, key: &PathKey);
    /// Forgets the policy of a cgroup id. Unknown ids are fine.
    fn remove_id(&mut self, id: u64);
    /// The cgroup ids that have a policy entry (some may have been put there by `mkdir`).
    fn policy_ids(&self) -> Vec<(u64, PolicyValue)>;
    /// The policies by path an earlier run left in the pinned map.
    fn pinned_paths(&self) -> Vec<(PathKey, PolicyValue)>;
    /// Attaches the cgroup programs to every anchor in `want` (id -> path) that has none, and
    /// detaches the anchors not in it. The anchors in `verify` are asked of the kernel, and
    /// attached again if their links no longer hold their cgroup. Returns the anchors that
    /// could not be attached.
    fn set_anchors(
        &mut self,
        want: &BTreeMap<u64, PathBuf>,
        verify: &BTreeSet<u64>,
    ) -> Vec<KernelError>;
    /// Whether the anchor attached for cgroup `id` still holds that cgroup (false when there is
    /// none, or its links' cgroup is gone).
    fn anchor_holds(&self, id: u64) -> bool;
    /// Gives the sockets of the cgroups in `scope` (cgroup id -> deciding policy id, 0 for
    /// none) the policy that decides for them, in each of the network namespaces `netns`.
    /// Returns the number of sockets updated.
    fn refresh(&mut self, scope: &[(u64, u64)], netns: &[File]) -> Result<u64, KernelError>;
    /// Detaches what the first design of kad pinned, once this design's anchors are in place.
    /// Returns the number of its links removed.
    fn retire_legacy(&mut self) -> usize;
    /// A read-only handle on the counters, for other threads.
    fn reader(&self) -> Arc<dyn CounterReader>;
    /// The kernel's kill events, for the daemon to read (once).
    fn take_kill_log(&mut self) -> Option<aya_log::EbpfLogger<killlog::KillLog>>;
    fn features(&self) -> &Features;
    /// Whether the kernel counts keepalive kills.
    fn counts_kills(&self) -> bool {
        self.features().kills.is_ok()
    }
    /// The tag of the sock_ops program this daemon loaded (a hash of its instructions).
    fn program_tag(&self) -> &str;
    /// Per anchor: its path and the tag of the sock_ops program its link runs now.
    fn anchors(&self) -> Vec<(PathBuf, String)>;
    /// How many anchors are attached.
    fn attachments(&self) -> usize;
}

/// What the kernel counts by itself, read from any thread while the [`Kernel`] is busy.
pub trait CounterReader: Send + Sync {
    /// The counters of a policy (by its slot), summed over CPUs.
    fn counters(&self, slot: u32) -> Counters;
    /// Policy entries by cgroup id, for `status`.
    fn map_entries(&self) -> usize;
}
