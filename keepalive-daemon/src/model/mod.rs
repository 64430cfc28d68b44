//! Data only, no I/O: a keepalive policy, its validation and its form in the BPF map, and a
//! socket's keepalive state. Imports nothing from the rest of the crate.
pub mod keepalive;
pub mod policy;
