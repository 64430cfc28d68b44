//! Brings the kernel in line with the policy table, path by path: map entries by path and by
//! cgroup id, the anchors the cgroup programs are attached to, the directories to watch, and
//! the refresh of existing connections.
//!
//! Anchors: a policy's programs are attached to the parent of its cgroup (or, while that does
//! not exist, its nearest existing ancestor), never to the cgroup2 root; a policy on a child of
//! the root is anchored on its own cgroup. The one exception is the host policy (kept by the
//! root's path): it is anchored on the root, which then covers every other anchor. So a cgroup created at a policy path is already
//! below an anchor, and the `mkdir` hook gives it its policy before a process can join it.
//! Only anchors with no anchor above them are attached: a socket runs kad's programs once.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use keepalive_common::{PathKey, PolicyValue, FLAG_CONFIG};
use tracing::{error, info};

use super::anchoring::Anchoring;
use crate::{
    host::{
        cgroup,
        logging::{held_note, LogLimiter},
    },
    kernel::{keys, Kernel, KernelError},
    model::policy::Policy,
};

/// Lines about cgroups appearing and re-created, per period.
const LOG_BURST: u32 = 10;
const LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a policy in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `kad set`, saved in the state directory; wins over the config file.
    Set,
    /// The config file.
    Config,
    /// A pod's (or its namespace's) annotation, from the pod watcher.
    Pod,
    /// A Docker container's label, from the Docker watcher.
    Docker,
}

impl Source {
    /// Where such a policy comes from, for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Source::Set => "kad set by root",
            Source::Config => "the config file",
            Source::Pod => "a pod's annotation",
            Source::Docker => "a Docker container's label",
        }
    }
}

/// What the kernel holds for one policy path.
#[derive(Debug, Clone)]
pub struct InForce {
    /// The cgroup at the path when last seen; None while it does not exist.
    pub id: Option<u64>,
    pub policy: Policy,
    pub source: Source,
    /// Where its counters are (see `slots`).
    pub slot: u32,
    anchor: Option<PathBuf>,
    watch: PathBuf,
}

pub struct Reconciler {
    root: PathBuf,
    pub kernel: Box<dyn Kernel>,
    in_force: BTreeMap<PathBuf, InForce>,
    anchors: Anchoring,
    /// Cgroups appearing and re-created at policy paths: as often as anyone can `mkdir`.
    cgroup_log: LogLimiter,
    /// Directories to watch, counted.
    watches: BTreeMap<PathBuf, usize>,
    /// The last error applying a path's policy, logged once.
    failing: BTreeMap<PathBuf, String>,
}

impl Reconciler {
    pub fn new(root: PathBuf, kernel: Box<dyn Kernel>) -> Reconciler {
        Reconciler {
            root,
            kernel,
            in_force: BTreeMap::new(),
            anchors: Anchoring::new(),
            cgroup_log: LogLimiter::new(LOG_PERIOD, LOG_BURST),
            watches: BTreeMap::new(),
            failing: BTreeMap::new(),
        }
    }

    pub fn in_force(&self) -> &BTreeMap<PathBuf, InForce> {
        &self.in_force
    }

    /// Why the policy of `path` is not in force: its own error, or its anchor's.
    pub fn failing(&self, path: &Path) -> Option<String> {
        if let Some(e) = self.failing.get(path) {
            return Some(e.clone());
        }
        self.anchors
            .error_of(self.in_force.get(path)?.anchor.as_deref()?)
    }

    /// Whether an anchor's error came or went since the last call (every row may change).
    pub fn take_anchor_news(&mut self) -> bool {
        self.anchors.take_news()
    }

    /// Cgroups at and below `changed` were removed or created: the anchors there are asked of
    /// the kernel at the next `apply_anchors`.
    pub fn recheck_anchors_at(&mut self, changed: &Path) {
        self.anchors.recheck_at(changed);
    }

    /// The anchor covering `path`'s policy is checked: a `kad set` never answers "done" over
    /// an anchor that holds nothing.
    pub fn recheck_anchor_of(&mut self, path: &Path) {
        if let Some(c) = self.in_force.get(path).and_then(|e| e.anchor.clone()) {
            self.anchors.recheck(&c, self.kernel.as_ref());
        }
    }

    /// The directories to watch: where each policy's cgroup would appear, and the parent of
    /// each anchor (the anchor's own removal and re-creation are seen only there: a cgroup
    /// watched itself may report its removal late, or never).
    pub fn watch_dirs(&self) -> BTreeSet<PathBuf> {
        let mut dirs: BTreeSet<PathBuf> = self.watches.keys().cloned().collect();
        dirs.extend(self.anchors.parents(&self.root));
        dirs
    }

