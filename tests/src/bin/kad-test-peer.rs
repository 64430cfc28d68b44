//! A TCP peer for kad's integration tests. It reports the keepalive settings of its connected
//! socket as seen from inside the process (getsockopt), then holds the connection until its
//! standard input closes.
//!
//!   kad-test-peer listen ADDR    prints "LISTENING <port>", accepts one connection, reports
//!   kad-test-peer connect ADDR   connects, reports
//!   kad-test-peer listen-own ADDR  as listen, but sets its own TCP_KEEPIDLE (7) on the
//!                                listener after listen(2), and 8 on the accepted socket
//!   kad-test-peer listen-own-listener ADDR  as listen-own, but leaves the accepted socket
//!                                as it comes
//!   kad-test-peer connect-off ADDR  connects, turns SO_KEEPALIVE off (and TCP_KEEPIDLE to
//!                                5), reports with "setsockopt": the first failing call's
//!                                return value, or 0
//!   kad-test-peer serve ADDR     listens, prints "LISTENING <port>"; for every line read from
//!                                stdin, connects to itself, accepts, and prints both ends'
//!                                settings as one JSON line; exits at EOF
//!   kad-test-peer serve-own ADDR as serve, but first sets its own SO_KEEPALIVE (1) and
//!                                TCP_KEEPIDLE (77) on the listener after listen(2)
//!   kad-test-peer serve-early ADDR  as serve (IPv4 only), but sets SO_KEEPALIVE (0) and
//!                                TCP_KEEPIDLE (66) on its socket before listen(2), as C
//!                                servers do
//!   kad-test-peer churn N        opens and closes N loopback connections to itself, prints
//!                                the mean nanoseconds per connection (for cargo xtask bench)
//!   kad-test-peer hold SOCKET N  opens N connections to a unix socket and holds them silent;
//!                                prints "HELD <n> REFUSED <how many got an error at once>"
//!   kad-test-peer readers SOCKET K   K threads ask SOCKET for `status` in a loop until stdin
//!                                closes, then prints "READ <replies> <bytes>"
//!   kad-test-peer request SOCKET LINE  sends LINE, prints the reply
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::net::UnixStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

fn getsockopt(fd: i32, level: i32, name: i32) -> Result<i32, String> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for the duration of the call.
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
        return Err(format!(
            "getsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(value)
}

fn report(stream: &TcpStream) -> Result<String, String> {
    let fd = stream.as_raw_fd();
    let keepalive = getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0;
    let idle = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?;
    let intvl = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?;
    let cnt = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?;
    let user_timeout = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "keepalive": keepalive, "idle": idle, "intvl": intvl, "cnt": cnt,
        "user_timeout": user_timeout,
        "local_port": local.port(), "peer_port": peer.port(),
    })
    .to_string())
}

fn set_int(fd: i32, level: i32, name: i32, value: i32) -> Result<(), String> {
    // SAFETY: setsockopt with an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "setsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// What a program that wants no keepalive does after connecting: turns it off. Returns the
/// first failing setsockopt's return value, or 0.
fn turn_keepalive_off(stream: &TcpStream) -> i32 {
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5),
    ] {
        // SAFETY: setsockopt on a socket we own, with an int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return rc;
        }
    }
    0
}

/// Both ends of every connection live in this process, so both run the cgroup's programs.
fn churn(count: u32) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    for _ in 0..count {
        let client = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        // Close with a reset: no TIME_WAIT, so thousands of runs do not use up the ports.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid struct of the size given.
        unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(client);
        drop(server);
    }
    let elapsed = start.elapsed();
    println!("{}", elapsed.as_nanos() / u128::from(count.max(1)));
    Ok(())
}

/// Holds one connection (both ends in this process) and prints both ends' settings as one
/// JSON line at start and again for every line read from stdin; exits at EOF.
fn pair(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let client = TcpStream::connect(local).map_err(|e| format!("connect: {e}"))?;
    let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    loop {
        print_pair(&client, &server)?;
        if !next_line()? {
            return Ok(());
        }
    }
}

/// Both ends' settings as one JSON line.
fn print_pair(client: &TcpStream, server: &TcpStream) -> Result<(), String> {
    println!(
        "{{\"client\":{},\"server\":{}}}",
        report(client)?,
        report(server)?
    );
    std::io::stdout().flush().map_err(|e| e.to_string())
}

/// Waits for a line on stdin; false at EOF.
fn next_line() -> Result<bool, String> {
    let mut line = String::new();
    let read = std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(read > 0)
}

/// One listener, held; a new connection to it for every line read from stdin, reported from
/// both ends (the accepted end inherits the listener's options) and closed.
fn serve(addr: &str, own: bool) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    if own {
        set_int(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            1,
        )?;
        set_int(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            77,
        )?;
    }
    serve_on(&listener)
}

/// Says the listener's port, then makes a connection to it for every line read from stdin,
/// reported from both ends and closed.
fn serve_on(listener: &TcpListener) -> Result<(), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("LISTENING {}", local.port());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    while next_line()? {
        let client = TcpStream::connect(local).map_err(|e| format!("connect: {e}"))?;
        let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        print_pair(&client, &server)?;
    }
    Ok(())
}

/// `serve`, with the options set on the socket before it listens.
fn serve_early(addr: &str) -> Result<(), String> {
    let addr: std::net::SocketAddrV4 = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr is built
    // from a parsed address and passed with its size.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let listener = <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0)?;
        set_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 66)?;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
            || libc::listen(fd, 128) != 0
        {
            return Err(format!("bind/listen: {}", std::io::Error::last_os_error()));
        }
        listener
    };
    serve_on(&listener)
}

