//! Loads the sock_ops program, keeps its maps (policies, counters), and attaches one program
//! instance to each policy cgroup.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, SockOps,
    },
    Ebpf, EbpfLoader,
};
use keepalive_common::{
    Counters, PolicyValue, SockOffsets, CGROUP_ID_GLOBAL, MARK_GLOBAL, OFFSETS_GLOBAL,
    POLICIES_MAP, STATS_MAP,
};

use tracing::{info, warn};

use crate::{
    cgroup::Cgroup,
    pathio::{io_err, remove_file_if_present, PathIoError},
    policy::Policy,
};

/// The program embedded at build time (see build.rs).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kad-sockops"));
const PROGRAM_NAME: &str = "kad_sockops";
/// Where each attached cgroup's link is pinned, named by cgroup id.
const LINKS_DIR: &str = "links";
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("bpffs is not mounted at {mount} (needed for {dir}): mount it with `mount -t bpf bpf {mount}`")]
    NoBpffs { dir: PathBuf, mount: PathBuf },
    #[error("{dir} is not on a bpf filesystem")]
    NotBpffs { dir: PathBuf },
    #[error("a kad daemon is already using {0}: stop it first, or give this one its own --bpffs directory")]
    Busy(PathBuf),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("cannot load the sock_ops program: {0}")]
    Load(String),
    #[error("cannot attach to {path}: {message}")]
    Attach { path: PathBuf, message: String },
    #[error("BPF map: {0}")]
    Map(#[from] aya::maps::MapError),
}

pub struct Enforcer {
    dir: PathBuf,
    mark: u32,
    offsets: SockOffsets,
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    stats: PerCpuHashMap<MapData, u64, Counters>,
    /// The pinned link of each attached cgroup id. The pins, not this process, keep the
    /// programs attached: they outlive a crash or a stop of the daemon.
    attached: HashMap<u64, PinnedLink>,
    /// Keeps the program loaded (for `status`) and holds nothing attached.
    _base: Ebpf,
    /// An exclusive flock on `dir`: one daemon per bpffs directory.
    _lock: File,
}

