//! A [`Kernel`] for unit tests of the daemon's logic: it keeps what it is told in plain maps,
//! records every call, and can be told to refuse. What only the real kernel can answer (the
//! programs, the verifier, sockets) is tested against it in `tests/`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use keepalive_common::{Counters, PathKey, PolicyValue};

use super::{killlog::KillLog, CounterReader, Features, Kernel, KernelError};

/// One call the daemon's logic made, as a test reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Put {
        path: String,
        id: Option<u64>,
    },
    RemovePath(String),
    RemoveId(u64),
    /// The anchors asked for, by cgroup id.
    SetAnchors(Vec<u64>),
    /// An anchor whose links no longer held its cgroup, attached again.
    Reattach(u64),
    Refresh {
        scope: Vec<(u64, u64)>,
        namespaces: usize,
    },
    RetireLegacy,
}

/// What the fake kernel holds; shared between the kernel the daemon owns and the test.
#[derive(Debug, Default)]
pub struct Held {
    /// Entries by path key (as text, "/a/b").
    pub paths: BTreeMap<String, PolicyValue>,
    /// Entries by cgroup id.
    pub ids: BTreeMap<u64, PolicyValue>,
    /// Attached anchors: cgroup id -> path.
    pub anchors: BTreeMap<u64, PathBuf>,
    pub calls: Vec<Call>,
    /// Refuse every `put` with this error's text (a full map, say).
    pub refuse_puts: bool,
    /// Refuse to attach anchors at these paths.
    pub refuse_anchors: Vec<PathBuf>,
    /// Anchors whose links no longer hold their cgroup (what the kernel says once a cgroup
    /// is removed), until they are attached again.
    pub dead: BTreeSet<u64>,
    slots: BTreeMap<String, u32>,
}

/// Cheap to clone: every clone is the same kernel.
#[derive(Clone)]
pub struct FakeKernel {
    held: Arc<Mutex<Held>>,
    features: Features,
}

impl Default for FakeKernel {
    fn default() -> Self {
        FakeKernel {
            held: Arc::default(),
            features: Features {
                existing: Ok(()),
                mkdir: Ok(()),
                setsockopt: Ok(()),
                kills: Ok(()),
            },
        }
    }
}

impl FakeKernel {
    /// What the kernel holds now (a test's view; the daemon's logic never looks here).
    pub fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calls made so far, and forgets them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.held().calls)
    }
}

/// A path key as the text it holds.
pub fn key_text(key: &PathKey) -> String {
    let len = key
        .bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(key.bytes.len());
    String::from_utf8_lossy(&key.bytes[..len]).into_owned()
}

impl Kernel for FakeKernel {
    fn put(
        &mut self,
        key: &PathKey,
        id: Option<u64>,
        value: PolicyValue,
    ) -> Result<u32, KernelError> {
        let mut held = self.held();
        let path = key_text(key);
        held.calls.push(Call::Put {
            path: path.clone(),
            id,
        });
        if held.refuse_puts {
            return Err(KernelError::Full);
        }
        let next = held.slots.len() as u32;
        let slot = *held.slots.entry(path.clone()).or_insert(next);
        held.paths.insert(path, value);
        if let Some(id) = id {
            held.ids.insert(id, value);
        }
        Ok(slot)
    }

    fn remove_path(&mut self, key: &PathKey) {
        let mut held = self.held();
        let path = key_text(key);
        held.calls.push(Call::RemovePath(path.clone()));
        held.paths.remove(&path);
        held.slots.remove(&path);
    }

    fn remove_id(&mut self, id: u64) {
        let mut held = self.held();
        held.calls.push(Call::RemoveId(id));
        held.ids.remove(&id);
    }

    fn policy_ids(&self) -> Vec<(u64, PolicyValue)> {
        self.held().ids.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn pinned_paths(&self) -> Vec<(PathKey, PolicyValue)> {
        self.held()
            .paths
            .iter()
            .filter_map(|(path, value)| {
                let mut key = PathKey {
                    bytes: [0; keepalive_common::PATH_KEY_LEN],
                };
                let bytes = path.as_bytes();
                (bytes.len() < key.bytes.len()).then(|| {
                    key.bytes[..bytes.len()].copy_from_slice(bytes);
                    (key, *value)
                })
            })
            .collect()
    }

    fn set_anchors(
        &mut self,
        want: &BTreeMap<u64, PathBuf>,
        verify: &BTreeSet<u64>,
    ) -> Vec<KernelError> {
        let mut held = self.held();
        held.calls
            .push(Call::SetAnchors(want.keys().copied().collect()));
        let mut errors = Vec::new();
        held.anchors.retain(|id, _| want.contains_key(id));
        for (id, path) in want {
            if held.anchors.contains_key(id) && !(verify.contains(id) && held.dead.contains(id)) {
                continue;
            }
            if held.dead.remove(id) && held.anchors.remove(id).is_some() {
                held.calls.push(Call::Reattach(*id));
            }
            if held.refuse_anchors.contains(path) {
                errors.push(KernelError::Attach {
                    path: path.clone(),
                    message: "refused by the test".into(),
                });
                continue;
            }
            held.anchors.insert(*id, path.clone());
        }
        errors
    }

    fn anchor_holds(&self, id: u64) -> bool {
        let held = self.held();
        held.anchors.contains_key(&id) && !held.dead.contains(&id)
    }

    fn refresh(&mut self, scope: &[(u64, u64)], netns: &[File]) -> Result<u64, KernelError> {
        self.held().calls.push(Call::Refresh {
            scope: scope.to_vec(),
            namespaces: netns.len(),
        });
        Ok(0)
    }

    fn retire_legacy(&mut self) -> usize {
        self.held().calls.push(Call::RetireLegacy);
        0
    }

    fn reader(&self) -> Arc<dyn CounterReader> {
        Arc::new(self.clone())
    }

    fn take_kill_log(&mut self) -> Option<aya_log::EbpfLogger<KillLog>> {
        None
    }

    fn features(&self) -> &Features {
        &self.features
    }

    fn program_tag(&self) -> &str {
        "fake"
    }

    fn anchors(&self) -> Vec<(PathBuf, String)> {
        self.held()
            .anchors
            .values()
            .map(|p| (p.clone(), "fake".to_string()))
            .collect()
    }

    fn attachments(&self) -> usize {
        self.held().anchors.len()
    }
}

impl CounterReader for FakeKernel {
    fn counters(&self, _slot: u32) -> Counters {
        Counters::default()
    }

    fn map_entries(&self) -> usize {
        self.held().ids.len()
    }
}
