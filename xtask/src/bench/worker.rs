//! The worker: `xtask bench-worker churn N | hold N | pod N | first IDLE INTVL CNT | flood
//! KIND SOCKET THREADS` (part 6's flooding users, not in a cgroup), this same
//! binary started inside a measured cgroup and the bench's network namespace (`pod` and
//! `first`: a network namespace of the worker's own, as a pod has).
use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _, Result};

/// `xtask bench-worker ARGS`, as `Bench::in_cgroup` starts it.
pub fn worker(args: &[String]) -> Result<()> {
    match args {
        [mode, n] if mode == "churn" => churn(n.parse().context("churn count")?),
        [mode, n] if mode == "hold" => hold(n.parse().context("hold count")?),
        [mode, n] if mode == "pod" => {
            own_netns()?;
            hold(n.parse().context("pod count")?)
        }
        [mode, idle, intvl, cnt] if mode == "first" => {
            own_netns()?;
            first([idle.parse()?, intvl.parse()?, cnt.parse()?])
        }
        [mode, kind, socket, threads] if mode == "flood" => {
            super::control::flood(kind, socket, threads.parse().context("flood threads")?)
        }
        _ => bail!(
            "usage: xtask bench-worker churn N | hold N | pod N | first IDLE INTVL CNT | \
             flood KIND SOCKET THREADS"
        ),
    }
}

/// Opens and closes `count` loopback connections to itself; prints the mean ns per connection,
/// then SO_KEEPALIVE of both ends of one connection made before the timed loop.
fn churn(count: u64) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let client = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    let on = |s: &TcpStream| getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE);
    let (client_on, server_on) = (on(&client)?, on(&server)?);
    drop((client, server));
    let start = Instant::now();
    for _ in 0..count {
        let client = TcpStream::connect(addr).context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        // A plain close: no TIME_WAIT in this namespace, and no error on either end.
        drop((client, server));
    }
    let ns = start.elapsed().as_nanos() / u128::from(count.max(1));
    println!("{ns} {client_on} {server_on}");
    Ok(())
}

/// A pod's first connection (to itself): prints "FIRST <connecting> <accepted>", each 1 if
/// that end has keepalive on with exactly `want`, then holds the pod until its input ends.
fn first(want: [i32; 3]) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?).context("connect")?;
    let (server, _) = listener.accept().context("accept")?;
    let has = |s: &TcpStream| -> Result<u8> {
        if getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? == 0 {
            return Ok(0);
        }
        let got = [
            getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
            getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
            getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
        ];
        Ok(u8::from(got == want))
    };
    let mut stdout = std::io::stdout();
    writeln!(stdout, "FIRST {} {}", has(&client)?, has(&server)?)?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        line?;
    }
    Ok(())
}

/// A network namespace of this process's own, as a pod's: loopback up, no TIME_WAIT. It goes
/// with the process, so nothing is left to remove.
fn own_netns() -> Result<()> {
    // SAFETY: plain syscalls on this (still single-threaded) process and a socket it owns.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let up = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0
        };
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        ensure!(up, "loopback up in the pod's network namespace: {error}");
    }
    std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", "0")
        .context("tcp_max_tw_buckets in the pod's network namespace")
}

fn getsockopt(stream: &TcpStream, level: i32, name: i32) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    Ok(value)
}

/// Holds `count` established loopback connections (both ends); prints "READY <port>", then
/// answers "check IDLE INTVL CNT" with "CHECK <sockets> <keepalive on> <with those values>"
/// until "exit" or the end of its input.
fn hold(count: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let client = TcpStream::connect(addr).with_context(|| format!("connect #{i}"))?;
        let (server, _) = listener.accept().with_context(|| format!("accept #{i}"))?;
        pairs.push((client, server));
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "READY {}", addr.port())?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["check", idle, intvl, cnt] => {
                let want: [i32; 3] = [idle.parse()?, intvl.parse()?, cnt.parse()?];
                let (mut on, mut matching) = (0, 0);
                for s in pairs.iter().flat_map(|(c, s)| [c, s]) {
                    if getsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? == 0 {
                        continue;
                    }
                    on += 1;
                    let got = [
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
                        getsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
                    ];
                    if got == want {
                        matching += 1;
                    }
                }
                writeln!(stdout, "CHECK {} {on} {matching}", 2 * pairs.len())?;
                stdout.flush()?;
            }
            ["exit"] => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    drop(pairs);
    Ok(())
}
