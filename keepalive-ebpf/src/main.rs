//! kad's sock_ops program. One instance is loaded per policy cgroup and attached to it; the
//! instance knows its cgroup from a read-only global set at load time, because
//! `bpf_get_current_cgroup_id()` names the wrong cgroup on the accepting side and Rust BPF has
//! no CO-RE to read the socket's own cgroup.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, SOL_SOCKET,
        SO_KEEPALIVE,
    },
    helpers::bpf_setsockopt,
    macros::{map, sock_ops},
    maps::HashMap,
    programs::SockOpsContext,
};
use keepalive_common::{PolicyValue, FLAG_ON, MAX_POLICIES};

// Not in aya-ebpf's bindings (include/uapi/linux/tcp.h, in.h).
const IPPROTO_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;

/// The cgroup this instance is attached to (its directory's inode number).
#[no_mangle]
static KAD_CGROUP_ID: u64 = 0;

/// Left in `skops->reply` by the first kad instance that decides for a socket. Programs of
/// ancestor cgroups run after those of descendants and see it: the most specific policy wins.
/// The kernel ignores `reply` for the ESTABLISHED callbacks, so writing it there is harmless.
#[no_mangle]
static KAD_MARK: u32 = 0;

#[map]
static KAD_POLICIES: HashMap<u64, PolicyValue> = HashMap::with_max_entries(MAX_POLICIES, 0);

#[sock_ops]
pub fn kad_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_established(&ctx);
    }
    // sock_ops programs may only return 1 (or 0, which fails the callback).
    1
}

fn on_established(ctx: &SockOpsContext) {
    // SAFETY: the globals are read-only data patched by the loader; volatile keeps the compiler
    // from folding the placeholder values.
    let (mark, cgroup_id) = unsafe { (read_volatile(&KAD_MARK), read_volatile(&KAD_CGROUP_ID)) };
    // SAFETY: `ops` is the context pointer the kernel gave us; `reply` is readable.
    if unsafe { (*ctx.ops).__bindgen_anon_1.reply } == mark {
        return;
    }
    // SAFETY: plain-data value; the kernel keeps it alive for this invocation.
    let Some(policy) = (unsafe { KAD_POLICIES.get(cgroup_id) }) else {
        // Not (yet) in the table: let an ancestor's policy decide.
        return;
    };
    let policy = *policy;
    ctx.set_reply(mark);
    if policy.flags & FLAG_ON == 0 {
        return; // opt-out: leave the socket as the application made it
    }
    set_opt(ctx, SOL_SOCKET as i32, SO_KEEPALIVE as i32, 1);
    if policy.idle != 0 {
        set_opt(ctx, IPPROTO_TCP, TCP_KEEPIDLE, policy.idle);
    }
    if policy.intvl != 0 {
        set_opt(ctx, IPPROTO_TCP, TCP_KEEPINTVL, policy.intvl);
    }
    if policy.cnt != 0 {
        set_opt(ctx, IPPROTO_TCP, TCP_KEEPCNT, policy.cnt);
    }
}

fn set_opt(ctx: &SockOpsContext, level: i32, name: i32, value: u32) {
    let mut value = value as i32;
    // SAFETY: the helper reads 4 bytes from a valid stack slot.
    // The daemon validated the ranges, so a failure here is not expected; it is not fatal.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.ops as *mut c_void,
            level,
            name,
            &mut value as *mut i32 as *mut c_void,
            core::mem::size_of::<i32>() as i32,
        )
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
