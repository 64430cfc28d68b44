//! The kernel side: loads kad's programs once, keeps their maps, attaches the cgroup programs
//! to anchor cgroups, and refreshes existing connections. Everything that must outlive the
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
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues},
    programs::{BtfTracePoint, CgroupSockopt, Iter, ProgramFd, SockOps},
    Btf, Ebpf, EbpfLoader,
};
use keepalive_common::{
    Counters, KernelOffsets, NetDefaults, PathKey, PolicyValue, DEFAULTS_MAP, EPOCH_MAP, FLAG_SLOT,
    HZ_MAP, LISTENERS_MAP, MAX_POLICIES, OFFSETS_CGROUP, OFFSETS_GLOBAL, OFFSETS_KILLS, PATHS_MAP,
    PATH_KEY_LEN, POLICIES_MAP, SCOPE_MAP, SOCK_MAP, STATS_MAP,
};
use tracing::{debug, error, info, warn};

use crate::{
    host::pathio::{io_err, remove_file_if_present, PathIoError},
    kernel::bpfsys::{self, CgroupHook},
    kernel::slots::{Assigned, Slots},
};

/// The programs embedded at build time (see build.rs).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kad-sockops"));
const ANCHORS_DIR: &str = "anchors";
const TRACING_DIR: &str = "tracing";
/// What the first design pinned: one link per policy cgroup, and its maps; and what earlier
/// builds of this design pinned: per-socket state (`KAD_SOCK`), counters by cgroup id
/// (`KAD_COUNTERS`, now an array by slot).
const LEGACY_LINKS_DIR: &str = "links";
const LEGACY_MAPS: [&str; 4] = ["KAD_POLICIES", "KAD_STATS", "KAD_SOCK", "KAD_COUNTERS"];
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// A hook an earlier build of this design attached (cgroup/sock_create): its pin is removed
/// when the anchor is adopted.
const RETIRED_HOOK: &str = "sock_create";
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
    #[error("cannot load the {program} program: {message}")]
    Load {
        program: &'static str,
        message: String,
    },
    #[error("cannot attach to {path}: {message}")]
    Attach { path: PathBuf, message: String },
    #[error(
        "cannot use the pin {path}: {source} (left in place; enforcement continues through it)"
    )]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("BPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("the pinned map {0} is gone (removed by hand?): restart the daemon to re-create it and re-apply every policy")]
    MapGone(PathBuf),
    #[error("too many policies: kad holds at most {MAX_POLICIES}")]
    Full,
    #[error("cannot update existing connections: {0}")]
    Refresh(String),
}

/// What this kernel lets kad do beyond the core (sock_ops); each is `Err`
/// with the reason when it is not available.
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

/// One anchor cgroup. Its links are held by their pins only, so kad's descriptors do not grow
/// with the number of anchors.
struct Anchor {
    path: PathBuf,
    pins: PathBuf,
}

/// A read-only handle on what the kernel changes by itself (counters, and the entries the
/// `mkdir`/`rmdir` hooks add and remove), on descriptors of its own: it answers reads from any
/// thread while the [`Enforcer`] is busy.
pub struct Reader {
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    stats: PerCpuArray<MapData, Counters>,
}

impl Reader {
    fn of(
        policies: &BpfHashMap<MapData, u64, PolicyValue>,
        stats: &PerCpuArray<MapData, Counters>,
    ) -> Result<Reader, EnforcerError> {
        Ok(Reader {
            policies: BpfHashMap::try_from(aya::maps::Map::HashMap(dup_map(
                policies.map(),
                POLICIES_MAP,
            )?))
            .map_err(|e| map_error(POLICIES_MAP, e))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(dup_map(
                stats.map(),
                STATS_MAP,
            )?))
            .map_err(|e| map_error(STATS_MAP, e))?,
        })
    }

    /// The counters of a policy (by its slot), summed over CPUs.
    pub fn counters(&self, slot: u32) -> Counters {
        let mut total = Counters::default();
        if let Ok(per_cpu) = self.stats.get(&slot, 0) {
            for c in per_cpu.iter() {
                total.active += c.active;
                total.passive += c.passive;
                total.failures += c.failures;
                total.keepalive_kills += c.keepalive_kills;
                total.refreshed += c.refreshed;
                total.overridden += c.overridden;
            }
        }
        total
    }

    /// Policy entries by cgroup id, for `status`.
    pub fn map_entries(&self) -> usize {
        self.policies.keys().filter(Result::is_ok).count()
    }
}

