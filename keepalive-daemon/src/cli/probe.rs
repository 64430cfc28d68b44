//! `kad probe`: what keepalive settings a TCP connection made from here gets.
use std::{
    io,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use anyhow::Context as _;

use super::args::JsonFlag;
use crate::{host::sockopt, model::keepalive::KeepaliveState};

/// `kad probe`.
pub(super) fn command(flag: &JsonFlag) -> anyhow::Result<()> {
    let state = probe().context("cannot open a loopback connection")?;
    if flag.json {
        println!("{}", serde_json::to_string(&state)?);
    } else {
        print!("{}", state.text());
    }
    Ok(())
}

/// Connects to a listener of our own on loopback and reads the connecting socket's options:
/// kad sets them as the connection is established, in the caller's cgroup.
pub fn probe() -> io::Result<KeepaliveState> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let stream = TcpStream::connect(listener.local_addr()?)?;
    let _accepted = listener.accept()?;
    sockopt::keepalive_of(stream.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> i32 {
        let path = format!("/proc/sys/net/ipv4/{name}");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn probe_reads_a_real_socket() {
        // This test runs in a cgroup without a kad policy (kad never attaches to the root,
        // and the tests' cgroups are their own): the kernel's defaults, keepalive off.
        let state = probe().expect("loopback connection");
        assert_eq!(
            state,
            KeepaliveState {
                keepalive: false,
                cnt: sysctl("tcp_keepalive_probes"),
                idle: sysctl("tcp_keepalive_time"),
                intvl: sysctl("tcp_keepalive_intvl"),
                user_timeout: 0,
            }
        );
    }
}
