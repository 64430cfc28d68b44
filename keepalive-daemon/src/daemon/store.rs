//! The policy table on disk: `policies.json` in the state directory, replaced atomically, and
//! the lock that gives a state directory to one daemon.
use std::{
    fs::{self, File},
    io::{self, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    host::cgroup,
    host::pathio::{io_err, remove_file_if_present, PathIoError},
    host::process::ExecOwner,
    model::policy::{Mode, Policy},
};

const FILE_NAME: &str = "policies.json";
/// Changes since `policies.json` was last written, one JSON object per line, each appended and
/// synced before the change is reported done: a `kad set` costs one small write, not a rewrite
/// of the whole table. Folded into `policies.json` at start and when it grows long.
const JOURNAL_NAME: &str = "policies.journal";

/// Bytes kept allocated past the end of the journal. A `kad set` is refused unless its line and
/// this reserve fit; an `unset` may use the reserve, so that a policy can still be removed
/// (and a `kad exec` run collected) when the state disk is full: a few hundred lines.
const JOURNAL_RESERVE: u64 = 32 * 1024;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Set(StoredPolicy),
    Unset(String),
}
/// Pod policies (`kad daemon --kubernetes`), kept so that they stay known, and enforced,
/// across a restart while the API server cannot be reached.
const PODS_FILE_NAME: &str = "pods.json";
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

