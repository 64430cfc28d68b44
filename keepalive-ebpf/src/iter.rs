//! `kad_iter_tcp` (iter/tcp), run by the daemon in each network namespace: gives the existing
//! sockets of the cgroups a refresh covers ([`KAD_SCOPE`]) their policy, and puts a listener
//! kad changed back once no policy decides for it.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_seq_write, bpf_skc_to_tcp_sock};
use keepalive_common::{FLAG_ON, OFFSETS_CGROUP, OFFSETS_KEEPALIVE};

use crate::{
    kernel::{offsets, read_kernel, socket_cgroup_id, TCP_LISTEN},
    listener::{remember_listener, restore_listener},
    maps::{bump, policy_of, KAD_SCOPE},
    options::{apply, learn_hz},
};

/// # Safety
/// Called by the kernel only, with its `struct bpf_iter__tcp` context.
#[no_mangle]
#[link_section = "iter/tcp"]
pub unsafe extern "C" fn kad_iter_tcp(ctx: *mut *mut c_void) -> i32 {
    // SAFETY: struct bpf_iter__tcp { bpf_iter_meta *meta; sock_common *sk_common; uid_t uid; }.
    let (meta, sk_common) = unsafe { (*ctx, *ctx.add(1)) };
    if sk_common.is_null() {
        return 0;
    }
    // SAFETY: the helper returns NULL unless it is a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk_common) } as *mut c_void;
    if tp.is_null() {
        return 0;
    }
    let offs = offsets();
    if offs.valid & OFFSETS_CGROUP == 0 {
        return 0;
    }
    let cgroup_id = socket_cgroup_id(tp as *const u8, &offs);
    // SAFETY: plain data, copied out.
    let Some(policy_id) = (unsafe { KAD_SCOPE.get(cgroup_id) }).copied() else {
        return 0; // not a cgroup this refresh covers
    };
    let listening = offs.valid & OFFSETS_KEEPALIVE != 0
        && u32::from(read_kernel::<u8>(tp as *const u8, offs.state)) == TCP_LISTEN;
    let policy = policy_of(policy_id).filter(|p| p.flags & FLAG_ON != 0);
    let Some(policy) = policy else {
        // No policy decides (any more), or an opt-out: a listener kad changed goes back.
        // The storage helper takes a `struct sock`: the tcp_sock pointer is one.
        if listening && restore_listener(tp, tp) {
            written(meta);
        }
        return 0;
    };
    if listening {
        remember_listener(tp, tp as *const u8, &policy, &offs);
    }
    let failures = apply(tp, &policy);
    learn_hz(tp as *const u8, &policy, &offs);
    bump(&policy, |c| {
        c.refreshed += 1;
        c.failures += failures;
    });
    written(meta);
    0
}

/// One byte per socket updated, so the daemon can say how many.
#[inline(always)]
fn written(meta: *mut c_void) {
    let mark: u8 = 1;
    // SAFETY: `meta` is the iterator's meta pointer; the helper reads 1 byte of the stack.
    unsafe {
        let seq = *(meta as *const *mut c_void);
        bpf_seq_write(seq as *mut _, &mark as *const u8 as *const c_void, 1);
    }
}
