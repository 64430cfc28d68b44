//! A TCP peer for kad's integration tests. It reports the keepalive settings of its connected
//! socket as seen from inside the process (getsockopt), then holds the connection until its
//! standard input closes.
//!
//!   kad-test-peer listen ADDR    prints "LISTENING <port>", accepts one connection, reports
//!   kad-test-peer connect ADDR   connects, reports
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
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
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "keepalive": keepalive, "idle": idle, "intvl": intvl, "cnt": cnt,
        "local_port": local.port(), "peer_port": peer.port(),
    })
    .to_string())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr] = args.as_slice() else {
        return Err("usage: kad-test-peer listen|connect ADDR".into());
    };
    let stream = match mode.as_str() {
        "listen" => {
            let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            println!("LISTENING {port}");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
            listener.accept().map_err(|e| format!("accept: {e}"))?.0
        }
        "connect" => TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?,
        other => return Err(format!("unknown mode {other}")),
    };
    println!("{}", report(&stream)?);
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
