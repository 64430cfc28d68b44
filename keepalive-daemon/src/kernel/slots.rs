//! Counter slots: each policy path owns one index of the per-CPU counters array, so that the
//! kernel programs count with an array access instead of a hash lookup. A path keeps its slot
//! while it has a policy (a cgroup re-created there counts on); a slot is zeroed when it is
//! handed to a new path. Slots an earlier run gave out (read back from the pinned values) are
//! kept for their paths, so that counters survive a restart.
use std::collections::HashMap;

use keepalive_common::{PathKey, PolicyValue, FLAG_SLOT, MAX_POLICIES};

/// A path key without its NUL padding: a key is 256 bytes, most paths a few dozen.
type Path = Box<[u8]>;

fn path(key: &PathKey) -> Path {
    let len = key
        .bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(key.bytes.len());
    key.bytes[..len].into()
}

#[derive(Debug)]
pub struct Slots {
    /// Slots in use, by path.
    by_path: HashMap<Path, u32>,
    /// Slots an earlier run gave out, by path, until the path's policy is put again.
    earlier: HashMap<Path, u32>,
    /// Whether each slot is taken (by `by_path` or `earlier`).
    taken: Vec<bool>,
    /// Where the search for a free slot starts.
    cursor: usize,
}

/// What [`Slots::assign`] gave a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    /// The path had it already (in this run or an earlier one): its counts go on.
    Kept(u32),
    /// A slot that may hold another path's old counts: to be zeroed before use.
    New(u32),
}

impl Slots {
    /// The slots the pinned values of an earlier run hold (values without [`FLAG_SLOT`] were
    /// written by a kad that had none).
    pub fn from_pinned(pinned: &[(PathKey, PolicyValue)]) -> Slots {
        let mut slots = Slots {
            by_path: HashMap::new(),
            earlier: HashMap::new(),
            taken: vec![false; MAX_POLICIES as usize],
            cursor: 0,
        };
        for (key, value) in pinned {
            let slot = value.slot as usize;
            if value.flags & FLAG_SLOT != 0 && slot < slots.taken.len() && !slots.taken[slot] {
                slots.taken[slot] = true;
                slots.earlier.insert(path(key), value.slot);
            }
        }
        slots
    }

    /// The slot of `key`'s policy; None when every slot is taken.
    pub fn assign(&mut self, key: &PathKey) -> Option<Assigned> {
        let key = path(key);
        if let Some(&slot) = self.by_path.get(&key) {
            return Some(Assigned::Kept(slot));
        }
        if let Some(slot) = self.earlier.remove(&key) {
            self.by_path.insert(key, slot);
            return Some(Assigned::Kept(slot));
        }
        let len = self.taken.len();
        let slot = (0..len)
            .map(|i| (self.cursor + i) % len)
            .find(|&i| !self.taken[i])?;
        self.taken[slot] = true;
        self.cursor = (slot + 1) % len;
        let slot = slot as u32;
        self.by_path.insert(key, slot);
        Some(Assigned::New(slot))
    }

    /// `key`'s policy is gone: its slot is free for another path.
    pub fn release(&mut self, key: &PathKey) {
        let key = path(key);
        let slot = self
            .by_path
            .remove(&key)
            .or_else(|| self.earlier.remove(&key));
        if let Some(slot) = slot {
            self.taken[slot as usize] = false;
        }
    }

    /// The slot `key`'s policy counts in, if it has one (what the tests check `release` by).
    #[cfg(test)]
    fn of(&self, key: &PathKey) -> Option<u32> {
        self.by_path.get(&path(key)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PathKey {
        let mut key = PathKey {
            bytes: [0; keepalive_common::PATH_KEY_LEN],
        };
        key.bytes[..name.len()].copy_from_slice(name.as_bytes());
        key
    }

    fn counted(slot: u32) -> PolicyValue {
        PolicyValue {
            flags: FLAG_SLOT,
            slot,
            ..PolicyValue::default()
        }
    }

    #[test]
    fn a_path_keeps_its_slot_and_a_released_slot_is_handed_out_new() {
        let mut slots = Slots::from_pinned(&[]);
        assert_eq!(slots.assign(&key("/a")), Some(Assigned::New(0)));
        assert_eq!(slots.assign(&key("/b")), Some(Assigned::New(1)));
        assert_eq!(slots.assign(&key("/a")), Some(Assigned::Kept(0)));
        slots.release(&key("/a"));
        assert_eq!(slots.of(&key("/a")), None);
        // Every other slot is tried before the released one comes round again.
        let mut seen = Vec::new();
        for i in 0..MAX_POLICIES - 1 {
            match slots.assign(&key(&format!("/p{i}"))) {
                Some(Assigned::New(slot)) => seen.push(slot),
                other => panic!("slot {i}: {other:?}"),
            }
        }
        assert_eq!(
            seen.last(),
            Some(&0),
            "the released slot is the last one left"
        );
        assert_eq!(slots.assign(&key("/full")), None);
    }

    #[test]
    fn slots_of_an_earlier_run_stay_with_their_paths() {
        let pinned = [
            (key("/kept"), counted(5)),
            (key("/old-kad"), PolicyValue::default()),
            (key("/dup"), counted(5)),
        ];
        let mut slots = Slots::from_pinned(&pinned);
        assert_eq!(slots.assign(&key("/kept")), Some(Assigned::Kept(5)));
        // A value from a kad without slots, and a second claim on slot 5, get new ones.
        assert_eq!(slots.assign(&key("/old-kad")), Some(Assigned::New(0)));
        let dup = slots.assign(&key("/dup"));
        assert!(matches!(dup, Some(Assigned::New(s)) if s != 5), "{dup:?}");
        // Slot 5 is never handed to another path while /kept holds it.
        for i in 0..100 {
            assert_ne!(
                slots.assign(&key(&format!("/n{i}"))),
                Some(Assigned::New(5))
            );
        }
    }
}
