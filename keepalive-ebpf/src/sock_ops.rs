//! `kad_sockops` (sock_ops): sets a policy's options on a listener and on each established
//! connection that does not hold them already. An accepted socket inherits its listener's: the
//! socket's own fields say so, and no per-socket state is made. Nothing is written into the
//! sock_ops context: other programs see what the kernel gave.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::bpf_skc_to_tcp_sock,
    macros::sock_ops,
    programs::SockOpsContext,
};
use keepalive_common::{KernelOffsets, PolicyValue, FLAG_ON, OFFSETS_KEEPALIVE};

use crate::{
    decide::deciding_policy,
    kernel::{load, offsets, SOCK_KEEPOPEN},
    listener::remember_listener,
    maps::{bump, hz},
    options::{apply, learn_hz},
};

#[sock_ops]
pub fn kad_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        || op == BPF_SOCK_OPS_TCP_LISTEN_CB
    {
        on_sockops(&ctx, op);
    }
    // sock_ops programs may only return 1 (or 0, which fails the callback).
    1
}

fn on_sockops(ctx: &SockOpsContext, op: u32) {
    // SAFETY: `sk` is a field of the context; NULL-checked before use.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let offs = offsets();
    // SAFETY: the helper returns NULL unless `sk` is a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return;
    }
    let Some((_, policy)) = deciding_policy(tp, &offs) else {
        return; // no policy above this socket's cgroup
    };
    if policy.flags & FLAG_ON == 0 {
        return; // opt-out: leave the socket as the application made it
    }
    // An accepted socket inherits its listener's options, which kad set (at listen, or in a
    // refresh since): then nothing is left to do. Checked on the socket itself, so a listener
    // a program changed afterwards, or one from before the policy, is no shortcut.
    let failures = if holds(tp, &policy, &offs) {
        0
    } else {
        if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
            remember_listener(sk as *mut c_void, tp, &policy, &offs);
        }
        let failures = apply(ctx.ops as *mut c_void, &policy);
        learn_hz(tp, &policy, &offs);
        failures
    };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        if failures != 0 {
            bump(&policy, |c| c.failures += failures);
        }
        return;
    }
    let passive = op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    bump(&policy, |c| {
        if passive {
            c.passive += 1;
        } else {
            c.active += 1;
        }
        c.failures += failures;
    });
}

/// Whether the socket at `tp` (a BTF `tcp_sock`) holds the policy's values already: keepalive
/// on, and each option the policy names at its value.
#[inline(always)]
fn holds(tp: *const u8, policy: &PolicyValue, offs: &KernelOffsets) -> bool {
    if offs.valid & OFFSETS_KEEPALIVE == 0 {
        return false;
    }
    let flags: u64 = load(tp, offs.sk_flags);
    if flags & SOCK_KEEPOPEN == 0 {
        return false;
    }
    if policy.cnt != 0 && u32::from(load::<u8>(tp, offs.keepalive_probes)) != policy.cnt {
        return false;
    }
    if policy.user_timeout != 0 && load::<u32>(tp, offs.user_timeout) != policy.user_timeout {
        return false;
    }
    if policy.idle == 0 && policy.intvl == 0 {
        return true;
    }
    let hz = hz();
    if hz == 0 {
        return false; // not learnt yet: set them
    }
    (policy.idle == 0 || load::<u32>(tp, offs.keepalive_time) == policy.idle * hz)
        && (policy.intvl == 0 || load::<u32>(tp, offs.keepalive_intvl) == policy.intvl * hz)
}
