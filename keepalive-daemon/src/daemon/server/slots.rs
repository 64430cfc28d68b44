//! How many connections the control socket serves at once: counted per peer uid, with root's
//! own slots, which no other user's connections take, so that no local user can take the
//! socket from root. Root's connections over its slots wait for one (root is not refused for
//! being busy); other users' are refused at once.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Limits;

/// The slots taken, within the limits.
pub(super) struct SlotTable {
    limits: Limits,
    taken: Mutex<Taken>,
    root: Arc<Semaphore>,
    /// Root's connections waiting for a slot.
    root_waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Taken {
    unprivileged: usize,
    per_uid: HashMap<u32, usize>,
}

impl SlotTable {
    pub(super) fn new(limits: Limits) -> Arc<SlotTable> {
        Arc::new(SlotTable {
            limits,
            taken: Mutex::default(),
            root: Arc::new(Semaphore::new(limits.root)),
            root_waiting: AtomicUsize::new(0),
        })
    }
}

/// A connection being served; gives its slot back when dropped.
pub(super) enum Slot {
    Root(#[allow(dead_code)] OwnedSemaphorePermit),
    User { table: Arc<SlotTable>, uid: u32 },
}

/// What a connection gets at accept.
pub(super) enum Admission {
    Now(Slot),
    /// Root, with every root slot taken: [`RootTurn::wait`] for one.
    Queued(RootTurn),
    /// The client's error line.
    Refused(String),
}

/// A root connection's place in the queue for a slot.
pub(super) struct RootTurn {
    table: Arc<SlotTable>,
}

impl RootTurn {
    pub(super) async fn wait(self) -> Slot {
        let permit = Arc::clone(&self.table.root).acquire_owned().await;
        // The semaphore is never closed.
        Slot::Root(permit.expect("root slots are never closed"))
    }
}

impl Drop for RootTurn {
    fn drop(&mut self) {
        self.table.root_waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slot {
    /// A slot for a connection from `uid`, a place in root's queue, or why there is none.
    pub(super) fn take(table: &Arc<SlotTable>, uid: u32) -> Admission {
        let limits = table.limits;
        if uid == 0 {
            if let Ok(permit) = Arc::clone(&table.root).try_acquire_owned() {
                return Admission::Now(Slot::Root(permit));
            }
            // Bounded all the same: each waiting connection holds a descriptor.
            let waiting = table.root_waiting.fetch_add(1, Ordering::SeqCst);
            let turn = RootTurn {
                table: Arc::clone(table),
            };
            if waiting >= limits.root_queue {
                return Admission::Refused(format!(
                    "too many connections from root ({} served, {} waiting): try again later",
                    limits.root, limits.root_queue
                ));
            }
            return Admission::Queued(turn);
        }
        let mut slots = table.taken.lock().unwrap_or_else(|e| e.into_inner());
        let mine = slots.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= limits.per_uid {
            return Admission::Refused(format!(
                "too many connections from uid {uid} (limit {}): try again later",
                limits.per_uid
            ));
        }
        if slots.unprivileged >= limits.unprivileged {
            return Admission::Refused(format!(
                "too many connections from non-root users (limit {}): try again later",
                limits.unprivileged
            ));
        }
        slots.unprivileged += 1;
        *slots.per_uid.entry(uid).or_default() += 1;
        Admission::Now(Slot::User {
            table: Arc::clone(table),
            uid,
        })
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Root(_) => write!(f, "Slot(root)"),
            Slot::User { uid, .. } => write!(f, "Slot(uid {uid})"),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Slot::User { table, uid } = self else {
            return; // root's permit goes back by itself
        };
        let mut slots = table.taken.lock().unwrap_or_else(|e| e.into_inner());
        slots.unprivileged -= 1;
        if let Some(n) = slots.per_uid.get_mut(uid) {
            *n -= 1;
            if *n == 0 {
                slots.per_uid.remove(uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(a: Admission) -> Slot {
        match a {
            Admission::Now(slot) => slot,
            Admission::Queued(_) => panic!("queued"),
            Admission::Refused(m) => panic!("refused: {m}"),
        }
    }

    fn refused(a: Admission) -> String {
        match a {
            Admission::Refused(m) => m,
            _ => panic!("not refused"),
        }
    }

    #[test]
    fn slots_are_counted_per_uid_and_root_keeps_its_own() {
        let s = SlotTable::new(Limits {
            per_uid: 2,
            unprivileged: 3,
            root: 1,
            root_queue: 1,
        });
        let a1 = now(Slot::take(&s, 1000));
        let _a2 = now(Slot::take(&s, 1000));
        assert!(refused(Slot::take(&s, 1000)).contains("uid 1000 (limit 2)"));
        let _b1 = now(Slot::take(&s, 1001));
        assert!(refused(Slot::take(&s, 1002)).contains("non-root users"));
        let root = now(Slot::take(&s, 0));
        drop(a1);
        let _a3 = now(Slot::take(&s, 1000));
        drop(root);
        let _root = now(Slot::take(&s, 0));
    }

    /// Root over its slots waits for one, in a bounded queue; it is refused only past it.
    #[test]
    fn root_over_its_slots_waits_for_one() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = SlotTable::new(Limits {
            per_uid: 1,
            unprivileged: 1,
            root: 1,
            root_queue: 1,
        });
        let first = now(Slot::take(&s, 0));
        let Admission::Queued(turn) = Slot::take(&s, 0) else {
            panic!("root's second connection is not queued");
        };
        assert!(refused(Slot::take(&s, 0)).contains("1 waiting"));
        runtime.block_on(async {
            let waiting = tokio::spawn(turn.wait());
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished(), "a slot while the first is held");
            drop(first);
            let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
                .await
                .expect("the queued connection got the freed slot")
                .unwrap();
            drop(second);
        });
        // The queue is empty again.
        let _third = now(Slot::take(&s, 0));
    }
}
