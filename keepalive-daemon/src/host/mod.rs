//! Facts of the running host, read or changed without `bpf(2)`: the cgroup2 tree, processes,
//! a socket's options, systemd units, inotify, sd_notify, and the daemon's log. Imports only
//! [`crate::model`].
pub mod cgroup;
pub mod logging;
pub mod notify;
pub mod pathio;
pub mod process;
pub mod sockopt;
pub mod sys;
pub mod target;
pub mod watch;
