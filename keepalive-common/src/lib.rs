//! The layout of the BPF map values that the daemon writes and the sock_ops program reads.
#![no_std]

/// Name of the map holding one [`PolicyValue`] per policy cgroup, keyed by cgroup id.
pub const POLICIES_MAP: &str = "KAD_POLICIES";
/// Name of the read-only global that tells a program instance which cgroup it was attached to.
pub const CGROUP_ID_GLOBAL: &str = "KAD_CGROUP_ID";
/// Name of the read-only global holding the mark a program leaves in `skops->reply`.
pub const MARK_GLOBAL: &str = "KAD_MARK";
/// Name of the per-CPU map of [`Counters`], keyed by policy cgroup id.
pub const STATS_MAP: &str = "KAD_STATS";
/// Name of the read-only global holding [`SockOffsets`].
pub const OFFSETS_GLOBAL: &str = "KAD_OFFSETS";
/// Capacity of the policies map: the most policy cgroups one daemon can hold.
pub const MAX_POLICIES: u32 = 4096;

/// Keepalive is turned on; without it the cgroup is an opt-out and sockets are left alone.
pub const FLAG_ON: u32 = 1;

/// One cgroup's policy as the kernel program sees it. A value of 0 means "not set": the socket
/// keeps the kernel default (`net.ipv4.tcp_keepalive_*`), which is valid since 0 is outside
/// every option's range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub flags: u32,
    pub idle: u32,
    pub intvl: u32,
    pub cnt: u32,
}

/// What the program counted for one policy cgroup (summed over CPUs by the daemon).
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
}

/// Byte offsets, from the start of `struct sock`, of the fields that tell a keepalive kill,
/// found by the daemon in the kernel's BTF. Rust BPF has no CO-RE to relocate them itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock.sk_err` (int).
    pub sk_err: u32,
    /// `inet_connection_sock.icsk_probes_out` (u8).
    pub probes_out: u32,
    /// `inet_connection_sock.icsk_retransmits` (u8).
    pub retransmits: u32,
    /// Non-zero when the offsets were found; otherwise kills are not counted.
    pub valid: u32,
}

// SAFETY: plain `repr(C)` integers with no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockOffsets {}
