//! The policy maps as the daemon writes them: entries by path and by cgroup id, the counters
//! slot of each path, the epoch that voids the programs' remembered decisions; and a
//! read-only [`Reader`] of what the kernel changes by itself.
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::maps::{
    Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues,
};
use keepalive_common::{
    Counters, PathKey, PolicyValue, COUNTS_MAP, EPOCH_MAP, FLAG_SLOT, PATHS_MAP, POLICIES_MAP,
};
use tracing::error;

use super::{
    error::{full_or, map_error},
    load::take_map,
    slots::{Assigned, Slots},
    CounterReader, KernelError,
};

/// A read-only handle on what the kernel changes by itself (counters, and the entries the
/// `mkdir`/`rmdir` hooks add and remove), on descriptors of its own: it answers reads from any
/// thread while the [`Enforcer`] is busy.
pub struct Reader {
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    stats: PerCpuArray<MapData, Counters>,
}

impl Reader {
    fn of(
        policies: &BpfHashMap<MapData, u64, PolicyValue>,
        stats: &PerCpuArray<MapData, Counters>,
    ) -> Result<Reader, KernelError> {
        Ok(Reader {
            policies: BpfHashMap::try_from(aya::maps::Map::HashMap(dup_map(
                policies.map(),
                POLICIES_MAP,
            )?))
            .map_err(|e| map_error(POLICIES_MAP, e))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(dup_map(
                stats.map(),
                COUNTS_MAP,
            )?))
            .map_err(|e| map_error(COUNTS_MAP, e))?,
        })
    }
}

impl CounterReader for Reader {
    fn counters(&self, slot: u32) -> Counters {
        let mut total = Counters::default();
        if let Ok(per_cpu) = self.stats.get(&slot, 0) {
            for c in per_cpu.iter() {
                total.active += c.active;
                total.passive += c.passive;
                total.failures += c.failures;
                total.keepalive_kills += c.keepalive_kills;
                total.refreshed += c.refreshed;
                total.overridden += c.overridden;
            }
        }
        total
    }

    fn map_entries(&self) -> usize {
        self.policies.keys().filter(Result::is_ok).count()
    }
}

/// The same map on a descriptor of its own.
fn dup_map(map: &MapData, name: &'static str) -> Result<MapData, KernelError> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| KernelError::Map {
            map: name,
            message: e.to_string(),
        })?;
    MapData::from_fd(fd).map_err(|e| map_error(name, e))
}

/// The maps the daemon writes policies into, with the slots they count in.
pub(super) struct Maps {
    dir: PathBuf,
    policies: BpfHashMap<MapData, u64, PolicyValue>,
    paths: BpfHashMap<MapData, PathKey, PolicyValue>,
    stats: PerCpuArray<MapData, Counters>,
    /// Moved after every change of `policies`: the programs' remembered decisions (which
    /// ancestor decides for a cgroup without a policy) hold only within one epoch.
    epoch: Array<MapData, u64>,
    epoch_value: u64,
    /// Counters and entries by id are read through it only, so that the daemon's readers and
    /// the enforcer cannot disagree.
    reader: Arc<Reader>,
    /// Which counters slot each policy path counts in.
    slots: Slots,
}