/// The same map on a descriptor of its own.
fn dup_map(map: &MapData, name: &'static str) -> Result<MapData, EnforcerError> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| EnforcerError::Map {
            map: name,
            message: e.to_string(),
        })?;
    MapData::from_fd(fd).map_err(|e| map_error(name, e))
}

pub struct Enforcer {
    dir: PathBuf,
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    paths: BpfHashMap<MapData, PathKey, PolicyValue>,
    stats: PerCpuArray<MapData, Counters>,
    scope: BpfHashMap<MapData, u64, u64>,
    /// Moved after every change of `policies`: the programs' remembered decisions (which
    /// ancestor decides for a cgroup without a policy) hold only within one epoch.
    epoch: Array<MapData, u64>,
    epoch_value: u64,
    /// The keepalive sysctls of the namespace an iterator runs in (see `run_iterator_in`).
    defaults: Array<MapData, NetDefaults>,
    /// Counters and entries by id are read through it only, so that the daemon's readers and
    /// the enforcer cannot disagree.
    reader: std::sync::Arc<Reader>,
    programs: HashMap<CgroupHook, ProgramFd>,
    anchors: BTreeMap<u64, Anchor>,
    iter_link: Option<OwnedFd>,
    /// Tracepoint links, by pin name; the pins keep them after the daemon exits.
    _tracing: Vec<OwnedFd>,
    features: Features,
    tag: String,
    /// Which counters slot each policy path counts in.
    slots: Slots,
    /// The kill events of the error-report program, until the daemon takes them.
    kill_log: Option<aya_log::EbpfLogger<super::killlog::KillLog>>,
    /// Holds the programs and maps; dropping it would unload nothing pinned.
    _ebpf: Ebpf,
    /// An exclusive flock on `dir`: one daemon per bpffs directory.
    _lock: File,
}

impl Enforcer {
    /// Opens (creating it if needed) the daemon's bpffs directory, loads the programs, adopts
    /// and upgrades the links an earlier run pinned.
    pub fn open(dir: &Path) -> Result<Self, EnforcerError> {
        // One spelling per directory ("/sys/fs/bpf/x/" is "/sys/fs/bpf/x"): what kad decides
        // never depends on it, but messages and pins should not either.
        let dir: PathBuf = dir.components().collect();
        let dir = dir.as_path();
        ensure_bpffs(dir)?;
        for sub in [ANCHORS_DIR, TRACING_DIR] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
        }
        let lock = lock_dir(dir)?;
        let (offsets, missing) = super::btf::kernel_offsets().unwrap_or_else(|e| {
            (
                KernelOffsets::default(),
                vec![format!("no kernel BTF: {e}")],
            )
        });
        for reason in &missing {
            warn!("{reason}");
        }
        let btf = Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .map_pin_path(POLICIES_MAP, dir.join(POLICIES_MAP))
            .map_pin_path(PATHS_MAP, dir.join(PATHS_MAP))
            .map_pin_path(STATS_MAP, dir.join(STATS_MAP))
            .map_pin_path(SOCK_MAP, dir.join(SOCK_MAP))
            .map_pin_path(LISTENERS_MAP, dir.join(LISTENERS_MAP))
            .map_pin_path(HZ_MAP, dir.join(HZ_MAP))
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .load(PROGRAM)
            .map_err(|e| load_error("kad", &e))?;

