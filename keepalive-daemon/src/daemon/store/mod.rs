//! The state directory on disk: the policy table (`policies.json` and its journal), the pod
//! policies (`pods.json`), Docker containers' (`docker.json`), the copy of the config file's policies (`config.json`), and the lock
//! that gives a state directory to one daemon.
//!
//! - `file`: a table file, read and replaced whole (atomically);
//! - `journal`: the policy table's changes since it was last written whole;
//! - `lock`: one daemon per state directory.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    host::pathio::{remove_file_if_present, PathIoError},
    host::process::ExecOwner,
    model::policy::Policy,
};

mod file;
mod journal;
mod lock;
mod open;

pub use journal::Change;
pub use lock::{Relock, StateLock};

const FILE_NAME: &str = "policies.json";
/// Pod policies (`kad daemon --kubernetes`), kept so that they stay known, and enforced,
/// across a restart while the API server cannot be reached.
const PODS_FILE_NAME: &str = "pods.json";
/// Docker containers' policies (`kad daemon --docker`), kept as the pods' are.
const DOCKER_FILE_NAME: &str = "docker.json";
/// The config file's policies as last read: what stays in force if the file goes missing.
const CONFIG_COPY_NAME: &str = "config.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("{path}:{line}: {message}; fix or remove the file (kad refuses to start rather than drop policies)")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("another kad daemon is using the state directory {0}: stop it first, or give this one its own --state-dir")]
    Busy(PathBuf),
}

/// One entry of `policies.json`: a policy set with `kad set` or `kad exec`, its fields beside
/// the cgroup's (the shape of a `kad list --json` row). Files written before `exec_owner`,
/// `user_timeout` or `enforce` existed load as they are; a field kad does not know is refused
/// by name (read through [`Entry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Entry")]
pub struct StoredPolicy {
    pub cgroup: String,
    #[serde(flatten)]
    pub policy: Policy,
    /// The `kad exec` run whose transient cgroup this is; the daemon removes the policy and
    /// the cgroup once that process and the cgroup's processes are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_owner: Option<ExecOwner>,
    /// The pod (`namespace/name`) whose annotation this policy is (pods.json only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The container (full id) the policy was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// While that container is stopped: its bundle, whose removal removes the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The user who set it in a cgroup delegated to them; absent for root's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The Docker container (its name) whose label this policy is (docker.json only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
}

/// An entry as read: [`StoredPolicy`]'s fields spelt out, since serde cannot refuse unknown
/// fields beside a flattened struct.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    cgroup: String,
    mode: crate::model::policy::Mode,
    idle: Option<u32>,
    intvl: Option<u32>,
    cnt: Option<u32>,
    #[serde(default)]
    user_timeout: Option<u32>,
    #[serde(default)]
    enforce: bool,
    #[serde(default)]
    locked: bool,
    #[serde(default)]
    exec_owner: Option<ExecOwner>,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    bundle: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    docker: Option<String>,
}

impl From<Entry> for StoredPolicy {
    fn from(e: Entry) -> Self {
        StoredPolicy {
            cgroup: e.cgroup,
            policy: Policy {
                mode: e.mode,
                idle: e.idle,
                intvl: e.intvl,
                cnt: e.cnt,
                user_timeout: e.user_timeout,
                enforce: e.enforce,
                locked: e.locked,
            },
            exec_owner: e.exec_owner,
            pod: e.pod,
            container: e.container,
            bundle: e.bundle,
            uid: e.uid,
            docker: e.docker,
        }
    }
}

impl StoredPolicy {
    pub fn new(cgroup: String, policy: &Policy, exec_owner: Option<ExecOwner>) -> Self {
        StoredPolicy {
            cgroup,
            policy: *policy,
            exec_owner,
            pod: None,
            container: None,
            bundle: None,
            uid: None,
            docker: None,
        }
    }
}

