//! kad's kernel programs. One copy of each is loaded per daemon; the cgroup programs are
//! attached to a few anchor cgroups (a policy cgroup's parent) and decide per socket from maps:
//!
//! - `kad_sockops` (sock_ops) finds the nearest cgroup with a policy among the socket's cgroup
//!   and its ancestors (from the kernel's structs) and sets the options on a listener and on
//!   each established connection that does not hold them already (an accepted socket inherits
//!   its listener's: the socket's own fields say so, and no per-socket state is made).
//! - `kad_setsockopt` (cgroup/setsockopt) sees a program's own keepalive options: counted as
//!   overrides, or rewritten to the policy's values under `--enforce`.
//! - `kad_iter_tcp` (iter/tcp) gives existing sockets the policy of their cgroup.
//! - `kad_mkdir` (tp_btf/cgroup_mkdir) puts a new cgroup's policy in force from the policy's
//!   path inside `mkdir`, before any process can join the cgroup.
//! - `kad_error_report` (tp_btf/inet_sk_error_report) counts keepalive kills; it runs only when
//!   a connection fails.
//!
//! Nothing is written into the sock_ops context: other programs see what the kernel gave.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, SOL_SOCKET, SO_KEEPALIVE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_seq_write, bpf_setsockopt, bpf_sk_storage_get,
        bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, btf_tracepoint, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::info;
use keepalive_common::{
    Counters, Decision, KernelOffsets, ListenerRecord, NetDefaults, PathKey, PolicyValue,
    FLAG_ENFORCE, FLAG_ON, FLAG_SLOT, MARK_OVERRIDDEN, MAX_DECISIONS, MAX_LEVEL, MAX_POLICIES,
    MAX_SCOPE, OFFSETS_ADDRS, OFFSETS_CGROUP, OFFSETS_KEEPALIVE, OFFSETS_KILLS, OPT_CNT, OPT_IDLE,
    OPT_INTVL, OPT_KEEPALIVE, OPT_USER_TIMEOUT, PATH_KEY_LEN,
};

// Not in aya-ebpf's bindings (include/uapi/linux/tcp.h, in.h, errno.h).
const IPPROTO_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const ETIMEDOUT: i32 = 110;
const AF_INET6: u16 = 10;
// include/net/tcp_states.h
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
/// `enum sock_flags` (include/net/sock.h): SOCK_KEEPOPEN has been bit 3 of `sk_flags` since
/// Linux 2.6; it is not in the BTF offsets because BTF holds no enum-to-bit layout to check.
const SOCK_KEEPOPEN: u64 = 1 << 3;

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

#[map]
static KAD_POLICY: HashMap<u64, PolicyValue> = HashMap::with_max_entries(MAX_POLICIES, 0);

#[map]
static KAD_PATHS: HashMap<PathKey, PolicyValue> = HashMap::with_max_entries(MAX_POLICIES, 0);

#[map]
static KAD_COUNTS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_POLICIES, 0);

#[map]
static KAD_SCOPE: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SCOPE, 0);

#[map]
static KAD_SCRATCH: PerCpuArray<PathKey> = PerCpuArray::with_max_entries(1, 0);

/// Decisions remembered for cgroups without a policy of their own: which ancestor decides
/// (0: none), valid while [`KAD_EPOCH`] has not moved. Saves the walk up the tree, so that a
/// socket deep below its policy, or below none, costs what one next to it does. Per-CPU LRU
/// lists: no lock shared between CPUs when a decision is added.
#[map]
static KAD_DECIDE: LruHashMap<u64, Decision> =
    LruHashMap::with_max_entries(MAX_DECISIONS, BPF_F_NO_COMMON_LRU);

/// Moved by the daemon after every change of the policies by cgroup id. A new cgroup's entry
/// (made inside `mkdir`) does not move it: a new id has no remembered decision, nor any
/// descendant that could.
#[map]
static KAD_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The kernel's HZ, learnt from the first socket this program set TCP_KEEPIDLE or
/// TCP_KEEPINTVL on (the kernel stores seconds * HZ); 0 until then. With it a socket's own
/// `keepalive_time` can be compared with a policy's seconds.
#[map]
static KAD_HZ: Array<u32> = Array::with_max_entries(1, 0);

/// Socket local storage for the sockets whose program set a keepalive option itself (a
/// `MARK_*` bit set). aya-ebpf's own `SkStorage` takes no map flags, so the BTF definition is
/// here, laid out as libbpf and aya expect (`type`, `key`, `value`, `max_entries`,
/// `map_flags`). Not copied to accepted sockets: a new connection starts unmarked.
#[repr(C)]
pub struct SockStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const u32,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl Sync for SockStorage {}

#[btf_map]
static KAD_MARKS: SockStorage = SockStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// What each listener kad changed held before (see `ListenerRecord`). Not copied to accepted
/// sockets: they inherit the options themselves.
#[repr(C)]
pub struct ListenerStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const ListenerRecord,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl Sync for ListenerStorage {}

