//! `kad probe`: what keepalive settings a TCP connection made from here gets.
use std::{
    io,
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
};

use serde::Serialize;

/// The keepalive options of one socket, as getsockopt reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeepaliveState {
    pub keepalive: bool,
    pub cnt: i32,
    pub idle: i32,
    pub intvl: i32,
    /// TCP_USER_TIMEOUT in milliseconds (0: not set).
    pub user_timeout: i32,
}

impl KeepaliveState {
    /// Reads the options of the socket `fd`.
    pub fn of(fd: RawFd) -> io::Result<KeepaliveState> {
        Ok(KeepaliveState {
            keepalive: getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
            cnt: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
            idle: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
            intvl: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
            user_timeout: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
        })
    }

    /// The classic keepalive test program's output, and TCP_USER_TIMEOUT when it is set (a
    /// line the classic program never printed, so scripts reading it see what they expect).
    pub fn text(&self) -> String {
        let mut text = if self.keepalive {
            format!(
                "SO_KEEPALIVE is ON\nTCP_KEEPCNT   = {}\nTCP_KEEPIDLE  = {}\nTCP_KEEPINTVL = {}\n",
                self.cnt, self.idle, self.intvl
            )
        } else {
            "SO_KEEPALIVE is OFF\n".to_string()
        };
        if self.user_timeout != 0 {
            text.push_str(&format!("TCP_USER_TIMEOUT = {} ms\n", self.user_timeout));
        }
        text
    }
}

fn getsockopt(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len outlive the call and have the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Connects to a listener of our own on loopback and reads the connecting socket's options:
/// kad sets them as the connection is established, in the caller's cgroup.
pub fn probe() -> io::Result<KeepaliveState> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let stream = TcpStream::connect(listener.local_addr()?)?;
    let _accepted = listener.accept()?;
    KeepaliveState::of(stream.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_matches_the_classic_test_program() {
        let on = KeepaliveState {
            keepalive: true,
            cnt: 20,
            idle: 180,
            intvl: 60,
            user_timeout: 0,
        };
        assert_eq!(
            on.text(),
            "SO_KEEPALIVE is ON\nTCP_KEEPCNT   = 20\nTCP_KEEPIDLE  = 180\nTCP_KEEPINTVL = 60\n"
        );
        let off = KeepaliveState {
            keepalive: false,
            ..on
        };
        assert_eq!(off.text(), "SO_KEEPALIVE is OFF\n");
        let timed = KeepaliveState {
            user_timeout: 4000,
            ..on
        };
        assert!(timed
            .text()
            .ends_with("TCP_KEEPINTVL = 60\nTCP_USER_TIMEOUT = 4000 ms\n"));
    }

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

    #[test]
    fn of_reads_what_was_set_on_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = stream.as_raw_fd();
        for (level, name, value) in [
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 321),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 45),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
            (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 7000),
        ] {
            // SAFETY: setsockopt on a socket we own, with an int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    level,
                    name,
                    (&value as *const i32).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        assert_eq!(
            KeepaliveState::of(fd).unwrap(),
            KeepaliveState {
                keepalive: true,
                cnt: 6,
                idle: 321,
                intvl: 45,
                user_timeout: 7000,
            }
        );
        assert!(KeepaliveState::of(-1).is_err());
    }
}
