//! Which policy decides for a socket: the nearest of its own cgroup (sk->sk_cgrp_data, fixed
//! when the socket was created; an accepted socket has its listener's) and that cgroup's
//! ancestors that has a policy. Read from the kernel's structs, so no per-socket state has to
//! be made; [`KAD_DECIDE`] remembers the walk's result for cgroups without a policy.
//!
//! Uses `kernel` and `maps` only.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use keepalive_common::{Decision, KernelOffsets, PolicyValue, MAX_LEVEL};

use crate::{
    kernel::load,
    maps::{policy_of, KAD_DECIDE, KAD_EPOCH},
};

/// The deciding policy's cgroup id and value for the socket at `sk` (a BTF-typed pointer).
#[inline(always)]
pub(crate) fn deciding_policy(sk: *const u8, offs: &KernelOffsets) -> Option<(u64, PolicyValue)> {
    // Direct loads through BTF-typed pointers (the JIT makes them fault-safe loads), much
    // cheaper than bpf_probe_read_kernel; the offsets are constants of the read-only data.
    let cgroup: *const u8 = load(sk, offs.sk_cgroup);
    if cgroup.is_null() {
        return None;
    }
    let kn: *const u8 = load(cgroup, offs.cgroup_kn);
    if kn.is_null() {
        return None;
    }
    let own: u64 = load(kn, offs.kn_id);
    if let Some(policy) = policy_of(own) {
        return Some((own, policy));
    }
    // Read before the walk: a change the daemon makes meanwhile moves it after the maps, so
    // what this walk finds is remembered under an epoch that is already past.
    let epoch = KAD_EPOCH.get(0).copied().unwrap_or(0);
    // SAFETY: plain data, copied out.
    if let Some(d) = unsafe { KAD_DECIDE.get(own) }.copied() {
        if d.epoch == epoch {
            if d.policy == 0 {
                return None;
            }
            if let Some(policy) = policy_of(d.policy) {
                return Some((d.policy, policy));
            }
        }
    }
    let found = walk_up(load(kn, offs.kn_parent), offs);
    let decision = Decision {
        policy: found.map_or(0, |(id, _)| id),
        epoch,
    };
    let _ = KAD_DECIDE.insert(own, decision, 0);
    found
}

/// The nearest cgroup with a policy from `kn` (a `kernfs_node`) up.
#[inline(always)]
fn walk_up(mut kn: *const u8, offs: &KernelOffsets) -> Option<(u64, PolicyValue)> {
    let mut level = 1;
    while level < MAX_LEVEL && !kn.is_null() {
        let id: u64 = load(kn, offs.kn_id);
        if let Some(policy) = policy_of(id) {
            return Some((id, policy));
        }
        kn = load(kn, offs.kn_parent);
        level += 1;
    }
    None
}

/// The deciding policy's cgroup id and value for the current task's cgroup (cgroup/setsockopt
/// runs in the caller's context).
#[inline(always)]
pub(crate) fn deciding_policy_of_task() -> Option<(u64, PolicyValue)> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(policy) = policy_of(own) {
        return Some((own, policy));
    }
    // Plain values rather than an Option built in the loop: the compiler may copy an unset
    // Option's payload registers, which the verifier refuses to read.
    let mut best_id = 0;
    let mut best = PolicyValue::default();
    // From the root (level 0: the host policy's cgroup) down, so the nearest policy wins.
    let mut level = 0;
    while level <= MAX_LEVEL {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == own {
            break;
        }
        if let Some(policy) = policy_of(id) {
            best_id = id;
            best = policy;
        }
        level += 1;
    }
    (best_id != 0).then_some((best_id, best))
}
