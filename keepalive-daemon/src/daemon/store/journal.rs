//! The policy table's journal, `policies.journal`: the changes since `policies.json` was last
//! written, one JSON object per line, each appended and synced before the change is reported
//! done, so that a `kad set` costs one small write, not a rewrite of the whole table. Folded
//! into `policies.json` at start and when it grows long.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Write},
    os::fd::AsRawFd,
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{StoreError, StoredPolicy};
use crate::host::pathio::{io_err, PathIoError};

/// The journal's file name in the state directory.
pub(super) const NAME: &str = "policies.journal";

/// Bytes kept allocated past the end of the journal. A `kad set` is refused unless its line and
/// this reserve fit; an `unset` may use the reserve, so that a policy can still be removed
/// (and a `kad exec` run collected) when the state disk is full: a few hundred lines.
const RESERVE: u64 = 32 * 1024;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Set(StoredPolicy),
    Unset(String),
}

/// Appends `change` to the journal and syncs it; on failure the journal is cut back to where
/// it was, so that no partial line is left.
pub(super) fn append(journal: &Path, change: &Change) -> Result<(), PathIoError> {
    let dir = journal.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let mut line = serde_json::to_string(change).unwrap_or_default();
    line.push('\n');
    let created = fs::symlink_metadata(journal).is_err();
    let mut file = super::open::open(journal, fs::OpenOptions::new().create(true).append(true))
        .map_err(io_err("cannot open", journal))?;
    let before = file
        .metadata()
        .map_err(io_err("cannot stat", journal))?
        .len();
    if let Err(e) = reserve(&file, before, line.len() as u64 + RESERVE) {
        // Only a set is refused for want of the reserve; an unset may use it.
        if matches!(change, Change::Set(_)) && is_no_space(&e) {
            return Err(io_err("cannot write", journal)(e));
        }
    }
    let written = file
        .write_all(line.as_bytes())
        .and_then(|()| file.sync_data());
    if let Err(e) = written {
        let _ = file.set_len(before);
        let _ = file.sync_data();
        // Cutting the line off may have freed the blocks past the end too.
        let _ = reserve(&file, before, RESERVE);
        return Err(io_err("cannot write", journal)(e));
    }
    if created {
        // A new file's name must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", dir))?;
    }
    Ok(())
}

/// Replays the journal over `table` (keyed by cgroup path), checking each set as the table
/// file's entries are; returns the number of lines replayed. No journal is an empty one.
pub(super) fn replay(
    journal: &Path,
    root: &Path,
    table: &mut BTreeMap<String, StoredPolicy>,
) -> Result<usize, StoreError> {
    let text = match super::open::read(journal) {
        Ok(text) => text.unwrap_or_default(),
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
            path: journal.to_path_buf(),
            line: index + 1,
            message,
        };
        let change: Change = serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
        match change {
            Change::Set(mut entry) => {
                entry
                    .policy
                    .validate()
                    .map_err(|e| corrupt(format!("{}: {e}", entry.cgroup)))?;
                let path = super::kept_path(root, &entry.cgroup)
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
    Ok(lines)
}

/// Empties the journal once the table file holds every change, and takes its reserve again.
pub(super) fn restart(journal: &Path) -> Result<(), PathIoError> {
    // Made if missing, so that the reserve for removals exists before the first change.
    let file = super::open::open(
        journal,
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false),
    )
    .map_err(io_err("cannot open", journal))?;
    file.set_len(0)
        .and_then(|()| file.sync_all())
        .map_err(io_err("cannot truncate", journal))?;
    // Truncating gave back the reserve: take it again (the next set asks for it anyway).
    if let Err(e) = reserve(&file, 0, RESERVE) {
        if is_no_space(&e) {
            tracing::warn!(journal = %journal.display(), "no room for the journal's reserve: removals on a full disk may be refused");
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;
    use crate::model::policy::Policy;

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