/// One entry of `policies.json`: a policy set with `kad set` or `kad exec`. Files written
/// before `exec_owner` existed load as they are (no entry of theirs is a `kad exec`'s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub cgroup: String,
    pub mode: Mode,
    pub idle: Option<u32>,
    pub intvl: Option<u32>,
    pub cnt: Option<u32>,
    /// TCP_USER_TIMEOUT (ms) and `--enforce`: absent from files written before they existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforce: bool,
    /// The `kad exec` run whose transient cgroup this is; the daemon removes the policy and
    /// the cgroup once that process and the cgroup's processes are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_owner: Option<ExecOwner>,
    /// The pod (`namespace/name`) whose annotation this policy is (pods.json only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl StoredPolicy {
    pub fn new(cgroup: String, policy: &Policy, exec_owner: Option<ExecOwner>) -> Self {
        StoredPolicy {
            cgroup,
            mode: policy.mode,
            idle: policy.idle,
            intvl: policy.intvl,
            cnt: policy.cnt,
            user_timeout: policy.user_timeout,
            enforce: policy.enforce,
            exec_owner,
            pod: None,
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.mode,
            idle: self.idle,
            intvl: self.intvl,
            cnt: self.cnt,
            user_timeout: self.user_timeout,
            enforce: self.enforce,
        }
    }
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
            journal: Some(state_dir.join(JOURNAL_NAME)),
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
        let dir = journal.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let mut line = serde_json::to_string(change).unwrap_or_default();
        line.push('\n');
        let created = !journal.exists();
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(journal)
            .map_err(io_err("cannot open", journal))?;
        let before = file
            .metadata()
            .map_err(io_err("cannot stat", journal))?
            .len();
        if let Err(e) = reserve(&file, before, line.len() as u64 + JOURNAL_RESERVE) {
            // Only a set is refused for want of the reserve; an unset may use it.
            if matches!(change, Change::Set(_)) && is_no_space(&e) {
                return Err(io_err("cannot write", journal)(e).into());
            }
        }
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(before);
            let _ = file.sync_data();
            // Cutting the line off may have freed the blocks past the end too.
            let _ = reserve(&file, before, JOURNAL_RESERVE);
            return Err(io_err("cannot write", journal)(e).into());
        }
        if created {
            // A new file's name must survive a crash too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("cannot sync", dir))?;
        }
        self.journal_lines.set(self.journal_lines.get() + 1);
        Ok(())
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

    /// The copy of the config file's policies as last read (written whole, with no journal).
    pub fn config_copy(state_dir: &Path) -> Self {
        Store {
            path: state_dir.join(CONFIG_COPY_NAME),
            journal: None,
            journal_lines: std::cell::Cell::new(0),
        }
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
        let mut table: std::collections::BTreeMap<String, StoredPolicy> = self
            .load_snapshot(root)?
            .into_iter()
            .map(|e| (e.cgroup.clone(), e))
            .collect();
        let Some(journal) = &self.journal else {
            return Ok(table.into_values().collect());
        };
        let text = match fs::read_to_string(journal) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err("cannot read", journal)(e).into()),
        };
        let mut lines = 0;
        for (index, line) in text.split_inclusive('\n').enumerate() {
            if !line.ends_with('\n') {
                // A crash in the middle of an append: that change was never reported done.
                tracing::warn!(journal = %journal.display(), "ignoring an incomplete last line");
                break;
            }
            let corrupt = |message: String| StoreError::Corrupt {
                path: journal.clone(),
                line: index + 1,
                message,
            };
            let change: Change = serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
            match change {
                Change::Set(mut entry) => {
                    entry
                        .policy()
                        .validate()
                        .map_err(|e| corrupt(format!("{}: {e}", entry.cgroup)))?;
                    let path = cgroup::checked_path(root, &entry.cgroup)
                        .map_err(|e| corrupt(format!("{}: {e}", entry.cgroup)))?;
                    entry.cgroup = path.display().to_string();
                    table.insert(entry.cgroup.clone(), entry);
                }
                Change::Unset(cgroup) => {
                    table.remove(&cgroup);
                }
            }
            lines += 1;
        }
        self.journal_lines.set(lines);
        Ok(table.into_values().collect())
    }

    fn load_snapshot(&self, root: &Path) -> Result<Vec<StoredPolicy>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot read", &self.path)(e).into()),
        };
        let mut entries: Vec<StoredPolicy> =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
        for entry in &mut entries {
            let corrupt = |message: String| StoreError::Corrupt {
                path: self.path.clone(),
                line: line_of(&text, &entry.cgroup),
                message: format!("{}: {message}", entry.cgroup),
            };
            entry
                .policy()
                .validate()
                .map_err(|e| corrupt(e.to_string()))?;
            let path =
                cgroup::checked_path(root, &entry.cgroup).map_err(|e| corrupt(e.to_string()))?;
            entry.cgroup = path.display().to_string();
        }
        Ok(entries)
    }

    /// Writes the table to a temporary file, syncs it and renames it over the old one, so that
    /// a crash leaves either the old table or the new one. A failed save (a full disk) leaves
    /// the old file and no temporary one.
    pub fn save(&self, entries: &[StoredPolicy]) -> Result<(), StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into());
        text.push('\n');
        let written = File::create(&tmp)
            .map_err(io_err("cannot create", &tmp))
            .and_then(|mut file| {
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io_err("cannot write", &tmp))
            })
            .and_then(|()| {
                fs::rename(&tmp, &self.path).map_err(io_err("cannot replace", &self.path))
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", dir))?;
        // The table holds every change now: the journal starts again (replaying it on the new
        // table would change nothing if this is cut short by a crash).
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        // Made if missing, so that the reserve for removals exists before the first change.
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(journal)
            .map_err(io_err("cannot open", journal))?;
        file.set_len(0)
            .and_then(|()| file.sync_all())
            .map_err(io_err("cannot truncate", journal))?;
        // Truncating gave back the reserve: take it again (the next set asks for it anyway).
        if let Err(e) = reserve(&file, 0, JOURNAL_RESERVE) {
            if is_no_space(&e) {
                tracing::warn!(journal = %journal.display(), "no room for the journal's reserve: removals on a full disk may be refused");
            }
        }
        self.journal_lines.set(0);
        Ok(())
    }
}

