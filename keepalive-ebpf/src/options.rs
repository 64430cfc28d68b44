//! Setting a policy's options on a socket through `bpf_setsockopt` (from sock_ops and from
//! iter/tcp alike), and learning the kernel's HZ from the result.
//!
//! Uses `kernel` and `maps` only.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{SOL_SOCKET, SO_KEEPALIVE},
    helpers::bpf_setsockopt,
};
use keepalive_common::{KernelOffsets, PolicyValue, OFFSETS_KEEPALIVE};

use crate::{
    kernel::{load, IPPROTO_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_USER_TIMEOUT},
    maps::{hz, KAD_HZ},
};

/// Sets the policy's options on a socket (`target` is what `bpf_setsockopt` takes in the
/// calling program type); returns how many the kernel refused.
#[inline(always)]
pub(crate) fn apply(target: *mut c_void, policy: &PolicyValue) -> u64 {
    // SO_KEEPALIVE last: the times set before it arm no timer, SO_KEEPALIVE arms it once.
    let mut failures = 0;
    if policy.idle != 0 {
        failures += set_opt(target, IPPROTO_TCP, TCP_KEEPIDLE, policy.idle);
    }
    if policy.intvl != 0 {
        failures += set_opt(target, IPPROTO_TCP, TCP_KEEPINTVL, policy.intvl);
    }
    if policy.cnt != 0 {
        failures += set_opt(target, IPPROTO_TCP, TCP_KEEPCNT, policy.cnt);
    }
    if policy.user_timeout != 0 {
        failures += set_opt(target, IPPROTO_TCP, TCP_USER_TIMEOUT, policy.user_timeout);
    }
    failures + set_opt(target, SOL_SOCKET as i32, SO_KEEPALIVE as i32, 1)
}

/// Sets one option; returns 1 if the kernel refused it (counted), 0 otherwise.
#[inline(always)]
pub(crate) fn set_opt(target: *mut c_void, level: i32, name: i32, value: u32) -> u64 {
    let mut value = value as i32;
    // SAFETY: the helper reads 4 bytes from a valid stack slot.
    let rc = unsafe {
        bpf_setsockopt(
            target,
            level,
            name,
            &mut value as *mut i32 as *mut c_void,
            size_of::<i32>() as i32,
        )
    };
    u64::from(rc != 0)
}

/// After kad set TCP_KEEPIDLE (or TCP_KEEPINTVL) on `tp`: the kernel stored seconds * HZ.
#[inline(always)]
pub(crate) fn learn_hz(tp: *const u8, policy: &PolicyValue, offs: &KernelOffsets) {
    if offs.valid & OFFSETS_KEEPALIVE == 0 || hz() != 0 {
        return;
    }
    let (raw, seconds) = if policy.idle != 0 {
        (load::<u32>(tp, offs.keepalive_time), policy.idle)
    } else if policy.intvl != 0 {
        (load::<u32>(tp, offs.keepalive_intvl), policy.intvl)
    } else {
        return;
    };
    // Only an exact multiple: a refused option leaves the program's (or no) value there.
    if raw == 0 || raw % seconds != 0 {
        return;
    }
    if let Some(slot) = KAD_HZ.get_ptr_mut(0) {
        // SAFETY: the array's only value; every writer stores the same number.
        unsafe { *slot = raw / seconds };
    }
}
