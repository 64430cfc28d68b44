//! The protocol's wire forms: what older and newer daemons and CLIs send each other.
use super::*;

#[test]
fn requests_round_trip() {
    let requests = [
        Request::Set {
            cgroup: "app".into(),
            policy: Policy::on(Some(180), None, Some(20)).unwrap(),
            container: None,
        },
        Request::Set {
            cgroup: "/sys/fs/cgroup/x".into(),
            policy: Policy::OFF,
            container: Some("ab".repeat(32)),
        },
        Request::ContainerStopped {
            cgroup: "p/libpod-ab".into(),
            container: "ab".repeat(32),
            bundle: "/var/lib/containers/storage/overlay-containers/ab/userdata".into(),
        },
        Request::Unset {
            cgroup: "app".into(),
        },
        Request::SetHost {
            policy: Policy::on(Some(300), None, None).unwrap(),
        },
        Request::UnsetHost,
        Request::Exec {
            cgroup: "/sys/fs/cgroup/kad-exec-7".into(),
            policy: Policy::on(Some(5), None, None).unwrap(),
        },
        Request::Reload,
        Request::List,
        Request::Stats,
        Request::Status,
    ];
    for request in requests {
        let line = encode(&request);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(decode_request(&line).unwrap(), request);
    }
}

#[test]
fn only_reads_are_open_to_everyone() {
    let policy = Policy::OFF;
    let cgroup = String::from("x");
    for request in [
        Request::Set {
            cgroup: cgroup.clone(),
            policy,
            container: None,
        },
        Request::ContainerStopped {
            cgroup: cgroup.clone(),
            container: "a".into(),
            bundle: "/b".into(),
        },
        Request::Unset {
            cgroup: cgroup.clone(),
        },
        Request::SetHost { policy },
        Request::UnsetHost,
        Request::Exec { cgroup, policy },
        Request::Reload,
    ] {
        assert!(request.mutates(), "{request:?}");
        // A user may ask these for the cgroups delegated to them (the hook of rootless
        // podman sends set and container_stopped); the host and the config are root's.
        let root_only = matches!(
            request,
            Request::SetHost { .. } | Request::UnsetHost | Request::Reload
        );
        assert_eq!(request.root_only(), root_only, "{request:?}");
    }
    for request in [Request::List, Request::Stats, Request::Status] {
        assert!(!request.mutates(), "{request:?}");
    }
}