        let mut programs = HashMap::new();
        let sock_ops: &mut SockOps = program(&mut ebpf, "kad_sockops")?;
        sock_ops.load().map_err(|e| load_error("sock_ops", &e))?;
        programs.insert(CgroupHook::SockOps, prog_fd(sock_ops.fd(), "sock_ops")?);
        let tag = bpfsys::prog_tag_of(programs[&CgroupHook::SockOps].as_fd())
            .unwrap_or_else(|_| "unknown".into());

        let setsockopt = (|| {
            let p: &mut CgroupSockopt = program(&mut ebpf, "kad_setsockopt")?;
            p.load().map_err(|e| load_error("setsockopt", &e))?;
            prog_fd(p.fd(), "setsockopt")
        })();
        let setsockopt = match setsockopt {
            Ok(fd) => {
                programs.insert(CgroupHook::SetSockopt, fd);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };

        let need_cgroup = |what: &str| -> Result<(), String> {
            if offsets.valid & OFFSETS_CGROUP == 0 {
                return Err(format!("{what}: the kernel's BTF lacks the cgroup fields"));
            }
            Ok(())
        };
        let (iter_link, existing) = match need_cgroup("existing connections").and_then(|()| {
            let btf = btf.as_ref().ok_or("no kernel BTF")?;
            let p: &mut Iter = program(&mut ebpf, "kad_iter_tcp").map_err(|e| e.to_string())?;
            p.load("tcp", btf)
                .map_err(|e| load_error("iter/tcp", &e).to_string())?;
            let fd = p.fd().map_err(|e| e.to_string())?;
            bpfsys::link_iter(fd.as_fd()).map_err(|e| format!("iter/tcp link: {e}"))
        }) {
            Ok(link) => (Some(link), Ok(())),
            Err(e) => (None, Err(e)),
        };

        let mut tracing = Vec::new();
        let mut attach_tp = |name: &'static str, function: &str, pin: &str| {
            let btf = btf.as_ref().ok_or("no kernel BTF")?;
            let p: &mut BtfTracePoint = program(&mut ebpf, name).map_err(|e| e.to_string())?;
            p.load(function, btf)
                .map_err(|e| load_error(name, &e).to_string())?;
            let fd = p.fd().map_err(|e| e.to_string())?;
            let link = bpfsys::link_raw_tracepoint(fd.as_fd())
                .map_err(|e| format!("tp_btf/{function}: {e}"))?;
            replace_pin(&link, &dir.join(TRACING_DIR).join(pin))
                .map_err(|e| format!("pin tp_btf/{function}: {e}"))?;
            tracing.push(link);
            Ok::<(), String>(())
        };
        let mkdir = need_cgroup("new cgroups")
            .and_then(|()| attach_tp("kad_mkdir", "cgroup_mkdir", "mkdir"))
            .and_then(|()| attach_tp("kad_rmdir", "cgroup_rmdir", "rmdir"));
        let kills = if offsets.valid & OFFSETS_KILLS == 0 {
            Err("the kernel's BTF lacks the socket fields".to_string())
        } else {
            attach_tp("kad_error_report", "inet_sk_error_report", "error_report")
        };
        let kill_log = if kills.is_ok() {
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, super::killlog::KillLog::default())
                .map_err(|e| warn!("keepalive kill events will not be logged: {e}"))
                .ok()
        } else {
            None
        };
        let features = Features {
            existing: existing.map_err(|e| brief("existing connections", "Linux 5.15", &e)),
            mkdir: mkdir.map_err(|e| brief("new cgroups", "kernel BTF, Linux 5.5", &e)),
            setsockopt: setsockopt
                .map_err(|e| brief("programs' own options", "Linux 6.1, the oldest tested", &e)),
            kills: kills.map_err(|e| brief("keepalive kills", "Linux 5.14", &e)),
        };

        let policies = BpfHashMap::try_from(take_map(&mut ebpf, POLICIES_MAP)?)
            .map_err(|e| map_error(POLICIES_MAP, e))?;
        let paths = BpfHashMap::try_from(take_map(&mut ebpf, PATHS_MAP)?)
            .map_err(|e| map_error(PATHS_MAP, e))?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, STATS_MAP)?)
            .map_err(|e| map_error(STATS_MAP, e))?;
        let scope = BpfHashMap::try_from(take_map(&mut ebpf, SCOPE_MAP)?)
            .map_err(|e| map_error(SCOPE_MAP, e))?;
        let epoch = Array::try_from(take_map(&mut ebpf, EPOCH_MAP)?)
            .map_err(|e| map_error(EPOCH_MAP, e))?;
        let defaults = Array::try_from(take_map(&mut ebpf, DEFAULTS_MAP)?)
            .map_err(|e| map_error(DEFAULTS_MAP, e))?;
        let reader = std::sync::Arc::new(Reader::of(&policies, &stats)?);
        let mut enforcer = Enforcer {
            dir: dir.to_path_buf(),
            policies,
            paths,
            stats,
            scope,
            epoch,
            epoch_value: 0,
            defaults,
            reader,
            programs,
            anchors: BTreeMap::new(),
            iter_link,
            _tracing: tracing,
            features,
            tag,
            slots: Slots::from_pinned(&[]),
            kill_log,
            _ebpf: ebpf,
            _lock: lock,
        };
        enforcer.slots = Slots::from_pinned(&enforcer.pinned_paths());
        enforcer.adopt_anchors()?;
        Ok(enforcer)
    }

    /// Puts a policy in force for a path and, if the cgroup exists, for its id. The path
    /// entry lets the kernel apply it to a cgroup created there later, inside `mkdir`. The
    /// value counts in the path's counters slot; returns that slot.
    pub fn put(
        &mut self,
        key: &PathKey,
        id: Option<u64>,
        mut value: PolicyValue,
    ) -> Result<u32, EnforcerError> {
        self.check_pins()?;
        let slot = match self.slots.assign(key).ok_or(EnforcerError::Full)? {
            Assigned::Kept(slot) => slot,
            Assigned::New(slot) => {
                // Another path may have counted here before.
                if let Err(e) = self.zero_counters(slot) {
                    self.slots.release(key);
                    return Err(e);
                }
                slot
            }
        };
        value.slot = slot;
        value.flags |= FLAG_SLOT;
        self.paths
            .insert(key, value, 0)
            .map_err(|e| full_or(PATHS_MAP, e))?;
        if let Some(id) = id {
            self.policies
                .insert(id, value, 0)
                .map_err(|e| full_or(POLICIES_MAP, e))?;
            self.next_epoch()?;
        }
        Ok(slot)
    }

    /// After a change of `policies`: the decisions the programs remembered are void.
    fn next_epoch(&mut self) -> Result<(), EnforcerError> {
        self.epoch_value += 1;
        self.epoch
            .set(0, self.epoch_value, 0)
            .map_err(|e| map_error(EPOCH_MAP, e))
    }

    fn zero_counters(&mut self, slot: u32) -> Result<(), EnforcerError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| EnforcerError::Map {
            map: STATS_MAP,
            message: format!("{what}: {e}"),
        })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| {
            EnforcerError::Map {
                map: STATS_MAP,
                message: e.to_string(),
            }
        })?;
        self.stats
            .set(slot, zeros, 0)
            .map_err(|e| map_error(STATS_MAP, e))
    }

    /// Forgets a path's policy (its cgroup's entry is removed with `remove_id`); its counters
    /// slot is free for another path.
    pub fn remove_path(&mut self, key: &PathKey) {
        let _ = self.paths.remove(key);
        self.slots.release(key);
    }

    /// Forgets the policy of a cgroup id. Unknown ids are fine.
    pub fn remove_id(&mut self, id: u64) {
        if self.policies.remove(&id).is_ok() {
            if let Err(e) = self.next_epoch() {
                // Cannot happen short of a broken map; the cgroups below may decide by it.
                error!("{e}: cgroups below {id} may still follow its removed policy");
            }
        }
    }

    /// The cgroup ids that have a policy entry (some may have been put there by `mkdir`).
    pub fn policy_ids(&self) -> Vec<(u64, PolicyValue)> {
        self.policies
            .iter()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
    }

    /// The policies by path an earlier run left in the pinned map.
    pub fn pinned_paths(&self) -> Vec<(PathKey, PolicyValue)> {
        self.paths.iter().filter_map(Result::ok).collect()
    }

    /// Fails if someone removed the pinned maps: an update would reach a map the attached
    /// programs no longer share with the next daemon.
    fn check_pins(&self) -> Result<(), EnforcerError> {
        for name in [POLICIES_MAP, PATHS_MAP] {
            let path = self.dir.join(name);
            if !path.exists() {
                return Err(EnforcerError::MapGone(path));
            }
        }
        Ok(())
    }

    /// Attaches the cgroup programs to every anchor in `want` (id -> path) that has none, and
    /// detaches the anchors not in it. Returns the anchors that could not be attached.
    pub fn set_anchors(&mut self, want: &BTreeMap<u64, PathBuf>) -> Vec<EnforcerError> {
        let mut errors = Vec::new();
        let stale: Vec<u64> = self
            .anchors
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for (id, path) in want {
            if let Some(anchor) = self.anchors.get_mut(id) {
                if anchor.path.as_os_str().is_empty() {
                    // Adopted at start: now its path is known, add any hook it lacks (a
                    // kernel that gained one, or a crash in the middle of an attach).
                    anchor.path = path.clone();
                    let pins = anchor.pins.clone();
                    if let Err(e) = self.complete(path, &pins) {
                        errors.push(e);
                    }
                }
                continue;
            }
            match self.attach(*id, path) {
                Ok(anchor) => {
                    info!(cgroup = ?path.display().to_string(), "anchored kad's programs");
                    self.anchors.insert(*id, anchor);
                }
                Err(e) => errors.push(e),
            }
        }
        for id in stale {
            self.detach(id);
        }
        errors
    }

    fn attach(&self, id: u64, path: &Path) -> Result<Anchor, EnforcerError> {
        let attach_error = |message: String| EnforcerError::Attach {
            path: path.to_path_buf(),
            message,
        };
        let cgroup = File::open(path).map_err(|e| attach_error(e.to_string()))?;
        // The id is checked on the open directory: a cgroup re-created meanwhile is refused.
        if crate::host::cgroup::id_of_file(&cgroup).map_err(|e| attach_error(e.to_string()))? != id
        {
            return Err(attach_error("the cgroup was re-created meanwhile".into()));
        }
        let pin_dir = self.dir.join(ANCHORS_DIR).join(id.to_string());
        std::fs::create_dir_all(&pin_dir).map_err(|e| attach_error(e.to_string()))?;
        for hook in CgroupHook::ALL {
            let Some(prog) = self.programs.get(&hook) else {
                continue;
            };
            let pinned = bpfsys::link_cgroup(prog.as_fd(), cgroup.as_fd(), hook)
                .and_then(|link| replace_pin(&link, &pin_dir.join(hook.pin_name())));
            if let Err(e) = pinned {
                // Nothing half-done: the hooks pinned so far go too.
                remove_anchor_pins(&pin_dir);
                return Err(attach_error(format!("{}: {e}", hook.pin_name())));
            }
        }
        Ok(Anchor {
            path: path.to_path_buf(),
            pins: pin_dir,
        })
    }

    fn complete(&self, path: &Path, pins: &Path) -> Result<(), EnforcerError> {
        let cgroup = File::open(path).map_err(|e| EnforcerError::Attach {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for hook in CgroupHook::ALL {
            let pin = pins.join(hook.pin_name());
            let Some(prog) = self.programs.get(&hook) else {
                continue;
            };
            if pin.exists() {
                continue;
            }
            bpfsys::link_cgroup(prog.as_fd(), cgroup.as_fd(), hook)
                .and_then(|link| replace_pin(&link, &pin))
                .map_err(|e| EnforcerError::Attach {
                    path: path.to_path_buf(),
                    message: format!("{}: {e}", hook.pin_name()),
                })?;
        }
        Ok(())
    }

    fn detach(&mut self, id: u64) {
        let Some(anchor) = self.anchors.remove(&id) else {
            return;
        };
        // The pins hold the links: removing them detaches the programs.
        remove_anchor_pins(&anchor.pins);
        info!(cgroup = ?anchor.path.display().to_string(), "detached kad's programs");
    }

    /// Adopts the anchors an earlier run pinned and points their links at this run's
    /// programs. A pin is removed only when the kernel says its cgroup is gone; any other
    /// error leaves it in place (it still enforces) and stops the start.
    fn adopt_anchors(&mut self) -> Result<(), EnforcerError> {
        let base = self.dir.join(ANCHORS_DIR);
        let entries = std::fs::read_dir(&base).map_err(io_err("cannot read", &base))?;
        for entry in entries {
            let entry = entry.map_err(io_err("cannot read", &base))?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                warn!(pin = ?entry.path().display().to_string(), "not a kad anchor: left alone");
                continue;
            };
            let pin_dir = entry.path();
            let _ = std::fs::remove_file(pin_dir.join(RETIRED_HOOK));
            let mut hooks = Vec::new();
            let mut gone = false;
            for hook in CgroupHook::ALL {
                let pin = pin_dir.join(hook.pin_name());
                let link = match bpfsys::get_pinned(&pin) {
                    Ok(link) => link,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(EnforcerError::Pin { path: pin, source }),
                };
                let Some(prog) = self.programs.get(&hook) else {
                    continue; // this kernel cannot run it: the old program stays
                };
                match bpfsys::link_update(link.as_fd(), prog.as_fd()) {
                    Ok(()) => hooks.push(hook),
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => gone = true,
                    Err(source) => return Err(EnforcerError::Pin { path: pin, source }),
                }
            }
            if gone {
                // The kernel detached these links when the cgroup was removed.
                remove_anchor_pins(&pin_dir);
                continue;
            }
            // Its path is learnt from the table (`set_anchors`); until then it is unknown.
            let path = PathBuf::new();
            self.anchors.insert(
                id,
                Anchor {
                    path,
                    pins: pin_dir,
                },
            );
        }
        Ok(())
    }

    /// Detaches what the first design of kad pinned (one link per policy cgroup, and its
    /// maps), once this design's anchors are in place.
    pub fn retire_legacy(&mut self) -> usize {
        let links = self.dir.join(LEGACY_LINKS_DIR);
        let mut count = 0;
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries.flatten() {
                if std::fs::remove_file(entry.path()).is_ok() {
                    count += 1;
                }
            }
            let _ = std::fs::remove_dir(&links);
        }
        for name in LEGACY_MAPS {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        count
    }

    /// Gives the sockets of the cgroups in `scope` (cgroup id -> deciding policy id, 0 for
    /// none) the policy that decides for them, in each of the network namespaces `netns`.
    /// Returns the number of sockets updated.
    pub fn refresh(&mut self, scope: &[(u64, u64)], netns: &[File]) -> Result<u64, EnforcerError> {
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
            Err(EnforcerError::Refresh(errors.join("; ")))
        }
    }

    /// The counters of a policy (by its slot, see `put`), summed over CPUs.
    pub fn counters(&self, slot: u32) -> Counters {
        self.reader.counters(slot)
    }

    /// A read-only handle for other threads.
    pub fn reader(&self) -> std::sync::Arc<Reader> {
        std::sync::Arc::clone(&self.reader)
    }

    /// The kernel's kill events, for the daemon to read (once).
    pub fn take_kill_log(&mut self) -> Option<aya_log::EbpfLogger<super::killlog::KillLog>> {
        self.kill_log.take()
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Whether the kernel counts keepalive kills.
    pub fn counts_kills(&self) -> bool {
        self.features.kills.is_ok()
    }

    /// The tag of the sock_ops program this daemon loaded (a hash of its instructions).
    pub fn program_tag(&self) -> &str {
        &self.tag
    }

    /// Per anchor: its path and the tag of the sock_ops program its link runs now.
    pub fn anchors(&self) -> Vec<(PathBuf, String)> {
        self.anchors
            .values()
            .map(|a| {
                let tag = bpfsys::get_pinned(&a.pins.join(CgroupHook::SockOps.pin_name()))
                    .and_then(|l| bpfsys::link_info(l.as_fd()))
                    .and_then(|i| bpfsys::prog_tag(i.prog_id))
                    .unwrap_or_else(|_| "?".into());
                (a.path.clone(), tag)
            })
            .collect()
    }

    pub fn attachments(&self) -> usize {
        self.anchors.len()
    }

    /// Policy entries by cgroup id, for `status`.
    pub fn map_entries(&self) -> usize {
        self.reader.map_entries()
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

fn remove_anchor_pins(pin_dir: &Path) {
    for hook in CgroupHook::ALL {
        let _ = std::fs::remove_file(pin_dir.join(hook.pin_name()));
    }
    let _ = std::fs::remove_file(pin_dir.join(RETIRED_HOOK));
    let _ = std::fs::remove_dir(pin_dir);
}

/// Pins `fd` at `path`, replacing what is there (rename over it: never a moment without).
fn replace_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    // bpffs refuses names with dots.
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    bpfsys::pin(fd.as_fd(), &tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The key of a path in the paths map: relative to the cgroup2 root, as the kernel names
/// cgroups in its `cgroup_mkdir` tracepoint ("/a/b").
pub fn path_key(root: &Path, path: &Path) -> Option<PathKey> {
    let relative = path.strip_prefix(root).ok()?;
    let text = format!("/{}", relative.display());
    let bytes = text.as_bytes();
    if bytes.len() >= PATH_KEY_LEN || bytes.contains(&0) {
        return None;
    }
    let mut key = PathKey {
        bytes: [0; PATH_KEY_LEN],
    };
    key.bytes[..bytes.len()].copy_from_slice(bytes);
    Some(key)
}

/// The absolute path a path key stands for.
pub fn key_path(root: &Path, key: &PathKey) -> Option<PathBuf> {
    let len = key.bytes.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&key.bytes[..len]).ok()?;
    Some(root.join(text.strip_prefix('/')?))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EnforcerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EnforcerError::Load {
            program: name,
            message: "missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_error(name, &e))
}

fn prog_fd(
    fd: Result<&ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<ProgramFd, EnforcerError> {
    fd.map_err(|e| load_error(name, &e))?
        .try_clone()
        .map_err(|e| load_error(name, &e))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EnforcerError> {
    ebpf.take_map(name).ok_or(EnforcerError::Map {
        map: name,
        message: "missing from the object".into(),
    })
}

fn load_error(program: &'static str, error: &dyn std::error::Error) -> EnforcerError {
    EnforcerError::Load {
        program,
        message: error_chain(error),
    }
}

fn map_error(map: &'static str, error: aya::maps::MapError) -> EnforcerError {
    EnforcerError::Map {
        map,
        message: error_chain(&error),
    }
}

/// A failed insert into a full map says so, with the limit; others keep the errno.
fn full_or(map: &'static str, error: aya::maps::MapError) -> EnforcerError {
    let message = error_chain(&error);
    if message.contains("E2BIG") || message.contains("os error 7") {
        return EnforcerError::Full;
    }
    EnforcerError::Map { map, message }
}

/// Detaches everything kad pinned under `dir` and removes the directory. Refuses while a daemon
/// holds the directory. Returns the number of anchors detached.
pub fn uninstall(dir: &Path) -> Result<usize, EnforcerError> {
    if !dir.exists() {
        return Ok(0);
    }
    let lock = lock_dir(dir)?;
    let mut count = 0;
    let anchors = dir.join(ANCHORS_DIR);
    if let Ok(entries) = std::fs::read_dir(&anchors) {
        for entry in entries.flatten() {
            remove_tree(&entry.path())?;
            count += 1;
        }
    }
    for sub in [ANCHORS_DIR, TRACING_DIR, LEGACY_LINKS_DIR] {
        remove_tree(&dir.join(sub))?;
    }
    for name in [
        POLICIES_MAP,
        PATHS_MAP,
        STATS_MAP,
        SOCK_MAP,
        LISTENERS_MAP,
        HZ_MAP,
    ]
    .into_iter()
    .chain(LEGACY_MAPS)
    {
        remove_file_if_present(&dir.join(name))?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("cannot remove (not kad's?)", dir)(e).into())
        }
        _ => {}
    }
    drop(lock);
    Ok(count)
}

/// Removes a directory of pins (one level of subdirectories), or a single pin.
fn remove_tree(path: &Path) -> Result<(), PathIoError> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return remove_file_if_present(path);
        }
        Err(e) => return Err(io_err("cannot read", path)(e)),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            remove_tree(&p)?;
        } else {
            remove_file_if_present(&p)?;
        }
    }
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot remove", path)(e)),
        _ => Ok(()),
    }
}

