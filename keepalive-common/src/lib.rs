//! The layout of the BPF maps and globals that the daemon writes and the kernel programs read.
#![no_std]

/// Policies in force, keyed by the id of the cgroup they name ([`PolicyValue`]).
pub const POLICIES_MAP: &str = "KAD_POLICY";
/// Policies by path (relative to the cgroup2 root, as [`PathKey`]): the program that runs
/// inside `mkdir` puts a new cgroup's policy in force from here, before any process joins it.
pub const PATHS_MAP: &str = "KAD_PATHS";
/// Per-CPU [`Counters`], an array indexed by a policy's [`PolicyValue::slot`]: counting costs
/// no hash lookup on the connection path.
pub const COUNTS_MAP: &str = "KAD_COUNTS";
/// Per-socket marks (socket local storage, `u32` of `MARK_*` bits), made only for a socket
/// whose program set a keepalive option itself.
pub const MARKS_MAP: &str = "KAD_MARKS";
/// The socket's override was counted already.
pub const MARK_OVERRIDDEN: u32 = 1;
/// Listeners kad changed (socket local storage, [`ListenerRecord`]): what each held before, so
/// that when no policy decides for it any more its options go back, and the sockets it accepts
/// from then on inherit what the program had, not kad's values. Made only for listeners, when
/// kad first changes one.
pub const LISTENERS_MAP: &str = "KAD_LISTENERS";
/// The network namespace's `net.ipv4.tcp_keepalive_*` defaults ([`NetDefaults`], one entry),
/// written by the daemon before each iterator run in that namespace: what a listener option
/// goes back to when it had no value of its own.
pub const DEFAULTS_MAP: &str = "KAD_DEFAULTS";
/// [`ListenerRecord::changed`] bits: the options kad changed on a listener.
pub const OPT_KEEPALIVE: u32 = 1;
pub const OPT_IDLE: u32 = 2;
pub const OPT_INTVL: u32 = 4;
pub const OPT_CNT: u32 = 8;
pub const OPT_USER_TIMEOUT: u32 = 16;
/// The kernel's HZ as the programs learnt it (an array of one `u32`), pinned so that a new
/// daemon knows it before its first socket: listener records keep times in jiffies.
pub const HZ_MAP: &str = "KAD_HZ";
/// The cgroups one refresh of existing connections covers: cgroup id -> deciding policy id
/// (0: none). Filled by the daemon for the length of one iterator run.
pub const SCOPE_MAP: &str = "KAD_SCOPE";
/// Per-CPU scratch buffer for the path read inside `mkdir`.
pub const SCRATCH_MAP: &str = "KAD_SCRATCH";
/// Name of the read-only global holding [`KernelOffsets`].
pub const OFFSETS_GLOBAL: &str = "KAD_OFFSETS";

/// Capacity of the policy maps: the most policies one daemon holds.
pub const MAX_POLICIES: u32 = 65_536;
/// Capacity of the scope map: the most cgroups one refresh of existing connections covers.
pub const MAX_SCOPE: u32 = 262_144;
/// Bytes of a path key, NUL included: paths relative to the cgroup2 root up to 255 bytes.
pub const PATH_KEY_LEN: usize = 256;
/// The deepest cgroup level the socket-creation program walks up from.
pub const MAX_LEVEL: u32 = 32;
/// Capacity of the decision cache (cgroups without a policy of their own, by id; least
/// recently used first out: a cgroup pushed out walks the tree once more). Preallocated
/// kernel memory, so sized for the cgroups that make connections, not for every cgroup.
pub const MAX_DECISIONS: u32 = 16_384;
/// The epoch that validates the decision cache (`KAD_DECIDE`): an array of one `u64` the
/// daemon moves after every change of [`POLICIES_MAP`].
pub const EPOCH_MAP: &str = "KAD_EPOCH";

/// Keepalive is turned on; without it the cgroup is an opt-out and sockets are left alone.
pub const FLAG_ON: u32 = 1;
/// The policy comes from the config file (not `kad set`): lets a restart tell them apart.
pub const FLAG_CONFIG: u32 = 2;
/// `--enforce`: a program's own keepalive `setsockopt` is rewritten to the policy's values.
pub const FLAG_ENFORCE: u32 = 4;
/// [`PolicyValue::slot`] is the policy's counters slot (values an older kad wrote have none).
pub const FLAG_SLOT: u32 = 8;

