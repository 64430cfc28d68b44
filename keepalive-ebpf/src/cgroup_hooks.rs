//! `kad_mkdir` and `kad_rmdir` (tp_btf/cgroup_mkdir, cgroup_rmdir): a policy named by path is
//! in force from inside `mkdir`, before any process can join the cgroup; a removed cgroup's
//! policy entry goes with it. Both look at the cgroup2 hierarchy only.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use keepalive_common::{OFFSETS_CGROUP, PATH_KEY_LEN};

use crate::{
    kernel::{cgroup_id_of, offsets, read_kernel},
    maps::{KAD_PATHS, KAD_POLICY, KAD_SCRATCH},
};

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn kad_mkdir(ctx: BtfTracePointContext) -> i32 {
    let offs = offsets();
    if offs.valid & OFFSETS_CGROUP == 0 {
        return 0;
    }
    let cgroup: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // Only the cgroup2 hierarchy (id 0): v1 hierarchies have their own ids and paths.
    let root: u64 = read_kernel(cgroup, offs.cgroup_root);
    if root == 0 || read_kernel::<i32>(root as *const u8, offs.hierarchy_id) != 0 {
        return 0;
    }
    let Some(key) = KAD_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU scratch value; nothing else uses it while this program runs here.
    let key = unsafe { &mut *key };
    let mut i = 0;
    while i < PATH_KEY_LEN {
        key.bytes[i] = 0;
        i += 1;
    }
    // SAFETY: probe_read copies the string or fails cleanly.
    let Ok(read) = (unsafe { bpf_probe_read_kernel_str_bytes(path, &mut key.bytes) }) else {
        return 0;
    };
    if read.len() >= PATH_KEY_LEN - 1 {
        return 0; // longer than any key kad accepts
    }
    // SAFETY: plain data, copied out.
    let Some(policy) = (unsafe { KAD_PATHS.get(key) }).copied() else {
        return 0;
    };
    let id = cgroup_id_of(cgroup, &offs);
    if id != 0 {
        let _ = KAD_POLICY.insert(id, policy, 0);
    }
    0
}

/// A cgroup removed: its policy entry and counters go with it, in the kernel, so that nothing
/// is left for an id that no longer exists (the daemon may learn of the removal much later).
#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn kad_rmdir(ctx: BtfTracePointContext) -> i32 {
    let offs = offsets();
    if offs.valid & OFFSETS_CGROUP == 0 {
        return 0;
    }
    let cgroup: *const u8 = ctx.arg(0);
    let root: u64 = read_kernel(cgroup, offs.cgroup_root);
    if root == 0 || read_kernel::<i32>(root as *const u8, offs.hierarchy_id) != 0 {
        return 0;
    }
    let id = cgroup_id_of(cgroup, &offs);
    if id != 0 {
        let _ = KAD_POLICY.remove(id);
    }
    0
}