/// As many open files as the hard limit allows: a flood needs more than the usual 1024.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Connects and accepts in a loop until stdin closes, checking both ends of every connection
/// for keepalive `idle`; prints "CONNECTIONS MISSES" at the end.
fn check(idle: i32) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&done);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (mut total, mut misses) = (0u64, 0u64);
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        let client = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        for s in [&client, &server] {
            let fd = s.as_raw_fd();
            let on = getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0;
            if !on || getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)? != idle {
                misses += 1;
            }
        }
        total += 1;
    }
    println!("{total} {misses}");
    Ok(())
}

fn wait_for_stdin_eof() {
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn hold(socket: &str, count: usize) -> Result<(), String> {
    raise_nofile();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let stream =
            UnixStream::connect(socket).map_err(|e| format!("connect {socket} (#{i}): {e}"))?;
        held.push(stream);
    }
    // Whatever the server refused has its one-line error waiting by now (it accepts other
    // users' connections at 1,000 a second).
    std::thread::sleep(Duration::from_millis(2000));
    let mut refused = 0;
    for stream in &held {
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        if let Ok(n) = (&*stream).read(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("too many connections") {
                refused += 1;
            }
        }
    }
    println!("HELD {} REFUSED {refused}", held.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    wait_for_stdin_eof();
    Ok(())
}

fn readers(socket: &str, threads: usize) -> Result<(), String> {
    let replies = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    for _ in 0..threads {
        let (socket, replies, bytes) = (socket.to_string(), replies.clone(), bytes.clone());
        std::thread::spawn(move || loop {
            let Ok(mut stream) = UnixStream::connect(&socket) else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let mut reply = Vec::new();
            if stream.write_all(b"{\"cmd\":\"status\"}\n").is_ok()
                && stream.read_to_end(&mut reply).is_ok()
            {
                replies.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(reply.len() as u64, Ordering::Relaxed);
            }
        });
    }
    wait_for_stdin_eof();
    println!(
        "READ {} {}",
        replies.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed)
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // The reader threads are still looping: leave without joining them.
    std::process::exit(0);
}

/// Readers that ask for status and do not read the reply: each of `threads` connects, sends
/// its request, holds the connection 11 s, and starts again; the threads start 300 ms apart,
/// so that their requests keep arriving.
fn stalled_readers(socket: &str, threads: usize) -> Result<(), String> {
    for i in 0..threads {
        let socket = socket.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300 * i as u64));
            loop {
                if let Ok(mut stream) = UnixStream::connect(&socket) {
                    let _ = stream.write_all(b"{\"cmd\":\"status\"}\n");
                    std::thread::sleep(Duration::from_secs(11));
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
    }
    println!("STARTED");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    wait_for_stdin_eof();
    std::process::exit(0);
}

fn request(socket: &str, line: &str) -> Result<(), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    print!("{reply}");
    Ok(())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, socket, arg] = args.as_slice() {
        let number = || {
            arg.parse::<usize>()
                .map_err(|e| format!("{mode} count: {e}"))
        };
        return match mode.as_str() {
            "hold" => hold(socket, number()?),
            "readers" => readers(socket, number()?),
            "stalled-readers" => stalled_readers(socket, number()?),
            "request" => request(socket, arg),
            other => Err(format!("unknown mode {other}")),
        };
    }
    if let [mode, value] = args.as_slice() {
        match mode.as_str() {
            "churn" => return churn(value.parse().map_err(|e| format!("churn count: {e}"))?),
            "pair" => return pair(value),
            "serve" => return serve(value, false),
            "serve-own" => return serve(value, true),
            "serve-early" => return serve_early(value),
            "check" => return check(value.parse().map_err(|e| format!("check idle: {e}"))?),
            _ => {}
        }
    }
    let [mode, addr] = args.as_slice() else {
        return Err("usage: kad-test-peer listen|connect ADDR".into());
    };
    let stream = match mode.as_str() {
        "listen" | "listen-own" | "listen-own-listener" => {
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            if mode != "listen" {
                set_int(
                    listener.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_KEEPIDLE,
                    7,
                )?;
            }
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            println!("LISTENING {port}");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
            let stream = listener.accept().map_err(|e| format!("accept: {e}"))?.0;
            if mode == "listen-own" {
                set_int(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 8)?;
            }
            stream
        }
        "connect" | "connect-off" => {
            TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?
        }
        // `connect-set=N`: after connecting, sets SO_KEEPALIVE=1 and TCP_KEEPIDLE=N, twice
        // each (as postgres and ssh set what a policy may have already).
        other if other.starts_with("connect-set=") => {
            let idle: i32 = other["connect-set=".len()..]
                .parse()
                .map_err(|e| format!("{other}: {e}"))?;
            let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            for _ in 0..2 {
                set_int(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
                set_int(
                    stream.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_KEEPIDLE,
                    idle,
                )?;
            }
            stream
        }
        other => return Err(format!("unknown mode {other}")),
    };
    if mode == "connect-off" {
        let rc = turn_keepalive_off(&stream);
        let mut report: serde_json::Value =
            serde_json::from_str(&report(&stream)?).map_err(|e| e.to_string())?;
        report["setsockopt"] = rc.into();
        println!("{report}");
    } else {
        println!("{}", report(&stream)?);
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Hold the connection until the test closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(stream);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kad-test-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