/// The path a saved entry is kept by: checked like the CLI's paths, except that the cgroup2
/// root itself is the host policy's.
fn kept_path(root: &Path, cgroup: &str) -> Result<PathBuf, crate::host::cgroup::CgroupError> {
    if Path::new(cgroup) == root {
        return Ok(root.to_path_buf());
    }
    crate::host::cgroup::checked_path(root, cgroup)
}

pub struct Store {
    path: PathBuf,
    /// Where changes go between rewrites of the whole file; `None` for the files that are only
    /// ever written whole.
    journal: Option<PathBuf>,
    /// Lines in the journal (what a compaction would fold in).
    journal_lines: std::cell::Cell<usize>,
}

impl Store {
    pub fn new(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(FILE_NAME),
            journal: Some(state_dir.join(journal::NAME)),
            journal_lines: std::cell::Cell::new(0),
        }
    }

    /// The pod policies' file in the state directory (written whole, with no journal: it
    /// changes with pod events, not with each request).
    pub fn pods(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(PODS_FILE_NAME),
            journal: None,
            journal_lines: std::cell::Cell::new(0),
        }
    }

    /// Docker containers' policies' file in the state directory (written whole, with no
    /// journal, as the pods').
    pub fn docker(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(DOCKER_FILE_NAME),
            journal: None,
            journal_lines: std::cell::Cell::new(0),
        }
    }

    /// The copy of the config file's policies as last read (written whole, with no journal).
    pub fn config_copy(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(CONFIG_COPY_NAME),
            journal: None,
            journal_lines: std::cell::Cell::new(0),
        }
    }

    /// Lines in the journal since the table was last written whole.
    pub fn journal_len(&self) -> usize {
        self.journal_lines.get()
    }

    /// Appends one change to the journal and syncs it. On failure (a full disk) the journal is
    /// cut back to where it was, so that no partial line is left.
    pub fn record(&self, change: &Change) -> Result<(), StoreError> {
        let journal = self
            .journal
            .as_deref()
            .expect("changes are only recorded in the policies' store, which has a journal");
        journal::append(journal, change)?;
        self.journal_lines.set(self.journal_lines.get() + 1);
        Ok(())
    }

    /// Whether the state file is there (a missing one with pinned policies is worth a warning).
    pub fn exists(&self) -> bool {
        self.path.exists() || self.journal.as_ref().is_some_and(|j| j.exists())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved table; empty when nothing was saved yet. Each path is checked as the config
    /// file's are (`cgroup::checked_path` under `root`) and comes back in the form it is kept by.
    pub fn load(&self, root: &Path) -> Result<Vec<StoredPolicy>, StoreError> {
        let mut table: BTreeMap<String, StoredPolicy> = file::load(&self.path, root)?
            .into_iter()
            .map(|e| (e.cgroup.clone(), e))
            .collect();
        if let Some(journal) = &self.journal {
            let lines = journal::replay(journal, root, &mut table)?;
            self.journal_lines.set(lines);
        }
        Ok(table.into_values().collect())
    }

    /// Writes the table whole, so that a crash leaves either the old table or the new one; a
    /// failed save (a full disk) leaves the old file and no temporary one.
    pub fn save(&self, entries: &[StoredPolicy]) -> Result<(), StoreError> {
        let mut text = serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into());
        text.push('\n');
        file::replace(&self.path, &text)?;
        // The table holds every change now: the journal starts again (replaying it on the new
        // table would change nothing if this is cut short by a crash).
        if let Some(journal) = &self.journal {
            journal::restart(journal)?;
            self.journal_lines.set(0);
        }
        Ok(())
    }
}

/// Removes the saved policies and, if nothing else is in it, the state directory.
pub fn purge(state_dir: &Path) -> Result<(), StoreError> {
    let store = Store::new(state_dir);
    let copy = Store::config_copy(state_dir);
    let files = [
        store.path.clone(),
        file::tmp_path(&store.path),
        copy.path.clone(),
        file::tmp_path(&copy.path),
    ];
    for path in files.into_iter().chain(store.journal) {
        remove_file_if_present(&path)?;
    }
    let _ = std::fs::remove_dir(state_dir);
    Ok(())
}