    /// Puts `want` in force for `path` (or removes what is there). Returns whether anything
    /// changed for the sockets below the path (a refresh is then due).
    pub fn sync(
        &mut self,
        path: &Path,
        want: Option<(Policy, Source)>,
    ) -> Result<bool, KernelError> {
        let result = self.sync_inner(path, want);
        match &result {
            Ok(_) => {
                if self.failing.remove(path).is_some() {
                    info!(cgroup = ?path.display().to_string(), "policy applied");
                }
            }
            Err(e) => {
                let message = e.to_string();
                if self.failing.get(path) != Some(&message) {
                    error!(cgroup = ?path.display().to_string(), "cannot apply policy: {message}");
                    self.failing.insert(path.to_path_buf(), message);
                }
            }
        }
        result
    }

    fn sync_inner(
        &mut self,
        path: &Path,
        want: Option<(Policy, Source)>,
    ) -> Result<bool, KernelError> {
        let key = keys::path_key(&self.root, path).ok_or_else(|| KernelError::Map {
            map: keepalive_common::PATHS_MAP,
            message: format!(
                "{} is longer than {} bytes below the cgroup2 root",
                path.display(),
                keepalive_common::PATH_KEY_LEN - 1
            ),
        })?;
        let current = cgroup::id_of(path).ok();
        let have = self.in_force.get(path).cloned();
        let Some((policy, source)) = want else {
            let Some(have) = have else {
                return Ok(false);
            };
            self.kernel.remove_path(&key);
            if let Some(id) = have.id {
                self.kernel.remove_id(id);
            }
            self.forget(path, &have);
            return Ok(true);
        };
        let same_values = have
            .as_ref()
            .is_some_and(|h| h.policy == policy && h.source == source);
        let value = to_value(&policy, source);
        let old_id = have.as_ref().and_then(|h| h.id);
        if same_values && old_id == current {
            // Nothing new for the kernel; the anchor and watch may have moved.
            self.place(path, have.as_ref());
            return Ok(false);
        }
        let slot = self.kernel.put(&key, current, value)?;
        let news = if let Some(old) = old_id.filter(|old| Some(*old) != current) {
            self.kernel.remove_id(old);
            current
                .is_some()
                .then_some("cgroup re-created: policy in force for the new one")
        } else if old_id.is_none() && current.is_some() && have.is_some() {
            Some("cgroup appeared: policy in force")
        } else {
            None
        };
        if let Some(news) = news {
            if let Some(held) = self.cgroup_log.allow() {
                info!(cgroup = ?path.display().to_string(), "{news}{}", held_note(held));
            }
        }
        let entry = InForce {
            id: current,
            policy,
            source,
            slot,
            anchor: None,
            watch: PathBuf::new(),
        };
        self.in_force.insert(path.to_path_buf(), entry);
        self.place(path, have.as_ref());
        Ok(true)
    }

    /// Updates the anchor candidate and the watched directory of a path in force.
    fn place(&mut self, path: &Path, previous: Option<&InForce>) {
        let anchor = self.anchor_for(path);
        let watch = if path == self.root {
            self.root.clone()
        } else if path.is_dir() {
            path.parent().unwrap_or(&self.root).to_path_buf()
        } else {
            cgroup::nearest_existing(path.parent().unwrap_or(&self.root)).to_path_buf()
        };
        if let Some(prev) = previous {
            if prev.anchor == anchor && prev.watch == watch {
                if let Some(e) = self.in_force.get_mut(path) {
                    e.anchor = anchor;
                    e.watch = watch;
                }
                return;
            }
            if let Some(a) = prev.anchor.clone() {
                self.anchors.remove(&a);
            }
            if !prev.watch.as_os_str().is_empty() {
                decrement(&mut self.watches, &prev.watch);
            }
        }
        if let Some(a) = &anchor {
            self.anchors.add(a);
        }
        *self.watches.entry(watch.clone()).or_insert(0) += 1;
        if let Some(e) = self.in_force.get_mut(path) {
            e.anchor = anchor;
            e.watch = watch;
        }
    }

    fn forget(&mut self, path: &Path, have: &InForce) {
        if let Some(a) = &have.anchor {
            self.anchors.remove(a);
        }
        if !have.watch.as_os_str().is_empty() {
            decrement(&mut self.watches, &have.watch);
        }
        self.in_force.remove(path);
        self.failing.remove(path);
    }

    /// The directory a policy's programs hang from (see the module comment), if one exists.
    fn anchor_for(&self, path: &Path) -> Option<PathBuf> {
        if path == self.root {
            // The host policy: the only policy whose programs hang from the root.
            return Some(self.root.clone());
        }
        let parent = path.parent()?;
        let start = if parent == self.root { path } else { parent };
        let existing = cgroup::nearest_existing(start);
        (existing != self.root && existing.starts_with(&self.root)).then(|| existing.to_path_buf())
    }

    /// Attaches and detaches the programs so that exactly the anchors are attached; returns
    /// the anchors that could not be attached (tried again at the next change).
    pub fn apply_anchors(&mut self) -> Vec<KernelError> {
        self.anchors.apply(self.kernel.as_mut())
    }

