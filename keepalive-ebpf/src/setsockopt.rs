//! `kad_setsockopt` (cgroup/setsockopt): a program's own setting of a keepalive option to a
//! value other than the policy's, counted once per connection as an override, and rewritten to
//! the policy's value under `--enforce`. On a listener kad changed, the program's value is
//! recorded as what the listener goes back to.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{bpf_sockopt, SOL_SOCKET, SO_KEEPALIVE},
    macros::cgroup_sockopt,
    programs::SockoptContext,
};
use keepalive_common::{
    FLAG_ENFORCE, FLAG_ON, MARK_OVERRIDDEN, OPT_CNT, OPT_IDLE, OPT_INTVL, OPT_KEEPALIVE,
    OPT_USER_TIMEOUT,
};

use crate::{
    decide::deciding_policy_of_task,
    kernel::{
        IPPROTO_TCP, TCP_ESTABLISHED, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_LISTEN,
        TCP_USER_TIMEOUT,
    },
    maps::{bump, KAD_LISTENERS, KAD_MARKS},
};

#[cgroup_sockopt(setsockopt)]
pub fn kad_setsockopt(ctx: SockoptContext) -> i32 {
    on_setsockopt(&ctx);
    1 // let the call through (with the value possibly rewritten)
}

fn on_setsockopt(ctx: &SockoptContext) {
    let opt = ctx.sockopt;
    // SAFETY: the context fields below are readable in cgroup/setsockopt.
    let (level, name, sk) = unsafe { ((*opt).level, (*opt).optname, (*opt).__bindgen_anon_1.sk) };
    let keepalive_opt = (level == SOL_SOCKET as i32 && name == SO_KEEPALIVE as i32)
        || (level == IPPROTO_TCP
            && (name == TCP_KEEPIDLE
                || name == TCP_KEEPINTVL
                || name == TCP_KEEPCNT
                || name == TCP_USER_TIMEOUT));
    if !keepalive_opt || sk.is_null() {
        return;
    }
    // SAFETY: `state` is readable in the bpf_sock context.
    let tcp_state = unsafe { (*sk).state };
    if tcp_state == TCP_LISTEN {
        note_program_value(opt, sk as *mut c_void, level, name, false);
    }
    let Some((_, policy)) = deciding_policy_of_task() else {
        return;
    };
    if policy.flags & FLAG_ON == 0 {
        return;
    }
    // The policy's value for this option; 0 when the policy leaves it to the program.
    let wanted = if level == SOL_SOCKET as i32 {
        1
    } else if name == TCP_KEEPIDLE {
        policy.idle
    } else if name == TCP_KEEPINTVL {
        policy.intvl
    } else if name == TCP_KEEPCNT {
        policy.cnt
    } else {
        policy.user_timeout
    };
    if wanted == 0 {
        return;
    }
    let enforce = policy.flags & FLAG_ENFORCE != 0;
    if enforce && tcp_state != TCP_ESTABLISHED && tcp_state != TCP_LISTEN {
        // Not yet listening nor connected (a server sets its options before listen(2)): the
        // program's value is about to be rewritten, and the listener would then hold the
        // policy already, so kad would record nothing at listen. Recorded here instead.
        note_program_value(opt, sk as *mut c_void, level, name, true);
    }
    // SAFETY: optval/optval_end delimit the kernel's copy of the value; bounds-checked.
    let (optval, end) = unsafe {
        (
            (*opt).__bindgen_anon_2.optval,
            (*opt).__bindgen_anon_3.optval_end,
        )
    };
    let value = optval as *mut i32;
    if value.is_null() || (value as usize) + size_of::<i32>() > end as usize {
        return;
    }
    // SAFETY: in bounds (checked above).
    let current = unsafe { *value };
    // A call that sets what the policy has already (SO_KEEPALIVE=1, the policy's idle)
    // changes nothing: neither rewritten nor counted.
    let same = if level == SOL_SOCKET as i32 {
        current != 0
    } else {
        current == wanted as i32
    };
    if same {
        return;
    }
    if enforce {
        // SAFETY: as above.
        unsafe { *value = wanted as i32 };
    }
    // Counted once per socket that kad had given the policy: an established connection or a
    // listener (kad set both when they came to be, or in a refresh). Before that, kad's
    // values come after the program's and win anyway, enforced or not. A listener's accepted
    // sockets inherit the program's value; kad gives them the policy at establishment, as
    // they no longer hold it.
    if tcp_state != TCP_ESTABLISHED && tcp_state != TCP_LISTEN {
        return;
    }
    let Some(marks) = KAD_MARKS.get(sk as *mut c_void, true) else {
        return;
    };
    if *marks & MARK_OVERRIDDEN == 0 {
        *marks |= MARK_OVERRIDDEN;
        bump(&policy, |c| c.overridden += 1);
    }
}

/// A program set a keepalive option on a listener kad changed (or, with `create`, on a
/// socket not yet listening whose value `--enforce` is about to rewrite): its value is what
/// the listener goes back to when no policy decides for it any more. Values the kernel
/// refuses change nothing and are not recorded.
#[inline(always)]
fn note_program_value(opt: *mut bpf_sockopt, sk: *mut c_void, level: i32, name: i32, create: bool) {
    // SAFETY: optval/optval_end delimit the kernel's copy of the value; bounds-checked.
    let (optval, end) = unsafe {
        (
            (*opt).__bindgen_anon_2.optval,
            (*opt).__bindgen_anon_3.optval_end,
        )
    };
    let value = optval as *const i32;
    if value.is_null() || (value as usize) + size_of::<i32>() > end as usize {
        return;
    }
    // SAFETY: in bounds (checked above).
    let value = unsafe { *value };
    // The option's bit, if the kernel accepts the value (include/net/tcp.h's limits).
    let bit = if level == SOL_SOCKET as i32 {
        OPT_KEEPALIVE
    } else if name == TCP_KEEPIDLE && (1..=32767).contains(&value) {
        OPT_IDLE
    } else if name == TCP_KEEPINTVL && (1..=32767).contains(&value) {
        OPT_INTVL
    } else if name == TCP_KEEPCNT && (1..=127).contains(&value) {
        OPT_CNT
    } else if name == TCP_USER_TIMEOUT && value >= 0 {
        OPT_USER_TIMEOUT
    } else {
        return;
    };
    let Some(record) = KAD_LISTENERS.get(sk, create) else {
        return;
    };
    if create {
        record.changed |= bit;
    } else if record.changed & bit == 0 {
        return; // an option kad did not change: the program's value stays anyway
    }
    let value = value as u32;
    if bit == OPT_KEEPALIVE {
        record.keepalive = u32::from(value != 0);
    } else if bit == OPT_IDLE {
        record.idle = value;
        record.seconds |= OPT_IDLE;
    } else if bit == OPT_INTVL {
        record.intvl = value;
        record.seconds |= OPT_INTVL;
    } else if bit == OPT_CNT {
        record.cnt = value;
    } else {
        record.user_timeout = value;
    }
}
