//! How many connections the control socket serves at once: counted per peer uid, with root's
//! own slots, which no other user's connections take, so that no local user can take the
//! socket from root.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Limits;

/// The slots taken, within the limits.
pub(super) struct SlotTable {
    limits: Limits,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    root: usize,
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
}

impl SlotTable {
    pub(super) fn new(limits: Limits) -> Arc<SlotTable> {
        Arc::new(SlotTable {
            limits,
            taken: Mutex::default(),
        })
    }
}

/// A connection being served; gives its slot back when dropped.
pub(super) struct Slot {
    table: Arc<SlotTable>,
    uid: u32,
}

impl Slot {
    /// A slot for a connection from `uid`, or why there is none (the client's error line).
    pub(super) fn take(table: &Arc<SlotTable>, uid: u32) -> Result<Slot, String> {
        let limits = table.limits;
        let mut slots = table.taken.lock().unwrap_or_else(|e| e.into_inner());
        if uid == 0 {
            if slots.root >= limits.root {
                return Err(format!(
                    "too many connections from root (limit {}): try again later",
                    limits.root
                ));
            }
            slots.root += 1;
        } else {
            let mine = slots.per_uid.get(&uid).copied().unwrap_or(0);
            if mine >= limits.per_uid {
                return Err(format!(
                    "too many connections from uid {uid} (limit {}): try again later",
                    limits.per_uid
                ));
            }
            if slots.unprivileged >= limits.unprivileged {
                return Err(format!(
                    "too many connections from non-root users (limit {}): try again later",
                    limits.unprivileged
                ));
            }
            slots.unprivileged += 1;
            *slots.per_uid.entry(uid).or_default() += 1;
        }
        Ok(Slot {
            table: Arc::clone(table),
            uid,
        })
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot(uid {})", self.uid)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.table.taken.lock().unwrap_or_else(|e| e.into_inner());
        if self.uid == 0 {
            slots.root -= 1;
        } else {
            slots.unprivileged -= 1;
            if let Some(n) = slots.per_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    slots.per_uid.remove(&self.uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_uid_and_root_keeps_its_own() {
        let s = SlotTable::new(Limits {
            per_uid: 2,
            unprivileged: 3,
            root: 1,
        });
        let a1 = Slot::take(&s, 1000).unwrap();
        let _a2 = Slot::take(&s, 1000).unwrap();
        assert!(Slot::take(&s, 1000)
            .unwrap_err()
            .contains("uid 1000 (limit 2)"));
        let _b1 = Slot::take(&s, 1001).unwrap();
        assert!(Slot::take(&s, 1002).unwrap_err().contains("non-root users"));
        let root = Slot::take(&s, 0).unwrap();
        assert!(Slot::take(&s, 0).unwrap_err().contains("root (limit 1)"));
        drop(a1);
        let _a3 = Slot::take(&s, 1000).unwrap();
        drop(root);
        let _root = Slot::take(&s, 0).unwrap();
    }
}
