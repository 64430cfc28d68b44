//! Pod annotations as policies, against the real kernel and real cgroups, driven through the
//! event stream the kube-rs watcher feeds (`kad daemon --pod-events FIFO`, JSON lines): a pod
//! added before its cgroup exists, a namespace default, an annotation edited, a pod deleted, a
//! bad annotation, a full re-list, and a restart while nothing feeds events. The kubelet's
//! cgroup root is a test cgroup, laid out as the systemd driver lays it out.
use std::{ffi::CString, fs, io::Write, path::Path, time::Duration};

use kad_tests::{connect, kad_env, untouched, wait_for, Daemon, TempDir, TestCgroup};

struct Feed {
    fifo: fs::File,
}

impl Feed {
    fn send(&mut self, event: serde_json::Value) {
        let mut line = event.to_string();
        line.push('\n');
        self.fifo
            .write_all(line.as_bytes())
            .expect("write a pod event");
    }
}

/// A FIFO in `dir` for events.
fn fifo_in(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.0.join("events");
    let c_path = CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    path
}

/// A daemon reading pod events from `events`, with the kubelet's cgroup root at `kubelet`
/// laid out by `driver`.
fn pod_daemon(env: &kad_tests::Env, events: &Path, driver: &str, kubelet: &TestCgroup) -> Daemon {
    let args = [
        "--pod-events".to_string(),
        events.display().to_string(),
        "--kubelet-cgroup-driver".into(),
        driver.into(),
        "--kubelet-cgroup-root".into(),
        kubelet.relative(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with(env, &args)
}

/// The writing end of the FIFO the daemon reads.
fn feed(fifo: &Path) -> Feed {
    Feed {
        fifo: fs::OpenOptions::new()
            .write(true)
            .open(fifo)
            .expect("open the FIFO"),
    }
}

fn pod(uid: &str, name: &str, qos: &str, annotation: Option<&str>) -> serde_json::Value {
    serde_json::json!({"event": "pod", "uid": uid, "namespace": "team", "name": name,
        "qos": qos, "annotation": annotation})
}

/// The list's entry for `path`, once the daemon has it as `check` wants (or panics).
fn wait_entry(
    daemon: &Daemon,
    path: &Path,
    check: impl Fn(Option<&serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    let found = wait_for(Duration::from_secs(10), || {
        last = daemon.list();
        let entry = last
            .as_array()
            .and_then(|a| a.iter().find(|e| e["cgroup"] == path.display().to_string()));
        check(entry)
    });
    assert!(found, "{}: {last}\n{}", path.display(), daemon.log());
    last.as_array()
        .and_then(|a| a.iter().find(|e| e["cgroup"] == path.display().to_string()))
        .cloned()
}

#[test]
fn pod_annotations_drive_policies_through_the_event_stream() {
    let env = kad_env!();
    let dir = TempDir::new("pod-events");
    let fifo_path = fifo_in(&dir);
    let kubelet = TestCgroup::new(&env, "kubelet");
    let mut daemon = pod_daemon(&env, &fifo_path, "systemd", &kubelet);
    let mut feed = feed(&fifo_path);
    let a_uid = "0d7e5c3a-1b2c-4d5e-8f90-00000000000a";
    let b_uid = "0d7e5c3a-1b2c-4d5e-8f90-00000000000b";
    let a_path = kubelet.path.join(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d7e5c3a_1b2c_4d5e_8f90_00000000000a.slice",
    );
    let b_path = kubelet
        .path
        .join("kubepods.slice/kubepods-pod0d7e5c3a_1b2c_4d5e_8f90_00000000000b.slice");

    // Pod a, no annotation of its own, in a namespace with a default; its cgroup does not
    // exist yet (the pod object comes before the kubelet makes it).
    feed.send(serde_json::json!({"event": "list_start", "kind": "namespaces"}));
    feed.send(serde_json::json!({"event": "namespace", "name": "team", "annotation": "idle=200"}));
    feed.send(serde_json::json!({"event": "list_done", "kind": "namespaces"}));
    feed.send(pod(a_uid, "a", "BestEffort", None));
    let entry = wait_entry(&daemon, &a_path, |e| e.is_some()).expect("entry");
    assert_eq!(
        (entry["idle"].as_u64(), entry["pod"].as_str()),
        (Some(200), Some("team/a"))
    );
    assert!(!a_path.exists());
    // The kubelet makes the pod's cgroup and a container's: its first connection has it.
    let a_ctr = a_path.join("cri-containerd-1111.scope");
    fs::create_dir_all(&a_ctr).expect("mkdir pod cgroup");
    let (server, client) = connect(&env, Some(&a_ctr), Some(&a_ctr), false);
    assert_eq!((server.keepalive, server.idle), (true, 200));
    assert_eq!((client.keepalive, client.idle), (true, 200));

    // Pod b, guaranteed, with its own annotation.
    feed.send(pod(
        b_uid,
        "b",
        "Guaranteed",
        Some("idle=151,intvl=15,cnt=3"),
    ));
    wait_entry(&daemon, &b_path, |e| e.is_some());
    let b_ctr = b_path.join("cri-containerd-2222.scope");
    fs::create_dir_all(&b_ctr).expect("mkdir pod cgroup");
    let (server, client) = connect(&env, Some(&b_ctr), Some(&b_ctr), false);
    assert_eq!(server.values(), (true, 151, 15, 3));
    assert_eq!(client.values(), (true, 151, 15, 3));
    // The kernel gave the new cgroup its policy inside mkdir (above); the daemon records the
    // cgroup when its inotify event arrives, which may be a moment after the connection.
    let (mut status, mut detail) = (serde_json::Value::Null, serde_json::Value::Null);
    let recorded = wait_for(Duration::from_secs(10), || {
        status = serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
        detail = status["details"]
            .as_array()
            .expect("details")
            .iter()
            .find(|d| d["cgroup"] == b_path.display().to_string())
            .expect("b's detail")
            .clone();
        detail["cgroup_id"].is_u64()
    });
    assert!(recorded, "the daemon records b's cgroup: {detail}");
    assert_eq!(
        (&detail["source"], &detail["pod"]),
        (&"pod".into(), &"team/b".into())
    );
    assert_eq!(status["pods"]["connected"], true, "{status}");
    let text = daemon.kad_ok(&["list"]);
    assert!(text.contains("(pod team/b)"), "{text}");

    // An edit of the annotation changes the policy.
    feed.send(pod(b_uid, "b", "Guaranteed", Some("idle=160")));
    wait_entry(&daemon, &b_path, |e| e.is_some_and(|e| e["idle"] == 160));
    let (server, _) = connect(&env, Some(&b_ctr), Some(&b_ctr), false);
    assert_eq!((server.keepalive, server.idle), (true, 160));

    // A bad annotation: no policy, and `kad status` says why.
    feed.send(pod(
        "0d7e5c3a-1b2c-4d5e-8f90-00000000000c",
        "c",
        "Burstable",
        Some("idle=0"),
    ));
    assert!(wait_for(Duration::from_secs(10), || {
        let status = daemon.kad_ok(&["status", "--json"]);
        status.contains("team/c") && status.contains("between 1 and 32767")
    }));
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(2));

    // Deleting the pod removes its policy.
    feed.send(serde_json::json!({"event": "pod_deleted", "uid": b_uid}));
    wait_entry(&daemon, &b_path, |e| e.is_none());
    let (server, client) = connect(&env, Some(&b_ctr), Some(&b_ctr), false);
    assert_eq!(
        (server.values(), client.values()),
        (untouched(), untouched())
    );

    // The namespace's default goes: so does a's policy. A re-list that names only a, now with
    // an annotation of its own, drops c and gives a its own policy.
    feed.send(serde_json::json!({"event": "namespace", "name": "team", "annotation": null}));
    wait_entry(&daemon, &a_path, |e| e.is_none());
    feed.send(serde_json::json!({"event": "list_start", "kind": "pods"}));
    feed.send(pod(a_uid, "a", "BestEffort", Some("cnt=4")));
    feed.send(serde_json::json!({"event": "list_done", "kind": "pods"}));
    wait_entry(&daemon, &a_path, |e| e.is_some_and(|e| e["cnt"] == 4));
    assert!(wait_for(Duration::from_secs(10), || {
        !daemon.kad_ok(&["status", "--json"]).contains("team/c")
    }));

    // A restart with no watcher connected yet: the pod policies stay known and enforced.
    drop(feed);
    daemon.stop();
    daemon.restart();
    let entry = wait_entry(&daemon, &a_path, |e| e.is_some()).expect("kept");
    assert_eq!(
        (entry["cnt"].as_u64(), entry["pod"].as_str()),
        (Some(4), Some("team/a"))
    );
    let (server, _) = connect(&env, Some(&a_ctr), Some(&a_ctr), false);
    assert_eq!((server.keepalive, server.cnt), (true, 4));
}

/// A line that is not UTF-8 (or not JSON) is refused by name and the stream goes on: the
/// events after it are applied, writers are not blocked, and `kad status` shows the refusal.
#[test]
fn a_bad_pod_event_line_is_refused_and_the_stream_goes_on() {
    let env = kad_env!();
    let dir = TempDir::new("pod-events-bad");
    let fifo_path = fifo_in(&dir);
    let kubelet = TestCgroup::new(&env, "kubelet-bad");
    let daemon = pod_daemon(&env, &fifo_path, "cgroupfs", &kubelet);
    let mut feed = feed(&fifo_path);
    let uid = "0d7e5c3a-1b2c-4d5e-8f90-0000000000d1";
    let path = kubelet.path.join(format!("kubepods/besteffort/pod{uid}"));
    // Invalid UTF-8 with an escape sequence in it, then a line that is not JSON.
    feed.fifo
        .write_all(b"{\"event\":\"pod\",\"name\":\"\xff\xfe\x1b[31mred\"}\nnot json\n")
        .expect("write bad lines");
    feed.send(pod(uid, "after", "BestEffort", Some("idle=177")));
    let entry = wait_entry(&daemon, &path, |e| e.is_some()).expect("entry");
    assert_eq!(entry["idle"].as_u64(), Some(177));
    fs::create_dir_all(&path).expect("mkdir pod cgroup");
    let (server, _) = connect(&env, Some(&path), Some(&path), false);
    assert_eq!((server.keepalive, server.idle), (true, 177));

    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
    assert_eq!(status["pods"]["connected"], true, "{status}");
    let refused = status["pods"]["refused"].as_str().unwrap_or_default();
    assert!(
        refused.contains("line 2") && refused.contains("not json"),
        "{status}"
    );
    let log = daemon.log();
    assert!(
        log.contains("line 1 refused: not UTF-8") && log.contains("\\xff\\xfe\\u{1b}[31mred"),
        "the bad line is named, escaped: {log}"
    );
    assert!(!log.contains('\u{1b}'), "no raw escape in the log");
    let text = daemon.kad_ok(&["status"]);
    assert!(text.contains("last refused event: line 2"), "{text}");
    fs::remove_dir(&path).expect("rmdir pod cgroup");
}

/// A regular file of events is read to its end, and then `kad status` says the stream ended
/// instead of "connected".
#[test]
fn a_pod_events_file_that_ends_is_not_called_connected() {
    let env = kad_env!();
    let dir = TempDir::new("pod-events-file");
    let kubelet = TestCgroup::new(&env, "kubelet-file");
    let uid = "0d7e5c3a-1b2c-4d5e-8f90-0000000000f1";
    let events = dir.0.join("events.jsonl");
    fs::write(
        &events,
        format!("{}\n", pod(uid, "f", "BestEffort", Some("idle=178"))),
    )
    .expect("write the events");
    let daemon = pod_daemon(&env, &events, "cgroupfs", &kubelet);
    let path = kubelet.path.join(format!("kubepods/besteffort/pod{uid}"));
    let entry = wait_entry(&daemon, &path, |e| e.is_some()).expect("entry");
    assert_eq!(entry["idle"].as_u64(), Some(178));
    let mut status = serde_json::Value::Null;
    let ended = wait_for(Duration::from_secs(10), || {
        status = serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status");
        status["pods"]["connected"] == false
    });
    assert!(ended, "{status}");
    let error = status["pods"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("ended"), "{status}");
}