/// One cgroup's policy as the kernel programs see it. A value of 0 means "not set": the socket
/// keeps the kernel default (`net.ipv4.tcp_keepalive_*`), which is valid since 0 is outside
/// every option's range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub flags: u32,
    pub idle: u32,
    pub intvl: u32,
    pub cnt: u32,
    /// TCP_USER_TIMEOUT in milliseconds, 0 when not set.
    pub user_timeout: u32,
    /// The index of the policy's [`Counters`] in [`COUNTS_MAP`] (with [`FLAG_SLOT`]), one per
    /// policy path: a cgroup re-created at the path counts on.
    pub slot: u32,
}

/// What a listener held before kad first changed each option (bit set in `changed`):
/// `keepalive` 0 or 1, `idle` and `intvl` in jiffies as read from the socket, or in seconds
/// where their bit is set in `seconds` (a program's own value), 0 for the namespace default;
/// `cnt` (0: the default), `user_timeout` in ms. A program's own setsockopt of such an option
/// replaces the recorded value: it is what the program wants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerRecord {
    pub changed: u32,
    pub seconds: u32,
    pub keepalive: u32,
    pub idle: u32,
    pub intvl: u32,
    pub cnt: u32,
    pub user_timeout: u32,
}

/// `net.ipv4.tcp_keepalive_time`, `_intvl` (seconds) and `_probes` of one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDefaults {
    pub idle: u32,
    pub intvl: u32,
    pub cnt: u32,
}

/// Which cgroup decides for a cgroup without a policy of its own (0: none), as found at
/// `epoch`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub policy: u64,
    pub epoch: u64,
}

/// A cgroup path relative to the cgroup2 root ("/a/b"), NUL-padded: the key of [`PATHS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathKey {
    pub bytes: [u8; PATH_KEY_LEN],
}

/// What the programs counted for one policy cgroup (summed over CPUs by the daemon).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections configured on the connecting side.
    pub active: u64,
    /// Connections configured on the accepting side.
    pub passive: u64,
    /// `bpf_setsockopt` calls that failed.
    pub failures: u64,
    /// Connections closed because keepalive found the peer dead.
    pub keepalive_kills: u64,
    /// Existing sockets a refresh gave the policy to.
    pub refreshed: u64,
    /// Keepalive `setsockopt` calls of the program after kad's (overrides; rewritten if enforced).
    pub overridden: u64,
}

/// Byte offsets in kernel structs, found by the daemon in the kernel's BTF: Rust BPF has no
/// CO-RE to relocate them itself. Each group is valid only if its flag is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `sock.sk_err` (int).
    pub sk_err: u32,
    /// `inet_connection_sock.icsk_probes_out` (u8).
    pub probes_out: u32,
    /// `inet_connection_sock.icsk_retransmits` (u8).
    pub retransmits: u32,
    /// `sock.sk_cgrp_data` + `sock_cgroup_data.cgroup` (pointer).
    pub sk_cgroup: u32,
    /// `cgroup.kn` (pointer).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (u64).
    pub kn_id: u32,
    /// `cgroup.root` (pointer).
    pub cgroup_root: u32,
    /// `cgroup_root.hierarchy_id` (int).
    pub hierarchy_id: u32,
    /// `kernfs_node.parent` (pointer; `__parent` since 6.15).
    pub kn_parent: u32,
    /// `sock_common.skc_family` (u16).
    pub family: u32,
    /// `sock_common.skc_daddr` and `skc_rcv_saddr` (IPv4, network order).
    pub daddr: u32,
    pub saddr: u32,
    /// `sock_common.skc_dport` and `inet_sock.inet_sport` (both network order).
    pub dport: u32,
    pub sport: u32,
    /// `sock_common.skc_v6_daddr` and `skc_v6_rcv_saddr`.
    pub daddr6: u32,
    pub saddr6: u32,
    /// `tcp_sock.keepalive_time` and `keepalive_intvl` (u32, jiffies), `keepalive_probes`
    /// (u8), `sock.sk_flags` (unsigned long; `SOCK_KEEPOPEN` is its bit 3) and
    /// `inet_connection_sock.icsk_user_timeout` (u32, ms): what a socket holds already.
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    pub keepalive_probes: u32,
    pub sk_flags: u32,
    pub user_timeout: u32,
    /// `sock_common.skc_state` (u8): tells a listener in the iterator.
    pub state: u32,
    /// Bit 0: the kill fields are valid; bit 1: the cgroup fields; bit 2: the address fields;
    /// bit 3: the keepalive fields.
    pub valid: u32,
}

pub const OFFSETS_KILLS: u32 = 1;
pub const OFFSETS_CGROUP: u32 = 2;
pub const OFFSETS_ADDRS: u32 = 4;
pub const OFFSETS_KEEPALIVE: u32 = 8;

// SAFETY: plain `repr(C)` integers with no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for NetDefaults {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerRecord {}
// SAFETY: as above (a byte array).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PathKey {}