/// Allocates `len` bytes of `file` from `offset` without changing its size (`fallocate`,
/// `FALLOC_FL_KEEP_SIZE`): appends within them need no more room on the disk.
fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        |n: u64| libc::off_t::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (offset, len) = (off(offset)?, off(len)?);
    // SAFETY: fallocate on a descriptor we own; it changes no memory of ours.
    if unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an error says the disk (or the quota) is full; other errors of `reserve` (a
/// filesystem without `fallocate`) leave the append to find out.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// An exclusive lock on a state directory, held while the daemon runs: two daemons writing one
/// `policies.json` would overwrite each other's table.
pub struct StateLock {
    _dir: File,
    /// The directory, if this lock created it: removed again on drop while nothing was saved,
    /// so that a daemon that fails to start leaves nothing behind.
    created: Option<PathBuf>,
}

impl StateLock {
    pub fn acquire(state_dir: &Path) -> Result<StateLock, StoreError> {
        let created = match fs::create_dir(state_dir) {
            Ok(()) => Some(state_dir.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
            Err(_) => {
                fs::create_dir_all(state_dir).map_err(io_err("cannot create", state_dir))?;
                Some(state_dir.to_path_buf())
            }
        };
        let lock = |dir: File| {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(dir);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Busy(state_dir.to_path_buf()));
            }
            Err(io_err("cannot lock", state_dir)(err).into())
        };
        let result = File::open(state_dir)
            .map_err(|e| io_err("cannot open", state_dir)(e).into())
            .and_then(lock);
        match result {
            Ok(dir) => Ok(StateLock { _dir: dir, created }),
            Err(e) => {
                if let Some(dir) = created {
                    let _ = fs::remove_dir(dir);
                }
                Err(e)
            }
        }
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        if let Some(dir) = &self.created {
            // Fails, as it should, once the directory holds anything.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Removes the saved policies and, if nothing else is in it, the state directory.
pub fn purge(state_dir: &Path) -> Result<(), StoreError> {
    let store = Store::new(state_dir);
    let copy = Store::config_copy(state_dir);
    let files = [
        store.path.clone(),
        store.path.with_extension("json.tmp"),
        copy.path.clone(),
        copy.path.with_extension("json.tmp"),
    ];
    for path in files.into_iter().chain(store.journal) {
        remove_file_if_present(&path)?;
    }
    let _ = fs::remove_dir(state_dir);
    Ok(())
}

#[cfg(test)]
mod journal_tests {
    use super::*;

    fn entry(cgroup: &str, idle: u32) -> StoredPolicy {
        StoredPolicy::new(
            cgroup.to_string(),
            &Policy::on(Some(idle), None, None).expect("valid"),
            None,
        )
    }

    #[test]
    fn the_journal_is_replayed_over_the_table_and_folded_into_it() {
        let root = crate::host::cgroup::find_root().expect("cgroup2 is mounted");
        let dir = std::env::temp_dir().join(format!("kad-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::new(&dir);
        let a = root.join("kad-journal-a").display().to_string();
        let b = root.join("kad-journal-b").display().to_string();
        store.save(&[entry(&a, 10)]).expect("save");
        store.record(&Change::Set(entry(&b, 20))).expect("record");
        store.record(&Change::Set(entry(&a, 11))).expect("record");
        store.record(&Change::Unset(b.clone())).expect("record");
        // A crash in the middle of an append leaves a line without its end: ignored.
        let mut journal = fs::OpenOptions::new()
            .append(true)
            .open(store.journal.as_deref().expect("journal"))
            .expect("journal");
        journal.write_all(b"{\"set\":{\"cgr").expect("write");
        let fresh = Store::new(&dir);
        let loaded = fresh.load(&root).expect("load");
        assert_eq!(loaded, vec![entry(&a, 11)]);
        assert_eq!(fresh.journal_len(), 3);
        fresh.save(&loaded).expect("fold");
        assert_eq!(
            fs::metadata(fresh.journal.as_deref().expect("journal"))
                .expect("journal")
                .len(),
            0
        );
        assert_eq!(Store::new(&dir).load(&root).expect("load"), loaded);
        // A bad line names the journal and its line.
        fs::write(
            fresh.journal.as_deref().expect("journal"),
            "{\"set\":{\"cgroup\":\"x\"}}\n",
        )
        .expect("write");
        let msg = Store::new(&dir).load(&root).unwrap_err().to_string();
        assert!(msg.contains("policies.journal:1:"), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }
}

/// The line of the first mention of `needle`, to point the user at a bad entry.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kad-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn root() -> PathBuf {
        cgroup::find_root()
            .expect("cgroup2 is mounted (kad needs it)")
            .canonicalize()
            .unwrap()
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = temp_dir("roundtrip");
        let store = Store::new(&dir);
        let root = root();
        assert!(store.load(&root).unwrap().is_empty());
        // Cgroups that do not exist: their policies wait for them.
        let owner = ExecOwner {
            pid: 4321,
            start_time: 99,
            boot_id: "b".into(),
        };
        let entries = vec![
            StoredPolicy::new(
                root.join("kad-store-a").display().to_string(),
                &Policy::on(Some(180), Some(60), Some(20)).unwrap(),
                None,
            ),
            StoredPolicy::new(
                root.join("kad-store-c").display().to_string(),
                &Policy::on(None, None, Some(3))
                    .unwrap()
                    .with_extras(Some(5000), true)
                    .unwrap(),
                None,
            ),
            StoredPolicy::new(
                root.join("kad-store-a/b").display().to_string(),
                &Policy::OFF,
                Some(owner),
            ),
        ];
        store.save(&entries).unwrap();
        // Loaded in path order.
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        assert_eq!(store.load(&root).unwrap(), sorted);
        assert!(!dir.join("policies.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_without_exec_owners_still_load() {
        let dir = temp_dir("old");
        let store = Store::new(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = root().join("kad-exec-4000000");
        fs::write(
            store.path(),
            format!(
                "[{{\"cgroup\": \"{}\", \"mode\": \"on\", \"idle\": 300, \"intvl\": null, \"cnt\": null}}]",
                path.display()
            ),
        )
        .unwrap();
        let loaded = store.load(&root()).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].exec_owner, None, "a name is not an owner");
        assert_eq!(loaded[0].idle, Some(300));
        assert_eq!(
            (loaded[0].user_timeout, loaded[0].enforce),
            (None, false),
            "written before TCP_USER_TIMEOUT and --enforce"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_name_the_file_and_line() {
        let dir = temp_dir("corrupt");
        let store = Store::new(&dir);
        let root = root();
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            store.path(),
            "[\n{\"cgroup\": \"/a\",\n\"mode\": \"on\", \"idle\": x}\n]",
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(msg.contains("policies.json:3:"), "{msg}");

        fs::write(
            store.path(),
            "[\n  {\"cgroup\": \"/a\", \"mode\": \"on\", \"idle\": 0, \"intvl\": null, \"cnt\": null}\n]",
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:2:") && msg.contains("--idle"),
            "{msg}"
        );

        // A path through a symbolic link (here to the cgroup2 root) names its entry's line.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let good = root.join("kad-store-c").display().to_string();
        fs::write(
            store.path(),
            format!(
                "[\n  {{\"cgroup\": \"{good}\", \"mode\": \"off\", \"idle\": null, \"intvl\": null, \"cnt\": null}},\n  {{\"cgroup\": \"{}\", \"mode\": \"off\", \"idle\": null, \"intvl\": null, \"cnt\": null}}\n]",
                link.display()
            ),
        )
        .unwrap();
        let msg = store.load(&root).unwrap_err().to_string();
        assert!(
            msg.contains("policies.json:3:")
                && msg.contains("symbolic link")
                && msg.contains("cgroup2 root"),
            "{msg}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_old_file_and_no_temporary_one() {
        let dir = temp_dir("failed");
        let store = Store::new(&dir);
        // policies.json is a non-empty directory: the rename fails after the write.
        fs::create_dir_all(store.path().join("x")).unwrap();
        let err = store.save(&[]).unwrap_err().to_string();
        assert!(err.contains("cannot replace"), "{err}");
        assert!(!dir.join("policies.json.tmp").exists(), "tmp removed");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_daemon_per_state_directory() {
        let dir = temp_dir("lock");
        let first = StateLock::acquire(&dir).unwrap();
        assert!(dir.is_dir());
        let err = StateLock::acquire(&dir).err().expect("second lock refused");
        assert!(matches!(&err, StoreError::Busy(d) if d == &dir), "{err}");
        assert!(err.to_string().contains("--state-dir"), "{err}");
        assert!(dir.is_dir(), "the refused one removed nothing");
        drop(first);
        // It made the directory and nothing was saved: it leaves nothing behind.
        assert!(!dir.exists());
        let again = StateLock::acquire(&dir).unwrap();
        Store::new(&dir).save(&[]).unwrap();
        drop(again);
        assert!(dir.join("policies.json").exists(), "a used directory stays");
        fs::remove_dir_all(&dir).unwrap();
    }
}
