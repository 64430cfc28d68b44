//! Ten thousand policies: set, listed, enforced and removed, with one anchor.
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use kad_tests::{connect, kad_env, Daemon, TestCgroup};

/// One request on the control socket, as the CLI sends it; the reply's JSON.
fn request(socket: &Path, line: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the daemon");
    stream.write_all(line.as_bytes()).expect("send");
    stream.write_all(b"\n").expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the reply");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

#[test]
fn ten_thousand_policies_are_set_listed_enforced_and_removed() {
    const N: usize = 10_000;
    let env = kad_env!();
    if !kad_tests::host_only("10,000 policies (a test of kad's scale, not of a kernel feature)") {
        return;
    }
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "scale");
    let path = |i: usize| top.path.join(format!("p{i}"));
    for i in 0..N {
        let reply = request(
            &daemon.socket,
            &serde_json::json!({"cmd": "set", "cgroup": path(i), "policy":
                {"mode": "on", "idle": 100 + (i % 1000), "intvl": null, "cnt": null}})
            .to_string(),
        );
        assert_eq!(reply["reply"], "done", "policy {i}: {reply}");
    }
    let list = daemon.list();
    assert_eq!(list.as_array().map(Vec::len), Some(N));
    // One anchor for all of them: their common parent.
    assert_eq!(daemon.pinned_links(), vec![kad_tests::cgroup_id(&top.path)]);
    for i in [0, N / 2, N - 1] {
        let cg = top.child(&format!("p{i}"));
        let (server, client) = connect(&env, Some(&cg), Some(&cg), false);
        let want = 100 + (i % 1000) as i64;
        assert_eq!((server.idle, client.idle), (want, want), "policy {i}");
        assert!(server.keepalive && client.keepalive);
    }
    for i in 0..N {
        let reply = request(
            &daemon.socket,
            &serde_json::json!({"cmd": "unset", "cgroup": path(i)}).to_string(),
        );
        assert_eq!(reply["reply"], "done", "unset {i}: {reply}");
    }
    assert_eq!(daemon.list(), serde_json::json!([]));
    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
    assert_eq!(status["map_entries"], 0, "{}", status["map_entries"]);
    assert_eq!(status["attachments"], 0);
    assert!(daemon.pinned_links().is_empty());
}

#[test]
fn the_policy_limit_is_named_when_reached() {
    let env = kad_env!();
    if !kad_tests::host_only("65,536 policies (a test of kad's limit, not of a kernel feature)") {
        return;
    }
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "limit");
    let max = 65_536;
    let set = |i: usize| {
        request(
            &daemon.socket,
            &serde_json::json!({"cmd": "set", "cgroup": top.path.join(format!("p{i}")),
                "policy": {"mode": "on", "idle": 100, "intvl": null, "cnt": null}})
            .to_string(),
        )
    };
    for i in 0..max {
        let reply = set(i);
        assert_eq!(reply["reply"], "done", "policy {i}: {reply}");
    }
    let reply = set(max);
    assert_eq!(reply["reply"], "error", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("at most 65536"), "{message}");
    // A change to a policy that exists is still fine at the limit.
    let reply = request(
        &daemon.socket,
        &serde_json::json!({"cmd": "set", "cgroup": top.path.join("p7"),
            "policy": {"mode": "on", "idle": 200, "intvl": null, "cnt": null}})
        .to_string(),
    );
    assert_eq!(reply["reply"], "done", "{reply}");
}

/// A config over the policy limit is refused by `kad reload` (exit 1, the reason named) and the
/// previous config stays in force in the kernel.
#[test]
fn a_reload_over_the_policy_limit_is_refused_and_the_previous_config_stays() {
    let env = kad_env!();
    if !kad_tests::host_only("65,537 policies (a test of kad's limit, not of a kernel feature)") {
        return;
    }
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "reload-limit");
    let small: String = (0..3)
        .map(|i| {
            format!(
                "[[policy]]\ncgroup = \"{}/p{i}\"\nidle = {}\n",
                top.relative(),
                120 + i
            )
        })
        .collect();
    std::fs::write(&daemon.config, &small).expect("write the config");
    daemon.kad_ok(&["reload"]);
    let big: String = (0..65_537)
        .map(|i| {
            format!(
                "[[policy]]\ncgroup = \"{}/p{i}\"\nidle = 200\n",
                top.relative()
            )
        })
        .collect();
    std::fs::write(&daemon.config, &big).expect("write the config");
    let out = daemon.kad(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(
        err.contains("at most 65536") && err.contains("previous config stays in force"),
        "{err}"
    );
    let list = daemon.list();
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
    // In the kernel: a new connection in p1 has the previous config's value.
    let cg = top.child("p1");
    std::fs::create_dir_all(&cg).expect("mkdir");
    let (server, _) = connect(&env, Some(&cg), Some(&cg), false);
    assert_eq!((server.keepalive, server.idle), (true, 121));
    let cg = top.child("p3");
    std::fs::create_dir_all(&cg).expect("mkdir");
    let (server, _) = connect(&env, Some(&cg), Some(&cg), false);
    assert!(!server.keepalive, "nothing of the refused config");
}
