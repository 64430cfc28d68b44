//! The CLI's side of the control socket.
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{self, Request, Response};
use crate::host::{cgroup, sys};

/// Setting a policy loads and attaches a program; this is far more than it takes.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the kad daemon is not running (nothing listens on {0}): start it with `kad daemon` (or `systemctl start kad`), or point KAD_SOCKET/--socket at its socket")]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: run as root")]
    PermissionDenied(PathBuf),
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {path} sent a reply kad cannot read: {message}")]
    BadReply { path: PathBuf, message: String },
    /// The daemon refused the request; its message says why.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the daemon's reply, its paths shown below this side's cgroup2
/// mount point; an error reply becomes `Refused`. A daemon of the previous release, which
/// knows no container field, gets the request without it.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut response = match exchange(socket, request) {
        Err(ClientError::Refused(message)) if is_unknown(&message, "field", "container") => {
            match request {
                Request::Set { cgroup, policy, .. } => exchange(
                    socket,
                    &Request::Set {
                        cgroup: cgroup.clone(),
                        policy: *policy,
                        container: None,
                    },
                ),
                _ => Err(ClientError::Refused(message)),
            }
        }
        other => other,
    }?;
    if let Ok(root) = cgroup::find_root() {
        response.localize(&root);
    }
    Ok(response)
}

/// Whether a daemon's refusal says it does not know this field or variant (an older daemon).
pub fn is_unknown(message: &str, what: &str, name: &str) -> bool {
    message.starts_with("malformed request")
        && message.contains(&format!("unknown {what} `{name}`"))
}

fn exchange(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io_err = |source: io::Error| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    // Root's own socket first: no other user's connections queue before it.
    let root = sys::is_root()
        .then(|| UnixStream::connect(protocol::root_socket(socket)).ok())
        .flatten();
    let mut stream = match root {
        Some(stream) => Ok(stream),
        None => UnixStream::connect(socket),
    }
    .map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_path_buf())
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_path_buf()),
        _ => io_err(e),
    })?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    // A daemon that refuses the request before reading it all (too large; too many
    // connections) replies and closes: the write then fails, but the reply is there to read.
    let written = stream.write_all(&protocol::encode(request));
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    match (written, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(io_err(e)),
        (Ok(()), Err(e)) => return Err(io_err(e)),
        (Ok(()), Ok(_)) => {
            return Err(ClientError::BadReply {
                path: socket.to_path_buf(),
                message: "the connection was closed without a reply".into(),
            })
        }
    }
    let response: Response = serde_json::from_str(&line).map_err(|e| ClientError::BadReply {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    match response {
        Response::Error { message } => Err(ClientError::Refused(message)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Policy;

    /// The previous release's requests, as its daemon decodes them (unknown fields refused).
    #[derive(Debug, serde::Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum PreviousRequest {
        Set { cgroup: String, policy: Policy },
        Unset { cgroup: String },
    }

    fn previous_daemon_refuses(request: &Request) -> String {
        let line = protocol::encode(request);
        let e = serde_json::from_slice::<PreviousRequest>(&line).unwrap_err();
        // As the daemon's decode_request words it.
        format!("malformed request: {e}")
    }

    /// A daemon that replies and closes before reading the request (as a refusal does): the
    /// client's write fails, and it reports the daemon's message, not "Broken pipe".
    #[test]
    fn a_refusal_sent_before_the_request_is_read_reaches_the_caller() {
        let dir = std::env::temp_dir().join(format!("kad-client-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .write_all(&protocol::encode(&Response::error("too many connections")))
                .unwrap();
            // Closed unread.
        });
        // Larger than the socket's buffers: the write is still going when the daemon closes.
        let request = Request::Set {
            cgroup: "x".repeat(8 << 20),
            policy: Policy::OFF,
            container: None,
        };
        let result = exchange(&path, &request);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Err(ClientError::Refused(message)) => assert_eq!(message, "too many connections"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_previous_daemons_refusals_are_recognised() {
        let set = Request::Set {
            cgroup: "a".into(),
            policy: Policy::OFF,
            container: Some("ab".repeat(32)),
        };
        assert!(is_unknown(
            &previous_daemon_refuses(&set),
            "field",
            "container"
        ));
        let stopped = Request::ContainerStopped {
            cgroup: "a".into(),
            container: "ab".into(),
            bundle: "/b".into(),
        };
        assert!(is_unknown(
            &previous_daemon_refuses(&stopped),
            "variant",
            "container_stopped"
        ));
        assert!(!is_unknown("no policy for /x", "field", "container"));
    }
}
