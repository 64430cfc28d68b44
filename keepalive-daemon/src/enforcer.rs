//! Loads the sock_ops program, keeps the policies map, and attaches one program instance to each
//! policy cgroup.
use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{CgroupAttachMode, SockOps},
    Ebpf, EbpfLoader,
};
use keepalive_common::{PolicyValue, CGROUP_ID_GLOBAL, MARK_GLOBAL, POLICIES_MAP};

use crate::{cgroup::Cgroup, policy::Policy};

/// The program embedded at build time (see build.rs).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kad-sockops"));
const PROGRAM_NAME: &str = "kad_sockops";
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("bpffs is not mounted at {mount} (needed for {dir}): mount it with `mount -t bpf bpf {mount}`")]
    NoBpffs { dir: PathBuf, mount: PathBuf },
    #[error("{dir} is not on a bpf filesystem")]
    NotBpffs { dir: PathBuf },
    #[error("another kad daemon is already using {0}; give this one its own --bpffs directory")]
    Busy(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the sock_ops program: {0}")]
    Load(String),
    #[error("cannot attach to {path}: {message}")]
    Attach { path: PathBuf, message: String },
    #[error("cannot update the policies map: {0}")]
    Map(#[from] aya::maps::MapError),
}

pub struct Enforcer {
    dir: PathBuf,
    mark: u32,
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    /// One loaded program instance per attached cgroup id; dropping it detaches the link.
    attached: HashMap<u64, Ebpf>,
    /// Keeps the program loaded (for `status`) and holds nothing attached.
    _base: Ebpf,
    /// An exclusive flock on `dir`: one daemon per bpffs directory.
    _lock: File,
}

impl Enforcer {
    /// Opens (creating it if needed) the daemon's bpffs directory and loads the program once to
    /// check that the kernel accepts it.
    pub fn open(dir: &Path) -> Result<Self, EnforcerError> {
        check_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| EnforcerError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        let mark = mark_for(dir);
        let mut base = load_instance(dir, 0, mark)?;
        let map = base
            .take_map(POLICIES_MAP)
            .ok_or_else(|| EnforcerError::Load(format!("the object has no {POLICIES_MAP} map")))?;
        let mut policies: BpfHashMap<MapData, u64, PolicyValue> =
            BpfHashMap::try_from(map).map_err(EnforcerError::Map)?;
        // Entries left by an earlier run have no program attached any more: start empty.
        let stale: Vec<u64> = policies.keys().filter_map(Result::ok).collect();
        for key in stale {
            policies.remove(&key)?;
        }
        Ok(Enforcer {
            dir: dir.to_path_buf(),
            mark,
            policies,
            attached: HashMap::new(),
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
        match attach(&self.dir, self.mark, cgroup) {
            Ok(instance) => {
                self.attached.insert(cgroup.id, instance);
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
        self.attached.remove(&cgroup_id);
        let _ = self.policies.remove(&cgroup_id);
    }

    pub fn attachments(&self) -> usize {
        self.attached.len()
    }

    /// Detaches everything and removes the pins, for a clean stop.
    pub fn close(self) {
        let Enforcer {
            dir,
            attached,
            policies,
            _base,
            _lock,
            ..
        } = self;
        drop(attached);
        drop(policies);
        drop(_base);
        let _ = std::fs::remove_file(dir.join(POLICIES_MAP));
        let _ = std::fs::remove_dir(&dir);
        drop(_lock);
    }
}

fn load_instance(dir: &Path, cgroup_id: u64, mark: u32) -> Result<Ebpf, EnforcerError> {
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(POLICIES_MAP, dir.join(POLICIES_MAP))
        .override_global(CGROUP_ID_GLOBAL, &cgroup_id, true)
        .override_global(MARK_GLOBAL, &mark, true)
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

fn attach(dir: &Path, mark: u32, cgroup: &Cgroup) -> Result<Ebpf, EnforcerError> {
    let mut instance = load_instance(dir, cgroup.id, mark)?;
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
    program
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(|e| attach_error(error_chain(&e)))?;
    Ok(instance)
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

/// bpffs must be mounted on the nearest existing ancestor of `dir`.
fn check_bpffs(dir: &Path) -> Result<(), EnforcerError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let on_bpffs =
        crate::cgroup::is_fs(existing, BPF_FS_MAGIC).map_err(|source| EnforcerError::Io {
            what: "cannot stat",
            path: existing.to_path_buf(),
            source,
        })?;
    if on_bpffs {
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

fn lock_dir(dir: &Path) -> Result<File, EnforcerError> {
    let file = File::open(dir).map_err(|source| EnforcerError::Io {
        what: "cannot open",
        path: dir.to_path_buf(),
        source,
    })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(EnforcerError::Busy(dir.to_path_buf()));
        }
        return Err(EnforcerError::Io {
            what: "cannot lock",
            path: dir.to_path_buf(),
            source: err,
        });
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
