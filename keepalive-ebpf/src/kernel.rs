//! The kernel as these programs see it: constants from its headers that aya-ebpf's bindings
//! lack, the struct offsets the daemon hands over ([`KAD_OFFSETS`]), the two ways to read a
//! field through them, and the cgroup id of a socket or cgroup.
//!
//! Imports nothing from the crate: every other module may use it.

use core::ptr::read_volatile;

use aya_ebpf::helpers::bpf_probe_read_kernel;
use keepalive_common::KernelOffsets;

// Not in aya-ebpf's bindings (include/uapi/linux/tcp.h, in.h, errno.h).
pub(crate) const IPPROTO_TCP: i32 = 6;
pub(crate) const TCP_KEEPIDLE: i32 = 4;
pub(crate) const TCP_KEEPINTVL: i32 = 5;
pub(crate) const TCP_KEEPCNT: i32 = 6;
pub(crate) const TCP_USER_TIMEOUT: i32 = 18;
pub(crate) const ETIMEDOUT: i32 = 110;
pub(crate) const AF_INET6: u16 = 10;
// include/net/tcp_states.h
pub(crate) const TCP_ESTABLISHED: u32 = 1;
pub(crate) const TCP_LISTEN: u32 = 10;
/// `enum sock_flags` (include/net/sock.h): SOCK_KEEPOPEN has been bit 3 of `sk_flags` since
/// Linux 2.6; it is not in the BTF offsets because BTF holds no enum-to-bit layout to check.
pub(crate) const SOCK_KEEPOPEN: u64 = 1 << 3;

/// Offsets found in the kernel's BTF by the daemon (see `KernelOffsets`).
#[no_mangle]
static KAD_OFFSETS: KernelOffsets = KernelOffsets {
    sk_err: 0,
    probes_out: 0,
    retransmits: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    cgroup_root: 0,
    hierarchy_id: 0,
    kn_parent: 0,
    family: 0,
    daddr: 0,
    saddr: 0,
    dport: 0,
    sport: 0,
    daddr6: 0,
    saddr6: 0,
    keepalive_time: 0,
    keepalive_intvl: 0,
    keepalive_probes: 0,
    sk_flags: 0,
    user_timeout: 0,
    state: 0,
    valid: 0,
};

/// The offsets, read once per program run.
#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: read-only data patched by the loader; volatile keeps the compiler from folding
    // the placeholder values.
    unsafe { read_volatile(&KAD_OFFSETS) }
}

/// A field of a kernel struct reached through a BTF-typed pointer.
#[inline(always)]
pub(crate) fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: `base` is a pointer the verifier knows the BTF type of; it checks that `offset`
    // lands on a field of that size, and the JIT turns a fault into a zero.
    unsafe { read_volatile(base.wrapping_add(offset as usize) as *const T) }
}

/// A field of a kernel struct at any address, also one the verifier knows no type of (such as a
/// pointer read with this function): copied by the helper; the default (0) if that fails.
#[inline(always)]
pub(crate) fn read_kernel<T: Default + Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: probe_read copies the value or fails cleanly, whatever the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
        .unwrap_or_default()
}

/// The id of the cgroup a socket belongs to: sk->sk_cgrp_data.cgroup->kn->id.
#[inline(always)]
pub(crate) fn socket_cgroup_id(sk: *const u8, offs: &KernelOffsets) -> u64 {
    let cgroup: u64 = read_kernel(sk, offs.sk_cgroup);
    cgroup_id_of(cgroup as *const u8, offs)
}

/// The id of a cgroup: cgroup->kn->id; 0 if any step is missing.
#[inline(always)]
pub(crate) fn cgroup_id_of(cgroup: *const u8, offs: &KernelOffsets) -> u64 {
    if cgroup.is_null() {
        return 0;
    }
    let kn: u64 = read_kernel(cgroup, offs.cgroup_kn);
    if kn == 0 {
        return 0;
    }
    read_kernel(kn as *const u8, offs.kn_id)
}
