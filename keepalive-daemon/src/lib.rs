//! kad: per-cgroup TCP keepalive, set in the kernel by eBPF programs.
//!
//! The crate is in layers; a module imports only from layers listed below its own:
//!
//! - [`cli`]: the `kad` command line; each command runs in the CLI's process and talks to the
//!   daemon through [`api`] (`kad daemon` itself starts [`daemon`]).
//! - [`daemon`]: `kad daemon`: the state thread, the policy tables and their precedence, saving
//!   them, the control socket and `/metrics`.
//! - [`containers`]: policies from containers and pods (the annotation, the OCI hook, the pod
//!   watcher).
//! - [`kernel`]: the only code that calls `bpf(2)`: loading kad's programs, their maps, anchors,
//!   the refresh of existing connections, bpffs. The daemon's logic reaches it through one trait
//!   ([`kernel::Kernel`]).
//! - [`api`]: the control socket's protocol and the CLI's client.
//! - [`host`]: facts of the running host: cgroups, processes, sockets' options, inotify,
//!   sd_notify, the log.
//! - [`model`]: data only: a policy and its values, a socket's keepalive state.
pub mod api;
pub mod cli;
pub mod containers;
pub mod daemon;
pub mod host;
pub mod kernel;
pub mod model;
