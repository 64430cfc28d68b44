//! The control socket between the CLI and the daemon: the protocol (one JSON request per line,
//! one JSON reply per line) and the CLI's client. Imports [`crate::model`] and [`crate::host`].
pub mod client;
pub mod protocol;
