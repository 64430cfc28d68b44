//! kad: per-cgroup TCP keepalive, set in the kernel by an eBPF sock_ops program.
//!
//! The daemon ([`daemon`]) owns the [`enforcer`] (program instances, the policies map) and the
//! policy table ([`store`]); the CLI ([`cli`]) talks to it over a unix socket ([`protocol`],
//! [`client`]); [`server`] serves the control socket.
pub mod annotation;
pub mod audit;
pub mod bpfsys;
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod enforcer;
pub mod exec;
pub mod inspect;
pub mod killlog;
pub mod kube_watch;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod oci;
pub mod pathio;
pub mod pods;
pub mod policy;
pub mod probe;
pub mod protocol;
pub mod reconcile;
pub mod server;
pub mod slots;
pub mod store;
pub mod sys;
pub mod target;
pub mod watch;
