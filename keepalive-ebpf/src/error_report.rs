//! `kad_error_report` (tp_btf/inet_sk_error_report): counts keepalive kills and logs each one
//! through aya-log. It runs only when a connection fails, so it is off the per-connection path.
//! Each aya-log record carries this module's path, file and line (the daemon logs only the
//! message): moving the `info!` calls changes the program's bytes, not what it does.

use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::info;
use keepalive_common::{KernelOffsets, FLAG_ON, OFFSETS_ADDRS, OFFSETS_CGROUP, OFFSETS_KILLS};

use crate::{
    decide::deciding_policy,
    kernel::{offsets, read_kernel, AF_INET6, ETIMEDOUT},
    maps::bump,
};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn kad_error_report(ctx: BtfTracePointContext) -> i32 {
    let offs = offsets();
    if offs.valid & OFFSETS_KILLS == 0 {
        return 0;
    }
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let sk = sk as *const u8;
    let sk_err: i32 = read_kernel(sk, offs.sk_err);
    let probes_out: u8 = read_kernel(sk, offs.probes_out);
    let retransmits: u8 = read_kernel(sk, offs.retransmits);
    if sk_err == ETIMEDOUT && probes_out > 0 && retransmits == 0 {
        if offs.valid & OFFSETS_CGROUP == 0 {
            return 0;
        }
        let Some((policy, value)) = deciding_policy(sk, &offs) else {
            return 0;
        };
        if value.flags & FLAG_ON == 0 {
            return 0;
        }
        bump(&value, |c| c.keepalive_kills += 1);
        log_kill(&ctx, sk, policy, &offs);
    }
    0
}

/// One event per kill for the daemon's log (aya-log; off the per-connection path: this runs
/// only when keepalive gave up on a connection).
#[inline(always)]
fn log_kill(ctx: &BtfTracePointContext, sk: *const u8, policy: u64, offs: &KernelOffsets) {
    if offs.valid & OFFSETS_ADDRS == 0 {
        info!(ctx, "keepalive kill: policy cgroup {}", policy);
        return;
    }
    let family: u16 = read_kernel(sk, offs.family);
    let dport = u16::from_be(read_kernel::<u16>(sk, offs.dport));
    let sport = u16::from_be(read_kernel::<u16>(sk, offs.sport));
    if family == AF_INET6 {
        let daddr: [u8; 16] = read_kernel(sk, offs.daddr6);
        let saddr: [u8; 16] = read_kernel(sk, offs.saddr6);
        info!(
            ctx,
            "keepalive kill: policy cgroup {} local [{:i}]:{} remote [{:i}]:{}",
            policy,
            saddr,
            sport,
            daddr,
            dport
        );
    } else {
        let daddr = u32::from_be(read_kernel::<u32>(sk, offs.daddr));
        let saddr = u32::from_be(read_kernel::<u32>(sk, offs.saddr));
        info!(
            ctx,
            "keepalive kill: policy cgroup {} local {:i}:{} remote {:i}:{}",
            policy,
            saddr,
            sport,
            daddr,
            dport
        );
    }
}
