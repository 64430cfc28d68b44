//! Where kad's cgroup programs hang from, for the policies in force (the rules are in
//! [`super::reconcile`]'s module doc): each policy's anchor candidate, counted; the candidates
//! with none above them, where the programs are attached; the anchors the kernel is to be asked
//! about (their cgroup may have been removed and made again at the same path); and why one
//! could not be attached.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use tracing::{debug, error};

use super::reconcile::decrement;
use crate::{
    host::cgroup,
    kernel::{Kernel, KernelError},
};

pub(super) struct Anchoring {
    /// Anchor candidates (one per policy that has one), counted.
    candidates: BTreeMap<PathBuf, usize>,
    /// Candidates with no candidate above them: where the programs are attached.
    anchored: BTreeSet<PathBuf>,
    dirty: bool,
    /// Anchors whose cgroup may have been removed and made again: their links are asked of
    /// the kernel at the next `apply`.
    verify: BTreeSet<PathBuf>,
    /// Anchors the programs could not be attached to, and why: the policies below them are
    /// not in force.
    failing: BTreeMap<PathBuf, String>,
    /// The cgroup id each anchor was last attached for.
    attached: BTreeMap<PathBuf, u64>,
    /// Whether `failing` changed since `take_news`.
    news: bool,
}

impl Anchoring {
    pub(super) fn new() -> Anchoring {
        Anchoring {
            candidates: BTreeMap::new(),
            anchored: BTreeSet::new(),
            // The anchors an earlier run left attached are brought to what this run's
            // policies need at the first apply, also when that is none.
            dirty: true,
            verify: BTreeSet::new(),
            failing: BTreeMap::new(),
            attached: BTreeMap::new(),
            news: false,
        }
    }

    /// The attached anchor at or above the candidate `c`.
    pub(super) fn above(&self, c: &Path) -> Option<&PathBuf> {
        c.ancestors().find_map(|a| self.anchored.get(a))
    }

    /// Why the programs are not attached for the candidate `c`, if they could not be.
    pub(super) fn error_of(&self, c: &Path) -> Option<String> {
        let anchor = self.above(c)?;
        let e = self.failing.get(anchor)?;
        Some(format!(
            "kad's programs are not attached to {}: {e}",
            anchor.display()
        ))
    }

    /// Whether an anchor's error came or went since the last call (every row may change).
    pub(super) fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// The parents of the attached anchors below `root`: an anchor's own removal and
    /// re-creation are seen only there (a cgroup watched itself may report its removal late,
    /// or never).
    pub(super) fn parents<'a>(&'a self, root: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
        self.anchored
            .iter()
            .filter(move |a| a.as_path() != root)
            .filter_map(|a| a.parent())
            .filter(move |p| p.starts_with(root))
            .map(Path::to_path_buf)
    }

    /// Cgroups at and below `changed` were removed or created: the anchors there are asked of
    /// the kernel at the next `apply` (a cgroup made again at an anchor's path is a new
    /// cgroup, with nothing attached).
    pub(super) fn recheck_at(&mut self, changed: &Path) {
        let below: Vec<PathBuf> = self
            .anchored
            .range(changed.to_path_buf()..)
            .take_while(|p| p.starts_with(changed))
            .cloned()
            .collect();
        if !below.is_empty() {
            self.dirty = true;
            self.verify.extend(below);
        }
    }

    /// Whether the anchor covering the candidate `c` is still the cgroup at its path, with
    /// links that hold it; if not, it is attached again at the next `apply`.
    pub(super) fn recheck(&mut self, c: &Path, kernel: &dyn Kernel) {
        let Some(anchor) = self.above(c).cloned() else {
            return;
        };
        let current = cgroup::id_of(&anchor).ok();
        if let Some(id) = self.attached.get(&anchor) {
            if Some(*id) == current && kernel.anchor_holds(*id) {
                return;
            }
        }
        self.dirty = true;
        self.verify.insert(anchor);
    }

    pub(super) fn add(&mut self, c: &Path) {
        let count = self.candidates.entry(c.to_path_buf()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return;
        }
        if c.ancestors()
            .skip(1)
            .any(|a| self.candidates.contains_key(a))
        {
            return; // covered by an anchor above
        }
        let below: Vec<PathBuf> = self
            .anchored
            .range(c.to_path_buf()..)
            .take_while(|p| p.starts_with(c))
            .cloned()
            .collect();
        for b in below {
            self.anchored.remove(&b);
        }
        self.anchored.insert(c.to_path_buf());
        self.dirty = true;
    }

    pub(super) fn remove(&mut self, c: &Path) {
        if !decrement(&mut self.candidates, c) {
            return;
        }
        if !self.anchored.remove(c) {
            return;
        }
        self.dirty = true;
        // Candidates below it that are now uncovered become anchors.
        let below: Vec<PathBuf> = self
            .candidates
            .range(c.to_path_buf()..)
            .map(|(p, _)| p.clone())
            .take_while(|p| p.starts_with(c))
            .collect();
        for b in below {
            if !b
                .ancestors()
                .skip(1)
                .any(|a| self.candidates.contains_key(a))
            {
                self.anchored.insert(b);
            }
        }
    }

    /// Attaches and detaches the programs so that exactly the anchors are attached; returns
    /// the anchors that could not be attached (tried again at the next change).
    pub(super) fn apply(&mut self, kernel: &mut dyn Kernel) -> Vec<KernelError> {
        if !self.dirty {
            return Vec::new();
        }
        self.dirty = false;
        let mut want = BTreeMap::new();
        let mut verify = BTreeSet::new();
        for path in &self.anchored {
            match cgroup::id_of(path) {
                Ok(id) => {
                    want.insert(id, path.clone());
                    if self.verify.contains(path) {
                        verify.insert(id);
                    }
                }
                // Its removal is an inotify event: the policies below it are placed again.
                Err(e) => debug!(cgroup = ?path.display().to_string(), "anchor vanished: {e}"),
            }
        }
        self.verify.clear();
        let errors = kernel.set_anchors(&want, &verify);
        let mut failing = BTreeMap::new();
        for e in &errors {
            self.dirty = true;
            if let KernelError::Attach { path, message } = e {
                failing.insert(path.clone(), message.clone());
            }
        }
        self.attached = want
            .into_iter()
            .filter(|(_, path)| !failing.contains_key(path))
            .map(|(id, path)| (path, id))
            .collect();
        // An error is logged once, when it comes (the next event tries again).
        for (path, message) in &failing {
            if self.failing.get(path) != Some(message) {
                error!(cgroup = ?path.display().to_string(), "cannot attach kad's programs: {message}");
            }
        }
        if failing != self.failing {
            self.failing = failing;
            self.news = true;
        }
        errors
    }
}
