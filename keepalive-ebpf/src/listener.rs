//! What a listener held before kad changed it, and putting that back once no policy decides
//! for it any more, so that what it accepts from then on is as its program made it. The
//! record lives in the listener's [`KAD_LISTENERS`] storage; `setsockopt` adds the values a
//! program sets itself.
//!
//! Uses `kernel`, `maps` and `options` only.

use core::ffi::c_void;

use aya_ebpf::bindings::{SOL_SOCKET, SO_KEEPALIVE};
use keepalive_common::{
    KernelOffsets, PolicyValue, OFFSETS_KEEPALIVE, OPT_CNT, OPT_IDLE, OPT_INTVL, OPT_KEEPALIVE,
    OPT_USER_TIMEOUT,
};

use crate::{
    kernel::{
        load, IPPROTO_TCP, SOCK_KEEPOPEN, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
        TCP_USER_TIMEOUT,
    },
    maps::{hz, KAD_DEFAULTS, KAD_LISTENERS},
    options::set_opt,
};

/// The options a policy sets (`OPT_*` bits).
#[inline(always)]
fn options_of(policy: &PolicyValue) -> u32 {
    let mut opts = OPT_KEEPALIVE;
    if policy.idle != 0 {
        opts |= OPT_IDLE;
    }
    if policy.intvl != 0 {
        opts |= OPT_INTVL;
    }
    if policy.cnt != 0 {
        opts |= OPT_CNT;
    }
    if policy.user_timeout != 0 {
        opts |= OPT_USER_TIMEOUT;
    }
    opts
}

/// Before kad changes the listener `tp` (whose socket is `sk`, as the helper takes it): what
/// it holds of each option kad is about to change for the first time.
#[inline(always)]
pub(crate) fn remember_listener(
    sk: *mut c_void,
    tp: *const u8,
    policy: &PolicyValue,
    offs: &KernelOffsets,
) {
    if offs.valid & OFFSETS_KEEPALIVE == 0 {
        return; // cannot read what it holds: nothing to put back later
    }
    let Some(record) = KAD_LISTENERS.get(sk, true) else {
        return;
    };
    let new = options_of(policy) & !record.changed;
    if new & OPT_KEEPALIVE != 0 {
        record.keepalive = u32::from(load::<u64>(tp, offs.sk_flags) & SOCK_KEEPOPEN != 0);
    }
    if new & OPT_IDLE != 0 {
        record.idle = load(tp, offs.keepalive_time);
    }
    if new & OPT_INTVL != 0 {
        record.intvl = load(tp, offs.keepalive_intvl);
    }
    record.seconds &= !new; // what was read from the socket is in jiffies
    if new & OPT_CNT != 0 {
        record.cnt = u32::from(load::<u8>(tp, offs.keepalive_probes));
    }
    if new & OPT_USER_TIMEOUT != 0 {
        record.user_timeout = load(tp, offs.user_timeout);
    }
    record.changed |= new;
}

/// No policy decides for the listener `tp` any more: the options kad changed go back to what
/// the listener held before (or what its program set since), so that what it accepts from now
/// on is as the program made it. An option that cannot go back yet (HZ or the namespace's
/// default not known, the kernel refusing) stays recorded for the next refresh. Returns
/// whether anything went back.
#[inline(always)]
pub(crate) fn restore_listener(sk: *mut c_void, tp: *mut c_void) -> bool {
    let Some(record) = KAD_LISTENERS.get(sk, false) else {
        return false;
    };
    let changed = record.changed;
    if changed == 0 {
        return false;
    }
    let defaults = KAD_DEFAULTS.get(0).copied().unwrap_or_default();
    let hz = hz();
    // A time in seconds: the program's own, or read from the socket (jiffies), or the
    // namespace's default; 0 when not known.
    let seconds = |value: u32, in_seconds: bool, default: u32| {
        if value == 0 {
            default
        } else if in_seconds {
            value
        } else {
            value.checked_div(hz).unwrap_or(0)
        }
    };
    let mut restored = 0;
    if changed & OPT_IDLE != 0 {
        let idle = seconds(record.idle, record.seconds & OPT_IDLE != 0, defaults.idle);
        restored |= put_back(tp, TCP_KEEPIDLE, idle, OPT_IDLE);
    }
    if changed & OPT_INTVL != 0 {
        let intvl = seconds(
            record.intvl,
            record.seconds & OPT_INTVL != 0,
            defaults.intvl,
        );
        restored |= put_back(tp, TCP_KEEPINTVL, intvl, OPT_INTVL);
    }
    if changed & OPT_CNT != 0 {
        let cnt = if record.cnt != 0 {
            record.cnt
        } else {
            defaults.cnt
        };
        restored |= put_back(tp, TCP_KEEPCNT, cnt, OPT_CNT);
    }
    // 0 is valid for these two: no user timeout, keepalive off.
    if changed & OPT_USER_TIMEOUT != 0
        && set_opt(tp, IPPROTO_TCP, TCP_USER_TIMEOUT, record.user_timeout) == 0
    {
        restored |= OPT_USER_TIMEOUT;
    }
    if changed & OPT_KEEPALIVE != 0
        && set_opt(tp, SOL_SOCKET as i32, SO_KEEPALIVE as i32, record.keepalive) == 0
    {
        restored |= OPT_KEEPALIVE;
    }
    record.changed &= !restored;
    restored != 0
}

/// A TCP time or count set back; returns `bit` if it was. 0 (not known) is outside every
/// range: left for later.
#[inline(always)]
fn put_back(tp: *mut c_void, name: i32, value: u32, bit: u32) -> u32 {
    if value != 0 && set_opt(tp, IPPROTO_TCP, name, value) == 0 {
        bit
    } else {
        0
    }
}