#[btf_map]
static KAD_LISTENERS: ListenerStorage = ListenerStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The defaults of the network namespace the iterator runs in (written by the daemon).
#[map]
static KAD_DEFAULTS: Array<NetDefaults> = Array::with_max_entries(1, 0);

/// The listener record of `sk`; with `create`, an empty one is made if it has none.
#[inline(always)]
fn listener_record(sk: *mut c_void, create: bool) -> Option<&'static mut ListenerRecord> {
    socket_storage(
        &KAD_LISTENERS as *const ListenerStorage as *mut c_void,
        sk,
        create,
    )
}

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
fn remember_listener(sk: *mut c_void, tp: *const u8, policy: &PolicyValue, offs: &KernelOffsets) {
    if offs.valid & OFFSETS_KEEPALIVE == 0 {
        return; // cannot read what it holds: nothing to put back later
    }
    let Some(record) = listener_record(sk, true) else {
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
fn restore_listener(sk: *mut c_void, tp: *mut c_void) -> bool {
    let Some(record) = listener_record(sk, false) else {
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

/// The socket's marks; with `create`, zeroed ones are made if it has none.
#[inline(always)]
fn sock_marks(sk: *mut c_void, create: bool) -> Option<&'static mut u32> {
    socket_storage(&KAD_MARKS as *const SockStorage as *mut c_void, sk, create)
}

/// The value of socket storage `map` (whose values are `T`) for `sk`; with `create`, a zeroed
/// one is made if it has none.
#[inline(always)]
fn socket_storage<T>(map: *mut c_void, sk: *mut c_void, create: bool) -> Option<&'static mut T> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: the helper checks `sk` (the verifier has proven it a socket or NULL) and returns
    // the socket's value or NULL.
    let value = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) } as *mut T;
    // SAFETY: a live storage value of this type, owned by the socket.
    unsafe { value.as_mut() }
}

#[inline(always)]
fn policy_of(id: u64) -> Option<PolicyValue> {
    // SAFETY: plain data; copied out at once.
    unsafe { KAD_POLICY.get(id) }.copied()
}

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: read-only data patched by the loader; volatile keeps the compiler from folding
    // the placeholder values.
    unsafe { read_volatile(&KAD_OFFSETS) }
}

// ---------------------------------------------------------------------------------------------
// Which policy decides for a socket: the nearest of its own cgroup (sk->sk_cgrp_data, fixed when
// the socket was created; an accepted socket has its listener's) and that cgroup's ancestors
// that has a policy. Read from the kernel's structs, so no per-socket state has to be made.

/// The deciding policy's cgroup id and value for the socket at `sk` (a BTF-typed pointer).
#[inline(always)]
fn deciding_policy(sk: *const u8, offs: &KernelOffsets) -> Option<(u64, PolicyValue)> {
    // Direct loads through BTF-typed pointers (the JIT makes them fault-safe loads), much
    // cheaper than bpf_probe_read_kernel; the offsets are constants of the read-only data.
    let cgroup: *const u8 = load(sk, offs.sk_cgroup);
    if cgroup.is_null() {
        return None;
    }
    let kn: *const u8 = load(cgroup, offs.cgroup_kn);
    if kn.is_null() {
        return None;
    }
    let own: u64 = load(kn, offs.kn_id);
    if let Some(policy) = policy_of(own) {
        return Some((own, policy));
    }
    // Read before the walk: a change the daemon makes meanwhile moves it after the maps, so
    // what this walk finds is remembered under an epoch that is already past.
    let epoch = KAD_EPOCH.get(0).copied().unwrap_or(0);
    // SAFETY: plain data, copied out.
    if let Some(d) = unsafe { KAD_DECIDE.get(own) }.copied() {
        if d.epoch == epoch {
            if d.policy == 0 {
                return None;
            }
            if let Some(policy) = policy_of(d.policy) {
                return Some((d.policy, policy));
            }
        }
    }
    let found = walk_up(load(kn, offs.kn_parent), offs);
    let decision = Decision {
        policy: found.map_or(0, |(id, _)| id),
        epoch,
    };
    let _ = KAD_DECIDE.insert(own, decision, 0);
    found
}

/// The nearest cgroup with a policy from `kn` (a `kernfs_node`) up.
#[inline(always)]
fn walk_up(mut kn: *const u8, offs: &KernelOffsets) -> Option<(u64, PolicyValue)> {
    let mut level = 1;
    while level < MAX_LEVEL && !kn.is_null() {
        let id: u64 = load(kn, offs.kn_id);
        if let Some(policy) = policy_of(id) {
            return Some((id, policy));
        }
        kn = load(kn, offs.kn_parent);
        level += 1;
    }
    None
}

/// A field of a kernel struct reached through a BTF-typed pointer.
#[inline(always)]
fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: `base` is a pointer the verifier knows the BTF type of; it checks that `offset`
    // lands on a field of that size, and the JIT turns a fault into a zero.
    unsafe { read_volatile(base.wrapping_add(offset as usize) as *const T) }
}