impl Maps {
    /// Takes the maps from the loaded object; the slots are those the pinned paths hold.
    pub(super) fn take(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<Maps, KernelError> {
        let policies = BpfHashMap::try_from(take_map(ebpf, POLICIES_MAP)?)
            .map_err(|e| map_error(POLICIES_MAP, e))?;
        let paths = BpfHashMap::try_from(take_map(ebpf, PATHS_MAP)?)
            .map_err(|e| map_error(PATHS_MAP, e))?;
        let stats = PerCpuArray::try_from(take_map(ebpf, COUNTS_MAP)?)
            .map_err(|e| map_error(COUNTS_MAP, e))?;
        let epoch =
            Array::try_from(take_map(ebpf, EPOCH_MAP)?).map_err(|e| map_error(EPOCH_MAP, e))?;
        let reader = Arc::new(Reader::of(&policies, &stats)?);
        let mut maps = Maps {
            dir: dir.to_path_buf(),
            policies,
            paths,
            stats,
            epoch,
            epoch_value: 0,
            reader,
            slots: Slots::from_pinned(&[]),
        };
        maps.slots = Slots::from_pinned(&maps.pinned_paths());
        Ok(maps)
    }

    /// Puts a policy in force for a path and, if the cgroup exists, for its id. The path
    /// entry lets the kernel apply it to a cgroup created there later, inside `mkdir`. The
    /// value counts in the path's counters slot; returns that slot.
    pub(super) fn put(
        &mut self,
        key: &PathKey,
        id: Option<u64>,
        mut value: PolicyValue,
    ) -> Result<u32, KernelError> {
        self.check_pins()?;
        let slot = match self.slots.assign(key).ok_or(KernelError::Full)? {
            Assigned::Kept(slot) => slot,
            Assigned::New(slot) => {
                // Another path may have counted here before.
                if let Err(e) = self.zero_counters(slot) {
                    self.slots.release(key);
                    return Err(e);
                }
                slot
            }
        };
        value.slot = slot;
        value.flags |= FLAG_SLOT;
        self.paths
            .insert(key, value, 0)
            .map_err(|e| full_or(PATHS_MAP, e))?;
        if let Some(id) = id {
            self.policies
                .insert(id, value, 0)
                .map_err(|e| full_or(POLICIES_MAP, e))?;
            self.next_epoch()?;
        }
        Ok(slot)
    }

    /// After a change of `policies`: the decisions the programs remembered are void.
    fn next_epoch(&mut self) -> Result<(), KernelError> {
        self.epoch_value += 1;
        self.epoch
            .set(0, self.epoch_value, 0)
            .map_err(|e| map_error(EPOCH_MAP, e))
    }

    fn zero_counters(&mut self, slot: u32) -> Result<(), KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| KernelError::Map {
            map: COUNTS_MAP,
            message: format!("{what}: {e}"),
        })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| {
            KernelError::Map {
                map: COUNTS_MAP,
                message: e.to_string(),
            }
        })?;
        self.stats
            .set(slot, zeros, 0)
            .map_err(|e| map_error(COUNTS_MAP, e))
    }

    /// Forgets a path's policy (its cgroup's entry is removed with `remove_id`); its counters
    /// slot is free for another path.
    pub(super) fn remove_path(&mut self, key: &PathKey) {
        let _ = self.paths.remove(key);
        self.slots.release(key);
    }

    /// Forgets the policy of a cgroup id. Unknown ids are fine.
    pub(super) fn remove_id(&mut self, id: u64) {
        if self.policies.remove(&id).is_ok() {
            if let Err(e) = self.next_epoch() {
                // Cannot happen short of a broken map; the cgroups below may decide by it.
                error!("{e}: cgroups below {id} may still follow its removed policy");
            }
        }
    }

    /// The cgroup ids that have a policy entry (some may have been put there by `mkdir`).
    pub(super) fn policy_ids(&self) -> Vec<(u64, PolicyValue)> {
        self.policies
            .iter()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
    }

    /// The policies by path an earlier run left in the pinned map.
    pub(super) fn pinned_paths(&self) -> Vec<(PathKey, PolicyValue)> {
        self.paths.iter().filter_map(Result::ok).collect()
    }

    /// Fails if someone removed the pinned maps: an update would reach a map the attached
    /// programs no longer share with the next daemon.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_pins(&self) -> Result<(), KernelError> {
        for name in [POLICIES_MAP, PATHS_MAP] {
            let path = self.dir.join(name);
            if !path.exists() {
                return Err(KernelError::MapGone(path));
            }
        }
        Ok(())
    }

    /// A read-only handle for other threads.
    pub(super) fn reader(&self) -> Arc<dyn CounterReader> {
        self.reader.clone()
    }
}
