//! The anchor cgroups kad's cgroup programs are attached to: attaching and detaching them,
//! adopting the links an earlier run pinned (pointed at this run's programs with
//! `BPF_LINK_UPDATE`, no gap), and which program each anchor runs now.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::programs::ProgramFd;
use tracing::{info, warn};

use super::{
    bpffs::{replace_pin, ANCHORS_DIR},
    bpfsys::{self, CgroupHook},
    KernelError,
};
use crate::host::{
    logging::{held_note, LogLimiter},
    pathio::io_err,
};

/// A hook an earlier build of this design attached (cgroup/sock_create): its pin is removed
/// when the anchor is adopted.
const RETIRED_HOOK: &str = "sock_create";

/// The name kad's sock_ops program is loaded with, as the kernel reports it.
const SOCK_OPS_NAME: &str = "kad_sockops";

/// Lines about anchors attached and detached, per period: a cgroup below the root that is made
/// and removed without end is one of each every time.
const LOG_BURST: u32 = 10;
const LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// One anchor cgroup. Its links are held by their pins only, so kad's descriptors do not grow
/// with the number of anchors.
struct Anchor {
    path: PathBuf,
    pins: PathBuf,
}

/// The cgroup programs this run loaded and the anchors they are attached to, by cgroup id.
pub(super) struct Anchors {
    dir: PathBuf,
    programs: HashMap<CgroupHook, ProgramFd>,
    anchors: BTreeMap<u64, Anchor>,
    log: LogLimiter,
    /// The warnings about links whose cgroup is gone, apart: the info lines cannot hide them.
    gone_log: LogLimiter,
}

impl Anchors {
    /// Adopts the anchors pinned under `dir` for `programs` (see [`Anchors::adopt`]).
    pub(super) fn open(
        dir: &Path,
        programs: HashMap<CgroupHook, ProgramFd>,
    ) -> Result<Anchors, KernelError> {
        let mut anchors = Anchors {
            dir: dir.to_path_buf(),
            programs,
            anchors: BTreeMap::new(),
            log: LogLimiter::new(LOG_PERIOD, LOG_BURST),
            gone_log: LogLimiter::new(LOG_PERIOD, LOG_BURST),
        };
        anchors.adopt()?;
        Ok(anchors)
    }

