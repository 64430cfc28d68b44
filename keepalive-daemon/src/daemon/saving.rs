//! Making the `kad set` table durable: a journal line per change, the whole table now and then.
use std::path::Path;

use tracing::warn;

use super::state::State;
use super::store::{Change, StoreError, StoredPolicy};
use crate::model::policy::Policy;

/// The state file is rewritten whole once its journal has more lines than this, or than the
/// table has entries.
const JOURNAL_COMPACT_MIN: usize = 1024;

impl State {
    /// Makes the table's entry for `path` (or its absence) durable: one journal line, and now
    /// and then the whole table.
    pub(super) fn persist(&self, path: &Path) -> Result<(), StoreError> {
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
        let entries: Vec<StoredPolicy> = self
            .set
            .iter()
            .map(|(path, policy)| self.stored(path, policy))
            .collect();
        self.store.save(&entries)
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
