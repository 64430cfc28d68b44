//! Making the `kad set` table durable: a journal line per change, the whole table now and then.
use std::{os::unix::fs::MetadataExt, path::Path};

use tracing::{error, warn};

use super::state::State;
use super::store::{Change, StoreError, StoredPolicy};
use crate::host::logging::held_note;
use crate::model::policy::Policy;

/// The state file is rewritten whole once its journal has more lines than this, or than the
/// table has entries.
const JOURNAL_COMPACT_MIN: usize = 1024;

impl State {
    /// Makes the table's entry for `path` (or its absence) durable: one journal line, and now
    /// and then the whole table.
    pub(super) fn persist(&self, path: &Path) -> Result<(), StoreError> {
        self.ensure_state_dir();
        let cgroup = path.display().to_string();
        let change = match self.set.get(path) {
            Some(policy) => Change::Set(self.stored(path, policy)),
            None => Change::Unset(cgroup),
        };
        self.store.record(&change)?;
        if self.store.journal_len() > JOURNAL_COMPACT_MIN.max(self.set.len()) {
            // The change is durable already; a failed compaction is tried again later.
            if let Err(e) = self.save() {
                warn!("cannot rewrite the state file (the journal keeps every change): {e}");
            }
        }
        Ok(())
    }

    pub(super) fn save(&self) -> Result<(), StoreError> {
        self.ensure_state_dir();
        let entries: Vec<StoredPolicy> = self
            .set
            .iter()
            .map(|(path, policy)| self.stored(path, policy))
            .collect();
        self.store.save(&entries)
    }

    /// Before a save: if the state directory was removed (or replaced) since it was last
    /// written, it is made again and every table written to it whole, loudly; otherwise a
    /// journal line alone would land in an empty directory and the rest be lost at the next
    /// start.
    pub(super) fn ensure_state_dir(&self) {
        let dir = &self.config.state_dir;
        let now = dir_id(dir);
        if now.is_some() && now == self.state_dir_id.get() {
            return;
        }
        if self.state_dir_id.get().is_none() {
            // There was none at the start (unit tests): the first save makes it.
            self.state_dir_id.set(now);
            return;
        }
        // Every save comes here while the directory cannot be made again: the lines are
        // limited; the attempt is not.
        let note = self.state_dir_log.borrow_mut().allow();
        if let Some(held) = note {
            error!(
                state_dir = %dir.display(),
                "the state directory was removed or replaced while the daemon ran: making it \
                 again and writing every policy to it again{}",
                held_note(held)
            );
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            if note.is_some() {
                error!(state_dir = %dir.display(), "cannot make the state directory again: {e}");
            }
            return;
        }
        // Set first: the saves below check it too.
        self.state_dir_id.set(dir_id(dir));
        if let Err(e) = self.state_dir_lock.borrow_mut().relock(dir) {
            error!("{e}");
        }
        // The whole table, which also empties the journal (now ahead of nothing).
        if let Err(e) = self.save() {
            error!("cannot write the state file again: {e}");
        }
        if let Err(e) = self.save_pods() {
            error!("cannot write the pod policies again: {e}");
        }
        if let Err(e) = self.save_docker() {
            error!("cannot write the Docker policies again: {e}");
        }
        super::state::save_config_copy(
            &super::store::Store::config_copy(dir),
            &self.from_config,
            &self.root,
        );
    }

    /// The state file's entry for a policy of the `kad set` table.
    fn stored(&self, path: &Path, policy: &Policy) -> StoredPolicy {
        let container = self.containers.get(path);
        StoredPolicy {
            uid: self.owners.get(path).copied(),
            container: container.map(|c| c.id.clone()),
            bundle: container
                .and_then(|c| c.stopped_bundle.as_ref())
                .map(|b| b.display().to_string()),
            ..StoredPolicy::new(
                path.display().to_string(),
                policy,
                self.exec_owners.get(path).cloned(),
            )
        }
    }
}

/// The state directory's device and inode, to tell it from one made again at its path.
pub(super) fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}
