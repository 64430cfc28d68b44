//! kad's sock_ops program. One instance is loaded per policy cgroup and attached to it; the
//! instance knows its cgroup from a read-only global set at load time, because
//! `bpf_get_current_cgroup_id()` names the wrong cgroup on the accepting side and Rust BPF has
//! no CO-RE to read the socket's own cgroup.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, SOL_SOCKET, SO_KEEPALIVE,
    },
    helpers::{bpf_probe_read_kernel, bpf_setsockopt, bpf_skc_to_tcp_sock},
    macros::{map, sock_ops},
    maps::{HashMap, PerCpuHashMap},
    programs::SockOpsContext,
};
use keepalive_common::{Counters, PolicyValue, SockOffsets, FLAG_ON, MAX_POLICIES};

// Not in aya-ebpf's bindings (include/uapi/linux/tcp.h, in.h, errno.h, include/net/tcp_states.h).
const IPPROTO_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_CLOSE: u32 = 7;
const ETIMEDOUT: i32 = 110;

/// The cgroup this instance is attached to (its directory's inode number).
#[no_mangle]
static KAD_CGROUP_ID: u64 = 0;

/// Left in `skops->reply` by the first kad instance that decides for a socket. Programs of
/// ancestor cgroups run after those of descendants and see it: the most specific policy wins.
/// The kernel ignores `reply` for the callbacks where this is written.
#[no_mangle]
static KAD_MARK: u32 = 0;

/// Where to read the fields that tell a keepalive kill (see `SockOffsets`).
#[no_mangle]
static KAD_OFFSETS: SockOffsets = SockOffsets {
    sk_err: 0,
    probes_out: 0,
    retransmits: 0,
    valid: 0,
};

#[map]
static KAD_POLICIES: HashMap<u64, PolicyValue> = HashMap::with_max_entries(MAX_POLICIES, 0);

#[map]
static KAD_STATS: PerCpuHashMap<u64, Counters> = PerCpuHashMap::with_max_entries(MAX_POLICIES, 0);

#[sock_ops]
pub fn kad_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_established(&ctx, op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE {
        on_close(&ctx);
    }
    // sock_ops programs may only return 1 (or 0, which fails the callback).
    1
}

/// The policy of this instance's cgroup, if this instance is the one that decides for the
/// socket (no more specific kad instance ran before it).
fn deciding_policy(ctx: &SockOpsContext) -> Option<(u64, PolicyValue)> {
    // SAFETY: the globals are read-only data patched by the loader; volatile keeps the compiler
    // from folding the placeholder values.
    let (mark, cgroup_id) = unsafe { (read_volatile(&KAD_MARK), read_volatile(&KAD_CGROUP_ID)) };
    // SAFETY: `ops` is the context pointer the kernel gave us; `reply` is readable.
    if unsafe { (*ctx.ops).__bindgen_anon_1.reply } == mark {
        return None;
    }
    // SAFETY: plain-data value; the kernel keeps it alive for this invocation.
    // Not (yet) in the table: let an ancestor's policy decide.
    let policy = *unsafe { KAD_POLICIES.get(cgroup_id) }?;
    ctx.set_reply(mark);
    Some((cgroup_id, policy))
}

fn on_established(ctx: &SockOpsContext, active: bool) {
    let Some((cgroup_id, policy)) = deciding_policy(ctx) else {
        return;
    };
    if policy.flags & FLAG_ON == 0 {
        return; // opt-out: leave the socket as the application made it
    }
    let mut failures = set_opt(ctx, SOL_SOCKET as i32, SO_KEEPALIVE as i32, 1);
    if policy.idle != 0 {
        failures += set_opt(ctx, IPPROTO_TCP, TCP_KEEPIDLE, policy.idle);
    }
    if policy.intvl != 0 {
        failures += set_opt(ctx, IPPROTO_TCP, TCP_KEEPINTVL, policy.intvl);
    }
    if policy.cnt != 0 {
        failures += set_opt(ctx, IPPROTO_TCP, TCP_KEEPCNT, policy.cnt);
    }
    // SAFETY: read-only global, see above.
    if unsafe { read_volatile(&KAD_OFFSETS.valid) } != 0 {
        // Ask for the state callback, to see how the connection ends.
        let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    bump(cgroup_id, |c| {
        if active {
            c.active += 1;
        } else {
            c.passive += 1;
        }
        c.failures += failures;
    });
}

/// A connection closing: count it if keepalive killed it (ETIMEDOUT with keepalive probes out
/// and no retransmissions pending, as tcp_keepalive_timer leaves it).
fn on_close(ctx: &SockOpsContext) {
    let Some((cgroup_id, policy)) = deciding_policy(ctx) else {
        return;
    };
    if policy.flags & FLAG_ON == 0 {
        return;
    }
    // SAFETY: read-only global, see above.
    let offsets = unsafe { read_volatile(&KAD_OFFSETS) };
    if offsets.valid == 0 {
        return;
    }
    // SAFETY: `sk` is a field of the context; the helper checks the pointer it is given.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: the helper returns NULL unless `sk` is a TCP socket; the reads below go through
    // bpf_probe_read_kernel, which tolerates any address.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return;
    }
    let sk_err: i32 = read_kernel(tp, offsets.sk_err);
    let probes_out: u8 = read_kernel(tp, offsets.probes_out);
    let retransmits: u8 = read_kernel(tp, offsets.retransmits);
    if sk_err == ETIMEDOUT && probes_out > 0 && retransmits == 0 {
        bump(cgroup_id, |c| c.keepalive_kills += 1);
    }
}

fn read_kernel<T: Default + Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: probe_read copies the value or fails cleanly, whatever the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
        .unwrap_or_default()
}

/// Adds to this cgroup's counters on this CPU, creating them on first use.
fn bump(cgroup_id: u64, update: impl Fn(&mut Counters)) {
    if let Some(counters) = KAD_STATS.get_ptr_mut(cgroup_id) {
        // SAFETY: a per-CPU value: nothing else writes it while this program runs on this CPU.
        update(unsafe { &mut *counters });
        return;
    }
    let mut counters = Counters::default();
    update(&mut counters);
    if KAD_STATS
        .insert(cgroup_id, counters, BPF_NOEXIST as u64)
        .is_err()
    {
        // Another CPU created the entry first: add to ours.
        if let Some(counters) = KAD_STATS.get_ptr_mut(cgroup_id) {
            // SAFETY: as above.
            update(unsafe { &mut *counters });
        }
    }
}

/// Sets one option; returns 1 if the kernel refused it (counted), 0 otherwise.
fn set_opt(ctx: &SockOpsContext, level: i32, name: i32, value: u32) -> u64 {
    let mut value = value as i32;
    // SAFETY: the helper reads 4 bytes from a valid stack slot.
    let rc = unsafe {
        bpf_setsockopt(
            ctx.ops as *mut c_void,
            level,
            name,
            &mut value as *mut i32 as *mut c_void,
            size_of::<i32>() as i32,
        )
    };
    u64::from(rc != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
