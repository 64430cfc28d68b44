//! [`Enforcer`]: the real kernel behind the [`Kernel`] seam. It loads kad's programs once,
//! keeps their maps, attaches the cgroup programs to anchor cgroups, and refreshes existing
//! connections. Everything that must outlive the
//! daemon is pinned under its bpffs directory:
//!
//! - maps `KAD_POLICY` (by cgroup id), `KAD_PATHS` (by path), `KAD_COUNTS` (by slot), `KAD_MARKS`,
//!   `KAD_LISTENERS` (what the listeners kad changed held before, for as long as they live),
//!   `KAD_HZ` (the kernel's HZ as the programs learnt it: the records keep jiffies);
//! - `anchors/<cgroup id>/{sock_ops,setsockopt}`: the cgroup links;
//! - `tracing/{mkdir,rmdir,error_report}`: the tracepoint links.
//!
//! A new daemon adopts the pins and points each cgroup link at its own programs with
//! `BPF_LINK_UPDATE` (no gap); tracepoint links are replaced by new ones (the old and new
//! programs decide alike, so the short overlap is harmless).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use keepalive_common::{PathKey, PolicyValue};

use super::{
    anchors::Anchors,
    bpffs::{self, ANCHORS_DIR, TRACING_DIR},
    killlog::KillLog,
    load,
    maps::Maps,
    refresh::Refresher,
    CounterReader, Features, Kernel, KernelError,
};
use crate::host::pathio::io_err;

pub struct Enforcer {
    maps: Maps,
    anchors: Anchors,
    refresher: Refresher,
    /// Tracepoint links; the pins keep them after the daemon exits.
    _tracing: Vec<OwnedFd>,
    features: Features,
    tag: String,
    /// The kill events of the error-report program, until the daemon takes them.
    kill_log: Option<aya_log::EbpfLogger<KillLog>>,
    /// Holds the programs and maps; dropping it would unload nothing pinned.
    _ebpf: aya::Ebpf,
    /// An exclusive flock on the directory: one daemon per bpffs directory.
    _lock: File,
}

impl Enforcer {
    /// Opens (creating it if needed) the daemon's bpffs directory, loads the programs, adopts
    /// and upgrades the links an earlier run pinned. A bpf filesystem that would not outlive
    /// the daemon (see [`bpffs::outlives_daemon`]) is refused unless `private_ok`.
    pub fn open(dir: &Path, private_ok: bool) -> Result<Self, KernelError> {
        // One spelling per directory ("/sys/fs/bpf/x/" is "/sys/fs/bpf/x"): what kad decides
        // never depends on it, but messages and pins should not either.
        let dir: PathBuf = dir.components().collect();
        let dir = dir.as_path();
        bpffs::ensure_bpffs(dir, private_ok)?;
        let mounted = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
        if !bpffs::outlives_daemon(mounted) {
            if !private_ok {
                return Err(KernelError::PrivateBpffs(dir.to_path_buf()));
            }
            tracing::warn!(
                bpffs = %dir.display(),
                "this bpf filesystem is private to the daemon's mount namespace (--private-bpffs): \
                 every policy ends when the namespace goes"
            );
        }
        for sub in [ANCHORS_DIR, TRACING_DIR] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
        }
        let lock = bpffs::lock_dir(dir)?;
        let mut loaded = load::load(dir)?;
        let maps = Maps::take(&mut loaded.ebpf, dir)?;
        let refresher = Refresher::take(&mut loaded.ebpf, loaded.iter_link)?;
        let anchors = Anchors::open(dir, loaded.programs)?;
        Ok(Enforcer {
            maps,
            anchors,
            refresher,
            _tracing: loaded.tracing,
            features: loaded.features,
            tag: loaded.tag,
            kill_log: loaded.kill_log,
            _ebpf: loaded.ebpf,
            _lock: lock,
        })
    }
}

impl Kernel for Enforcer {
    fn put(
        &mut self,
        key: &PathKey,
        id: Option<u64>,
        value: PolicyValue,
    ) -> Result<u32, KernelError> {
        self.maps.put(key, id, value)
    }

    fn remove_path(&mut self, key: &PathKey) {
        self.maps.remove_path(key)
    }

    fn remove_id(&mut self, id: u64) {
        self.maps.remove_id(id)
    }

    fn policy_ids(&self) -> Vec<(u64, PolicyValue)> {
        self.maps.policy_ids()
    }

    fn pinned_paths(&self) -> Vec<(PathKey, PolicyValue)> {
        self.maps.pinned_paths()
    }

    fn set_anchors(
        &mut self,
        want: &BTreeMap<u64, PathBuf>,
        verify: &BTreeSet<u64>,
    ) -> Vec<KernelError> {
        self.anchors.set(want, verify)
    }

    fn anchor_holds(&self, id: u64) -> bool {
        self.anchors.holds(id)
    }

    fn refresh(&mut self, scope: &[(u64, u64)], netns: &[File]) -> Result<u64, KernelError> {
        self.refresher.refresh(scope, netns)
    }

    fn retire_legacy(&mut self) -> usize {
        bpffs::retire_legacy(self.maps.dir())
    }

    fn reader(&self) -> Arc<dyn CounterReader> {
        self.maps.reader()
    }

    fn take_kill_log(&mut self) -> Option<aya_log::EbpfLogger<KillLog>> {
        self.kill_log.take()
    }

    fn features(&self) -> &Features {
        &self.features
    }

    fn program_tag(&self) -> &str {
        &self.tag
    }

    fn anchors(&self) -> Vec<(PathBuf, String)> {
        self.anchors.list()
    }

    fn attachments(&self) -> usize {
        self.anchors.len()
    }
}