/// bpffs must be mounted on the nearest existing ancestor of `dir`. When that ancestor is
/// `/sys/fs/bpf` itself (the usual place, unmounted on some hosts), it is mounted.
fn ensure_bpffs(dir: &Path) -> Result<(), EnforcerError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let on_bpffs = |path: &Path| {
        crate::host::cgroup::is_fs(path, BPF_FS_MAGIC).map_err(io_err("cannot stat", path))
    };
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
/// Why a feature is off, for `kad status` and the start's log: a verifier log (hundreds of
/// lines) is cut to the line that says what the kernel lacks, and the kernel version the
/// feature needs is named. The whole log goes to the debug log.
fn brief(what: &str, needs: &str, reason: &str) -> String {
    let Some((head, log)) = reason.split_once("Verifier output:") else {
        return format!("{reason}; needs {needs}");
    };
    debug!("{what}: the verifier's output: {log}");
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    // The verifier ends with its statistics; the line before them is its verdict.
    let end = lines
        .iter()
        .position(|l| l.starts_with("verification time") || l.starts_with("processed "))
        .unwrap_or(lines.len());
    let verdict = lines[..end]
        .iter()
        .rev()
        .find(|l| !l.is_empty())
        .copied()
        .unwrap_or("(no verdict in its output)");
    format!(
        "{}; the verifier: {verdict}; needs {needs}",
        head.trim().trim_end_matches('.')
    )
}

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
    fn a_verifier_log_is_cut_to_its_verdict() {
        // As 5.10 refuses the iter/tcp program (shortened).
        let reason = "cannot load the iter/tcp program: the BPF_PROG_LOAD syscall returned \
                      Invalid argument (os error 22). Verifier output: arg#0 type is not a \
                      struct\n0: (bf) r2 = r1\n106: (85) call bpf_setsockopt#49\n\
                      unknown func bpf_setsockopt#49\nverification time 1446 usec\n\
                      stack depth 40\nprocessed 80 insns (limit 1000000)\n: Invalid argument \
                      (os error 22)";
        assert_eq!(
            brief("existing connections", "Linux 5.15", reason),
            "cannot load the iter/tcp program: the BPF_PROG_LOAD syscall returned Invalid \
             argument (os error 22); the verifier: unknown func bpf_setsockopt#49; needs \
             Linux 5.15"
        );
        assert_eq!(
            brief("keepalive kills", "Linux 5.14", "unknown BTF type `x`"),
            "unknown BTF type `x`; needs Linux 5.14"
        );
    }

    #[test]
    fn path_keys_are_relative_to_the_root_and_round_trip() {
        let root = Path::new("/sys/fs/cgroup/unified");
        let key = path_key(root, Path::new("/sys/fs/cgroup/unified/a/b")).expect("a key");
        assert_eq!(&key.bytes[..5], b"/a/b\0");
        assert_eq!(
            key_path(root, &key),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        assert!(path_key(root, Path::new("/elsewhere/a")).is_none());
        let long = root.join("x".repeat(PATH_KEY_LEN));
        assert!(path_key(root, &long).is_none());
    }
}