impl Enforcer {
    /// Opens (creating it if needed) the daemon's bpffs directory, loads the program once to
    /// check that the kernel accepts it, and adopts the links and map an earlier run pinned.
    pub fn open(dir: &Path) -> Result<Self, EnforcerError> {
        ensure_bpffs(dir)?;
        let links = dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links).map_err(io_err("cannot create", &links))?;
        let lock = lock_dir(dir)?;
        let mark = mark_for(dir);
        let offsets = crate::btf::sock_offsets().unwrap_or_else(|e| {
            warn!("keepalive kills will not be counted: {e}");
            SockOffsets::default()
        });
        let mut base = load_instance(dir, 0, mark, &offsets)?;
        let mut take = |name: &str| {
            base.take_map(name)
                .ok_or_else(|| EnforcerError::Load(format!("the object has no {name} map")))
        };
        let policies = BpfHashMap::try_from(take(POLICIES_MAP)?)?;
        let stats = PerCpuHashMap::try_from(take(STATS_MAP)?)?;
        let attached = adopt_links(&links);
        Ok(Enforcer {
            dir: dir.to_path_buf(),
            mark,
            offsets,
            policies,
            stats,
            attached,
            _base: base,
            _lock: lock,
        })
    }

    /// Puts `policy` in force for `cgroup`: the map entry first, so that the program never runs
    /// without one, then the attachment if the cgroup has none yet.
    pub fn apply(&mut self, cgroup: &Cgroup, policy: &Policy) -> Result<(), EnforcerError> {
        self.policies.insert(cgroup.id, policy.to_value(), 0)?;
        if self.attached.contains_key(&cgroup.id) {
            return Ok(());
        }
        match attach(&self.dir, self.mark, &self.offsets, cgroup) {
            Ok(link) => {
                self.attached.insert(cgroup.id, link);
                Ok(())
            }
            Err(e) => {
                let _ = self.policies.remove(&cgroup.id);
                Err(e)
            }
        }
    }

    /// Detaches from the cgroup with this id and forgets its policy. Unknown ids are fine.
    pub fn remove(&mut self, cgroup_id: u64) {
        // Detach first so that no program runs without its map entry.
        if let Some(link) = self.attached.remove(&cgroup_id) {
            detach(link);
        }
        let _ = self.policies.remove(&cgroup_id);
        let _ = self.stats.remove(&cgroup_id);
    }

    /// The counters of a policy cgroup, summed over CPUs; zero before its first connection.
    pub fn counters(&self, cgroup_id: u64) -> Counters {
        let mut total = Counters::default();
        if let Ok(per_cpu) = self.stats.get(&cgroup_id, 0) {
            for c in per_cpu.iter() {
                total.active += c.active;
                total.passive += c.passive;
                total.failures += c.failures;
                total.keepalive_kills += c.keepalive_kills;
            }
        }
        total
    }

    /// Whether the program can tell keepalive kills (the kernel's BTF had the fields).
    pub fn counts_kills(&self) -> bool {
        self.offsets.valid != 0
    }

    /// Removes every attachment and map entry whose cgroup id is not in `keep`: what an earlier
    /// run left for cgroups that are gone or policies that were removed.
    pub fn retain(&mut self, keep: &HashSet<u64>) {
        let stale_links: Vec<u64> = self
            .attached
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        let stale_entries: Vec<u64> = self
            .policies
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in stale_links.into_iter().chain(stale_entries) {
            self.remove(id);
        }
    }

    pub fn attachments(&self) -> usize {
        self.attached.len()
    }

    /// Map entries, for `status`: equal to the attachments when all is well.
    pub fn map_entries(&self) -> usize {
        self.policies.keys().filter(Result::is_ok).count()
    }
}

/// Detaches everything kad pinned under `dir` and removes the directory. Refuses while a daemon
/// holds the directory.
pub fn uninstall(dir: &Path) -> Result<usize, EnforcerError> {
    if !dir.exists() {
        return Ok(0);
    }
    let lock = lock_dir(dir)?;
    let links = dir.join(LINKS_DIR);
    let adopted = adopt_links(&links);
    let count = adopted.len();
    for link in adopted.into_values() {
        detach(link);
    }
    remove_file_if_present(&dir.join(POLICIES_MAP))?;
    remove_file_if_present(&dir.join(STATS_MAP))?;
    for path in [links.as_path(), dir] {
        match std::fs::remove_dir(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove (not kad's?)", path)(e).into())
            }
            _ => {}
        }
    }
    drop(lock);
    Ok(count)
}

