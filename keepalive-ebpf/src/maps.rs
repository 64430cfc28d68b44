//! Every map the programs share with the daemon, with the typed accessors the programs use.
//! The daemon finds each map by its name (`keepalive_common::*_MAP`): names must not change.
//!
//! Imports nothing from the crate: every other module may use it.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    helpers::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use keepalive_common::{
    Counters, Decision, ListenerRecord, NetDefaults, PathKey, PolicyValue, FLAG_SLOT,
    MAX_DECISIONS, MAX_POLICIES, MAX_SCOPE,
};

#[map]
pub(crate) static KAD_POLICY: HashMap<u64, PolicyValue> =
    HashMap::with_max_entries(MAX_POLICIES, 0);

#[map]
pub(crate) static KAD_PATHS: HashMap<PathKey, PolicyValue> =
    HashMap::with_max_entries(MAX_POLICIES, 0);

#[map]
pub(crate) static KAD_COUNTS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_POLICIES, 0);

#[map]
pub(crate) static KAD_SCOPE: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SCOPE, 0);

#[map]
pub(crate) static KAD_SCRATCH: PerCpuArray<PathKey> = PerCpuArray::with_max_entries(1, 0);

/// Decisions remembered for cgroups without a policy of their own: which ancestor decides
/// (0: none), valid while [`KAD_EPOCH`] has not moved. Saves the walk up the tree, so that a
/// socket deep below its policy, or below none, costs what one next to it does. Per-CPU LRU
/// lists: no lock shared between CPUs when a decision is added.
#[map]
pub(crate) static KAD_DECIDE: LruHashMap<u64, Decision> =
    LruHashMap::with_max_entries(MAX_DECISIONS, BPF_F_NO_COMMON_LRU);

/// Moved by the daemon after every change of the policies by cgroup id. A new cgroup's entry
/// (made inside `mkdir`) does not move it: a new id has no remembered decision, nor any
/// descendant that could.
#[map]
pub(crate) static KAD_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The kernel's HZ, learnt from the first socket this program set TCP_KEEPIDLE or
/// TCP_KEEPINTVL on (the kernel stores seconds * HZ); 0 until then. With it a socket's own
/// `keepalive_time` can be compared with a policy's seconds.
#[map]
pub(crate) static KAD_HZ: Array<u32> = Array::with_max_entries(1, 0);

/// Socket local storage for the sockets whose program set a keepalive option itself (a
/// `MARK_*` bit set). Not copied to accepted sockets: a new connection starts unmarked.
#[btf_map]
pub(crate) static KAD_MARKS: SkStorage<u32> = SkStorage::new();

/// What each listener kad changed held before (see `ListenerRecord`). Not copied to accepted
/// sockets: they inherit the options themselves.
#[btf_map]
pub(crate) static KAD_LISTENERS: SkStorage<ListenerRecord> = SkStorage::new();

/// The defaults of the network namespace the iterator runs in (written by the daemon).
#[map]
pub(crate) static KAD_DEFAULTS: Array<NetDefaults> = Array::with_max_entries(1, 0);

/// The BTF definition of a socket local storage map whose values are `V`. aya-ebpf's own
/// `SkStorage` only reaches a socket through a sock_addr context, so the definition is here,
/// laid out as libbpf and aya expect (`type`, `key`, `value`, `max_entries`, `map_flags`).
#[repr(C)]
pub(crate) struct SkStorage<V> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl<V> Sync for SkStorage<V> {}

impl<V> SkStorage<V> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The value for `sk`; with `create`, a zeroed one is made if it has none.
    #[inline(always)]
    pub(crate) fn get(&self, sk: *mut c_void, create: bool) -> Option<&'static mut V> {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        let map = self as *const Self as *mut c_void;
        // SAFETY: the helper checks `sk` (the verifier has proven it a socket or NULL) and
        // returns the socket's value or NULL.
        let value = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) } as *mut V;
        // SAFETY: a live storage value of this type, owned by the socket.
        unsafe { value.as_mut() }
    }
}

#[inline(always)]
pub(crate) fn policy_of(id: u64) -> Option<PolicyValue> {
    // SAFETY: plain data; copied out at once.
    unsafe { KAD_POLICY.get(id) }.copied()
}

/// The kernel's HZ as learnt so far (see [`KAD_HZ`]); 0 if not yet.
#[inline(always)]
pub(crate) fn hz() -> u32 {
    KAD_HZ.get(0).copied().unwrap_or(0)
}

/// Adds to a policy's counters on this CPU (an array slot: no lookup by key, nothing made).
#[inline(always)]
pub(crate) fn bump(policy: &PolicyValue, update: impl Fn(&mut Counters)) {
    if policy.flags & FLAG_SLOT == 0 {
        return; // a value an older kad wrote: counted once the daemon rewrites it
    }
    if let Some(counters) = KAD_COUNTS.get_ptr_mut(policy.slot) {
        // SAFETY: a per-CPU value: nothing else writes it while this program runs on this CPU.
        update(unsafe { &mut *counters });
    }
}