    /// Attaches the cgroup programs to every anchor in `want` (id -> path) that has none, and
    /// detaches the anchors not in it. The anchors in `verify` are asked of the kernel: one
    /// whose link no longer holds its cgroup (removed, and its id given to the cgroup there
    /// now) is attached again. Returns the anchors that could not be attached.
    pub(super) fn set(
        &mut self,
        want: &BTreeMap<u64, PathBuf>,
        verify: &BTreeSet<u64>,
    ) -> Vec<KernelError> {
        let mut errors = Vec::new();
        let stale: Vec<u64> = self
            .anchors
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for (id, path) in want {
            if verify.contains(id) {
                if let Some(anchor) = self.anchors.get(id) {
                    if !holds(&anchor.pins, *id) {
                        if let Some(held) = self.gone_log.allow() {
                            warn!(
                                cgroup = ?path.display().to_string(),
                                "kad's programs hung from a cgroup that is gone: attaching them again{}",
                                held_note(held)
                            );
                        }
                        remove_anchor_pins(&anchor.pins);
                        self.anchors.remove(id);
                    }
                }
            }
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
                    if let Some(held) = self.log.allow() {
                        info!(cgroup = ?path.display().to_string(), "anchored kad's programs{}", held_note(held));
                    }
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

    fn attach(&self, id: u64, path: &Path) -> Result<Anchor, KernelError> {
        let attach_error = |message: String| KernelError::Attach {
            path: path.to_path_buf(),
            message,
        };
        let cgroup = File::open(path).map_err(|e| attach_error(e.to_string()))?;
        // The id is checked on the open directory: a cgroup re-created meanwhile is refused.
        if crate::host::cgroup::id_of_file(&cgroup).map_err(|e| attach_error(e.to_string()))? != id
        {
            return Err(attach_error("the cgroup was re-created meanwhile".into()));
        }
        let other = self.other_kad(&cgroup).map_err(|e| {
            attach_error(format!(
                "cannot ask the kernel which programs already run for it: {e}"
            ))
        })?;
        if let Some(other) = other {
            return Err(attach_error(format!(
                "another kad daemon's program (id {other}) already runs for this cgroup: two \
                 daemons with their own --bpffs would set the same sockets; give this cgroup's \
                 policies to that daemon, or stop it (and, if it is gone, `kad uninstall --bpffs` \
                 its directory)"
            )));
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

    /// A kad sock_ops program that runs for `cgroup` (attached to it or above it) and is not
    /// this daemon's, nor one its own directory holds (the first design's links, retired once
    /// the anchors are in place): another daemon's, with its own bpffs directory.
    fn other_kad(&self, cgroup: &File) -> io::Result<Option<u32>> {
        let ids = bpfsys::effective_programs(cgroup.as_fd(), CgroupHook::SockOps)?;
        let mut own: Vec<u32> = self
            .programs
            .get(&CgroupHook::SockOps)
            .and_then(|p| bpfsys::prog_id_of(p.as_fd()).ok())
            .into_iter()
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.join(super::bpffs::LEGACY_LINKS_DIR)) {
            own.extend(entries.flatten().filter_map(|e| {
                let link = bpfsys::get_pinned(&e.path()).ok()?;
                Some(bpfsys::link_info(link.as_fd()).ok()?.prog_id)
            }));
        }
        Ok(ids.into_iter().find(|id| {
            !own.contains(id) && bpfsys::prog_name(*id).is_ok_and(|name| name == SOCK_OPS_NAME)
        }))
    }

    fn complete(&self, path: &Path, pins: &Path) -> Result<(), KernelError> {
        let cgroup = File::open(path).map_err(|e| KernelError::Attach {
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
                .map_err(|e| KernelError::Attach {
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
        if let Some(held) = self.log.allow() {
            info!(cgroup = ?anchor.path.display().to_string(), "detached kad's programs{}", held_note(held));
        }
    }

    /// Adopts the anchors an earlier run pinned and points their links at this run's
    /// programs. A pin is removed only when the kernel says its cgroup is gone; any other
    /// error leaves it in place (it still enforces) and stops the start.
    fn adopt(&mut self) -> Result<(), KernelError> {
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
                    Err(source) => return Err(KernelError::Pin { path: pin, source }),
                };
                let Some(prog) = self.programs.get(&hook) else {
                    continue; // this kernel cannot run it: the old program stays
                };
                match bpfsys::link_update(link.as_fd(), prog.as_fd()) {
                    Ok(()) => hooks.push(hook),
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => gone = true,
                    Err(source) => return Err(KernelError::Pin { path: pin, source }),
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

    /// Per anchor: its path and the tag of the sock_ops program its link runs now.
    pub(super) fn list(&self) -> Vec<(PathBuf, String)> {
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

    /// Whether the anchor for cgroup `id` is attached and its links still hold the cgroup.
    pub(super) fn holds(&self, id: u64) -> bool {
        self.anchors.get(&id).is_some_and(|a| holds(&a.pins, id))
    }

    pub(super) fn len(&self) -> usize {
        self.anchors.len()
    }
}

/// Whether the pinned links of an anchor still hold the cgroup `id` (the kernel says 0 once
/// the cgroup is gone; without its sock_ops pin an anchor holds nothing). A link the kernel
/// cannot be asked about is taken as holding: it is never removed on a guess.
fn holds(pin_dir: &Path, id: u64) -> bool {
    CgroupHook::ALL.into_iter().all(|hook| {
        match bpfsys::get_pinned(&pin_dir.join(hook.pin_name())) {
            Ok(link) => bpfsys::link_info(link.as_fd()).map_or(true, |i| i.cgroup_id == id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => hook != CgroupHook::SockOps,
            Err(_) => true,
        }
    })
}

fn remove_anchor_pins(pin_dir: &Path) {
    for hook in CgroupHook::ALL {
        let _ = std::fs::remove_file(pin_dir.join(hook.pin_name()));
    }
    let _ = std::fs::remove_file(pin_dir.join(RETIRED_HOOK));
    let _ = std::fs::remove_dir(pin_dir);
}