/// Opens the links pinned in `links` (named by cgroup id); unusable pins are removed.
fn adopt_links(links: &Path) -> HashMap<u64, PinnedLink> {
    let mut adopted = HashMap::new();
    let Ok(entries) = std::fs::read_dir(links) else {
        return adopted;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let id = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok());
        match (id, PinnedLink::from_pin(&path)) {
            (Some(id), Ok(link)) => {
                adopted.insert(id, link);
            }
            (_, result) => {
                warn!(pin = %path.display(), "removing a pin kad cannot use: {:?}", result.err());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    adopted
}

/// Removes the pin and closes the link: the kernel detaches it.
fn detach(link: PinnedLink) {
    match link.unpin() {
        Ok(fd_link) => drop(fd_link),
        Err(e) => warn!("cannot remove a link pin: {e}"),
    }
}

fn load_instance(
    dir: &Path,
    cgroup_id: u64,
    mark: u32,
    offsets: &SockOffsets,
) -> Result<Ebpf, EnforcerError> {
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(POLICIES_MAP, dir.join(POLICIES_MAP))
        .map_pin_path(STATS_MAP, dir.join(STATS_MAP))
        .override_global(CGROUP_ID_GLOBAL, &cgroup_id, true)
        .override_global(MARK_GLOBAL, &mark, true)
        .override_global(OFFSETS_GLOBAL, offsets, true)
        .load(PROGRAM)
        .map_err(|e| EnforcerError::Load(error_chain(&e)))?;
    let program: &mut SockOps = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| EnforcerError::Load(format!("the object has no program {PROGRAM_NAME}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| EnforcerError::Load(error_chain(&e)))?;
    program
        .load()
        .map_err(|e| EnforcerError::Load(error_chain(&e)))?;
    Ok(ebpf)
}

fn attach(
    dir: &Path,
    mark: u32,
    offsets: &SockOffsets,
    cgroup: &Cgroup,
) -> Result<PinnedLink, EnforcerError> {
    let mut instance = load_instance(dir, cgroup.id, mark, offsets)?;
    let attach_error = |message: String| EnforcerError::Attach {
        path: cgroup.path.clone(),
        message,
    };
    let cgroup_dir = File::open(&cgroup.path).map_err(|e| attach_error(e.to_string()))?;
    let program: &mut SockOps = instance
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| attach_error("program missing".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| attach_error(error_chain(&e)))?;
    // Links on one cgroup always coexist; Single is the only mode bpf_link_create accepts.
    let link_id = program
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(|e| attach_error(error_chain(&e)))?;
    let link = program
        .take_link(link_id)
        .map_err(|e| attach_error(error_chain(&e)))?;
    let link = FdLink::try_from(link).map_err(|e| attach_error(error_chain(&e)))?;
    let pin = dir.join(LINKS_DIR).join(cgroup.id.to_string());
    // A pin left without a link we hold (a crash between pin and record) is replaced.
    let _ = std::fs::remove_file(&pin);
    // If pinning fails the link is dropped here, which detaches it: nothing half-done remains.
    link.pin(&pin).map_err(|e| attach_error(error_chain(&e)))
}

/// A mark that differs between daemons with different bpffs directories, and stays the same
/// for one directory, so that two daemons' programs never mistake each other's marks.
fn mark_for(dir: &Path) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in dir.as_os_str().as_encoded_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash | 1
}

/// bpffs must be mounted on the nearest existing ancestor of `dir`. When that ancestor is
/// `/sys/fs/bpf` itself (the usual place, unmounted on some hosts), it is mounted.
fn ensure_bpffs(dir: &Path) -> Result<(), EnforcerError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let on_bpffs =
        |path: &Path| crate::cgroup::is_fs(path, BPF_FS_MAGIC).map_err(io_err("cannot stat", path));
    if on_bpffs(existing)? {
        return Ok(());
    }
    if existing == Path::new(DEFAULT_BPFFS_MOUNT)
        && mount_bpffs(existing).is_ok()
        && on_bpffs(existing)?
    {
        info!("mounted bpffs at {DEFAULT_BPFFS_MOUNT}");
        return Ok(());
    }
    if existing == dir {
        return Err(EnforcerError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    Err(EnforcerError::NoBpffs {
        dir: dir.to_path_buf(),
        mount: existing.to_path_buf(),
    })
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File, EnforcerError> {
    let file = File::open(dir).map_err(io_err("cannot open", dir))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(EnforcerError::Busy(dir.to_path_buf()));
        }
        return Err(io_err("cannot lock", dir)(err).into());
    }
    Ok(file)
}

/// aya's errors keep the useful part (the errno, the verifier log) in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_differ_by_directory_and_are_never_zero() {
        let a = mark_for(Path::new("/sys/fs/bpf/kad"));
        let b = mark_for(Path::new("/sys/fs/bpf/kad-test-1"));
        assert_ne!(a, b);
        assert_eq!(a, mark_for(Path::new("/sys/fs/bpf/kad")));
        assert_ne!(a, 0);
        assert_ne!(b, 0);
    }
}
