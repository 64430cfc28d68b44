//! The kernel side, and the only code that calls `bpf(2)`: loading kad's programs and finding
//! what the kernel supports, their maps, the anchor cgroups the programs are attached to, the
//! refresh of existing connections in each network namespace, bpffs (mount, pins, lock), BTF
//! offsets and the kernel's kill events. Imports [`crate::host`] and [`crate::model`].
pub mod bpfsys;
pub mod btf;
pub mod enforcer;
pub mod killlog;
pub mod slots;