/// The same for the current task's cgroup (cgroup/setsockopt runs in the caller's context).
#[inline(always)]
fn deciding_policy_of_task() -> Option<(u64, PolicyValue)> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(policy) = policy_of(own) {
        return Some((own, policy));
    }
    // Plain values rather than an Option built in the loop: the compiler may copy an unset
    // Option's payload registers, which the verifier refuses to read.
    let mut best_id = 0;
    let mut best = PolicyValue::default();
    let mut level = 1;
    while level <= MAX_LEVEL {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 || id == own {
            break;
        }
        if let Some(policy) = policy_of(id) {
            best_id = id;
            best = policy;
        }
        level += 1;
    }
    (best_id != 0).then_some((best_id, best))
}

// ---------------------------------------------------------------------------------------------
// sock_ops: listeners and established connections.

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

#[inline(always)]
fn hz() -> u32 {
    KAD_HZ.get(0).copied().unwrap_or(0)
}

/// After kad set TCP_KEEPIDLE (or TCP_KEEPINTVL) on `tp`: the kernel stored seconds * HZ.
#[inline(always)]
fn learn_hz(tp: *const u8, policy: &PolicyValue, offs: &KernelOffsets) {
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

/// Sets the policy's options on a socket (`target` is what `bpf_setsockopt` takes in the
/// calling program type); returns how many the kernel refused.
#[inline(always)]
fn apply(target: *mut c_void, policy: &PolicyValue) -> u64 {
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
fn set_opt(target: *mut c_void, level: i32, name: i32, value: u32) -> u64 {
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

// ---------------------------------------------------------------------------------------------
// A program's own setsockopt of the keepalive options.

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
    if policy.flags & FLAG_ENFORCE != 0 {
        // Not yet listening nor connected (a server sets its options before listen(2)): the
        // program's value is about to be rewritten, and the listener would then hold the
        // policy already, so kad would record nothing at listen. Recorded here instead.
        if tcp_state != TCP_ESTABLISHED && tcp_state != TCP_LISTEN {
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
        if current != wanted as i32 {
            // SAFETY: as above.
            unsafe { *value = wanted as i32 };
            bump(&policy, |c| c.overridden += 1);
        }
        return;
    }
    // Not enforced: the program's value wins. Counted once per socket that kad had set: an
    // established connection or a listener (kad set both when they came to be, or in a refresh).
    // Before that, kad's values come after the program's and win. A listener's accepted
    // sockets inherit the program's value; kad gives them the policy at establishment, as
    // they no longer hold it.
    if tcp_state != TCP_ESTABLISHED && tcp_state != TCP_LISTEN {
        return;
    }
    let Some(marks) = sock_marks(sk as *mut c_void, true) else {
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
fn note_program_value(
    opt: *mut aya_ebpf::bindings::bpf_sockopt,
    sk: *mut c_void,
    level: i32,
    name: i32,
    create: bool,
) {
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
    let Some(record) = listener_record(sk, create) else {
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

// ---------------------------------------------------------------------------------------------
// Existing sockets: iter/tcp, run by the daemon in each network namespace.

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

/// The id of the cgroup a socket belongs to: sk->sk_cgrp_data.cgroup->kn->id.
#[inline(always)]
fn socket_cgroup_id(sk: *const u8, offs: &KernelOffsets) -> u64 {
    let cgroup: u64 = read_kernel(sk, offs.sk_cgroup);
    cgroup_id_of(cgroup as *const u8, offs)
}

#[inline(always)]
fn cgroup_id_of(cgroup: *const u8, offs: &KernelOffsets) -> u64 {
    if cgroup.is_null() {
        return 0;
    }
    let kn: u64 = read_kernel(cgroup, offs.cgroup_kn);
    if kn == 0 {
        return 0;
    }
    read_kernel(kn as *const u8, offs.kn_id)
}

// ---------------------------------------------------------------------------------------------
// Cgroup creation: a policy named by path is in force before the cgroup can hold a process.

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

// ---------------------------------------------------------------------------------------------
// Keepalive kills: the error report of a connection keepalive gave up on.

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
    let sport: u16 = read_kernel(sk, offs.sport);
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

// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn read_kernel<T: Default + Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: probe_read copies the value or fails cleanly, whatever the address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
        .unwrap_or_default()
}

/// Adds to a policy's counters on this CPU (an array slot: no lookup by key, nothing made).
#[inline(always)]
fn bump(policy: &PolicyValue, update: impl Fn(&mut Counters)) {
    if policy.flags & FLAG_SLOT == 0 {
        return; // a value an older kad wrote: counted once the daemon rewrites it
    }
    if let Some(counters) = KAD_COUNTS.get_ptr_mut(policy.slot) {
        // SAFETY: a per-CPU value: nothing else writes it while this program runs on this CPU.
        update(unsafe { &mut *counters });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