    /// Removes map entries by cgroup id that no cgroup at a policy path accounts for: what an
    /// earlier run left behind. Run at start (and after pod changes): afterwards the kernel
    /// removes a cgroup's entry when the cgroup is removed. The paths are looked at again here,
    /// so that an entry the `mkdir` hook made for a cgroup created a moment ago is kept, and so
    /// are the entries of `wanted` paths (the table's), also where this run could not put the
    /// policy in force (a transient error is never a reason to remove enforcement).
    pub fn drop_stale_ids<'a>(&mut self, wanted: impl IntoIterator<Item = &'a PathBuf>) -> usize {
        // Listed before the paths are looked at: an entry the mkdir hook makes meanwhile is
        // for a cgroup that the look finds.
        let ids = self.kernel.policy_ids();
        let mut live: HashSet<u64> = wanted
            .into_iter()
            .filter_map(|path| cgroup::id_of(path).ok())
            .collect();
        live.extend(
            self.in_force
                .keys()
                .filter_map(|path| cgroup::id_of(path).ok())
                .chain(self.in_force.values().filter_map(|e| e.id)),
        );
        let stale: Vec<u64> = ids
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !live.contains(id))
            .collect();
        for id in &stale {
            self.kernel.remove_id(*id);
        }
        stale.len()
    }

    /// Removes the policies by path an earlier run left in the pinned map that this run has no
    /// policy for (a config-file policy removed while no daemon ran): left there, the `mkdir`
    /// hook would put one in force again for a cgroup created at its path. Run at start, after
    /// every path of the table is in force (and the state file's are adopted); a path of the
    /// table (`wanted`) is kept even if this run could not put it in force. Returns the paths
    /// removed.
    pub fn drop_stale_paths(&mut self, wanted: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
        let stale: Vec<(PathKey, Option<PathBuf>)> = self
            .kernel
            .pinned_paths()
            .into_iter()
            .map(|(key, _)| (key, keys::key_path(&self.root, &key)))
            .filter(|(_, path)| {
                path.as_ref()
                    .is_none_or(|path| !self.in_force.contains_key(path) && !wanted.contains(path))
            })
            .collect();
        let mut removed = Vec::new();
        for (key, path) in stale {
            self.kernel.remove_path(&key);
            removed.extend(path);
        }
        removed
    }

    /// Gives the existing sockets of the cgroups at and below `path` the policy that now
    /// decides for each (nothing for those whose deciding policy is gone or off). Returns how
    /// many sockets were updated.
    pub fn refresh(&mut self, path: &Path) -> u64 {
        if self.kernel.features().existing.is_err() || !path.is_dir() {
            return 0;
        }
        let mut scope = Vec::new();
        let mut netns = Vec::new();
        let mut seen_ns = HashSet::new();
        for dir in cgroup::subtree(path) {
            let Ok(id) = cgroup::id_of(&dir) else {
                continue;
            };
            scope.push((id, self.deciding_id(&dir)));
            for pid in cgroup::procs(&dir) {
                let ns_path = format!("/proc/{pid}/ns/net");
                if let Ok(file) = File::open(&ns_path) {
                    if let Ok(meta) = file.metadata() {
                        if seen_ns.insert((meta.dev(), meta.ino())) {
                            netns.push(file);
                        }
                    }
                }
            }
        }
        if netns.is_empty() {
            return 0; // no process, no socket to reach
        }
        let started = std::time::Instant::now();
        let result = self.kernel.refresh(&scope, &netns);
        super::metrics::refresh::record(started.elapsed(), result.is_ok());
        match result {
            Ok(n) => {
                if n > 0 {
                    info!(cgroup = ?path.display().to_string(), sockets = n, namespaces = netns.len(), "existing connections updated");
                }
                n
            }
            Err(e) => {
                error!(cgroup = ?path.display().to_string(), "{e}");
                0
            }
        }
    }

    /// The id of the cgroup whose policy decides for `dir` (0: none).
    fn deciding_id(&self, dir: &Path) -> u64 {
        for a in dir.ancestors() {
            if let Some(e) = self.in_force.get(a) {
                return e.id.unwrap_or(0);
            }
            if a == self.root {
                break;
            }
        }
        0
    }
}

/// The kernel's form of a policy (the kernel side adds its counters slot).
pub fn to_value(policy: &Policy, source: Source) -> PolicyValue {
    let mut value = policy.to_value();
    if source == Source::Config {
        value.flags |= FLAG_CONFIG;
    }
    value
}

/// Decrements a count, removing the key at zero; true when it was removed.
pub(super) fn decrement(map: &mut BTreeMap<PathBuf, usize>, key: &Path) -> bool {
    match map.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            map.remove(key);
            true
        }
        None => false,
    }
}
