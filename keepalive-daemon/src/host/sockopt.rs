//! Reading a socket's options (getsockopt): the keepalive state of a socket kad or a program
//! set.
use std::{io, os::fd::RawFd};

use crate::model::keepalive::KeepaliveState;

/// Reads the keepalive options of the socket `fd`.
pub fn keepalive_of(fd: RawFd) -> io::Result<KeepaliveState> {
    Ok(KeepaliveState {
        keepalive: getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        cnt: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
        idle: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        intvl: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
        user_timeout: getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
    })
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

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

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
            keepalive_of(fd).unwrap(),
            KeepaliveState {
                keepalive: true,
                cnt: 6,
                idle: 321,
                intvl: 45,
                user_timeout: 7000,
            }
        );
        assert!(keepalive_of(-1).is_err());
    }
}