/// What the previous release sends and reads: a set without a container is the same line,
/// and its replies without a root are taken as they are.
#[test]
fn the_previous_release_reads_and_is_read() {
    let set = Request::Set {
        cgroup: "app".into(),
        policy: Policy::OFF,
        container: None,
    };
    let line = String::from_utf8(encode(&set)).unwrap();
    assert!(!line.contains("container"), "{line}");
    assert_eq!(
        decode_request(br#"{"cmd":"set","cgroup":"/sys/fs/cgroup/a","policy":{"mode":"off","idle":null,"intvl":null,"cnt":null}}"#)
            .unwrap(),
        Request::Set {
            cgroup: "/sys/fs/cgroup/a".into(),
            policy: Policy::OFF,
            container: None
        }
    );
    let mut old: Response =
        serde_json::from_str(r#"{"reply":"done","cgroup":"/sys/fs/cgroup/a"}"#).unwrap();
    old.localize(Path::new("/sys/fs/cgroup/unified"));
    assert_eq!(old, Response::done("/sys/fs/cgroup/a"));
}

/// A daemon in a container sees the host's cgroup2 tree at /sys/fs/cgroup; the host's CLI
/// (a hybrid host) at /sys/fs/cgroup/unified.
#[test]
fn replies_are_shown_in_the_clients_mount() {
    let daemon = Path::new("/sys/fs/cgroup");
    let local = Path::new("/sys/fs/cgroup/unified");
    let mut done = Response::done("/sys/fs/cgroup/app/x").with_root(daemon);
    let line = encode(&done);
    assert!(String::from_utf8_lossy(&line).contains(r#""root":"/sys/fs/cgroup""#));
    done.localize(local);
    assert!(
        matches!(&done, Response::Done { cgroup, .. } if cgroup == "/sys/fs/cgroup/unified/app/x")
    );
    let mut list = Response::Policies {
        policies: vec![PolicyEntry::new("/sys/fs/cgroup/a".into(), &Policy::OFF)],
        root: None,
    }
    .with_root(daemon);
    list.localize(local);
    let Response::Policies { policies, .. } = list else {
        panic!()
    };
    assert_eq!(policies[0].cgroup, "/sys/fs/cgroup/unified/a");
    // The host policy's path is the root itself.
    let mut host = Response::done("/sys/fs/cgroup").with_root(daemon);
    host.localize(local);
    assert_eq!(
        host,
        Response::Done {
            cgroup: "/sys/fs/cgroup/unified".into(),
            root: Some("/sys/fs/cgroup".into())
        }
    );
    // The same mount on both sides: nothing changes.
    assert_eq!(rebase(daemon, daemon, "/sys/fs/cgroup/a"), None);
    assert_eq!(rebase(local, daemon, "/elsewhere/a"), None);
}

#[test]
fn malformed_requests_are_errors() {
    assert!(decode_request(b"not json")
        .unwrap_err()
        .starts_with("malformed request"));
    assert!(decode_request(br#"{"cmd":"explode"}"#).is_err());
    assert!(decode_request(br#"{"cmd":"set","cgroup":"a"}"#).is_err());
    assert!(decode_request(br#"{"cmd":"unset","cgroup":"a","extra":1}"#).is_err());
    let big = vec![b' '; MAX_REQUEST_BYTES + 1];
    assert!(decode_request(&big).unwrap_err().contains("too large"));
}

#[test]
fn policy_entry_json_has_the_documented_shape() {
    let entry = PolicyEntry::new(
        "/sys/fs/cgroup/app".into(),
        &Policy::on(Some(180), None, None).unwrap(),
    );
    let v: serde_json::Value = serde_json::to_value(&entry).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"cgroup": "/sys/fs/cgroup/app", "mode": "on", "idle": 180, "intvl": null, "cnt": null, "user_timeout": null, "enforce": false})
    );
    let off = serde_json::to_value(PolicyEntry::new("/x".into(), &Policy::OFF)).unwrap();
    assert_eq!(off["mode"], "off");
    let strict = Policy::on(None, None, Some(5))
        .unwrap()
        .with_extras(Some(9000), true)
        .unwrap();
    let v = serde_json::to_value(PolicyEntry::new("/y".into(), &strict)).unwrap();
    assert_eq!(
        (v["user_timeout"].clone(), v["enforce"].clone()),
        (9000.into(), true.into())
    );
    // A reply from a daemon that predates the fields still reads.
    let old: PolicyEntry =
        serde_json::from_str(r#"{"cgroup":"/z","mode":"on","idle":1,"intvl":null,"cnt":null}"#)
            .unwrap();
    assert_eq!(old.policy, Policy::on(Some(1), None, None).unwrap());
}

/// The largest request a client sends fits the limit with room to spare: two paths of 4095
/// bytes (PATH_MAX), each byte a control character JSON escapes in six.
#[test]
fn the_largest_legitimate_request_fits_the_limit() {
    let path = "\u{1}".repeat(4095);
    let request = Request::ContainerStopped {
        cgroup: path.clone(),
        container: "ab".repeat(32),
        bundle: path,
    };
    let line = encode(&request);
    assert!(line.len() < 50 * 1024, "{} bytes", line.len());
    assert!(line.len() <= MAX_REQUEST_BYTES);
    assert_eq!(decode_request(&line), Ok(request));
}

#[test]
fn root_s_socket_is_next_to_the_socket() {
    assert_eq!(
        root_socket(Path::new("/run/kad/kad.sock")),
        Path::new("/run/kad/kad.root.sock")
    );
    assert_eq!(root_socket(Path::new("/tmp/s")), Path::new("/tmp/s.root"));
}
