//! `--container ID`: a running container's cgroup found from its id or a unique prefix, on
//! cgroup trees laid out as podman, docker, containerd and CRI-O lay them out with either
//! cgroup driver (made under a test cgroup, which is below the cgroup2 root the CLI searches).
//! A real podman container is in containers.rs.
use std::{fs, io::Read, path::PathBuf};

use kad_tests::{kad_env, Daemon, TestCgroup};

/// A fresh 64-hex container id.
fn random_id() -> String {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cgroup a runtime makes for container `id`, and the monitor cgroups beside it, relative
/// to the base cgroup.
fn layouts(id: &str, pod: &str) -> Vec<(&'static str, String, Vec<String>)> {
    let pod_ = pod.replace('-', "_");
    vec![
        (
            "podman cgroupfs",
            format!("libpod_parent/libpod-{id}"),
            vec!["libpod_parent/conmon".into()],
        ),
        (
            "podman systemd",
            format!("machine.slice/libpod-{id}.scope"),
            vec![format!("machine.slice/libpod-conmon-{id}.scope")],
        ),
        ("docker cgroupfs", format!("docker/{id}"), vec![]),
        (
            "docker systemd",
            format!("system.slice/docker-{id}.scope"),
            vec!["system.slice/docker.service".into()],
        ),
        (
            "containerd cgroupfs",
            format!("kubepods/besteffort/pod{pod}/{id}"),
            vec![],
        ),
        (
            "containerd systemd",
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice/cri-containerd-{id}.scope"
            ),
            vec![],
        ),
        (
            "CRI-O cgroupfs",
            format!("kubepods/burstable/pod{pod}/crio-{id}"),
            vec![],
        ),
        (
            "CRI-O systemd",
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/crio-{id}.scope"
            ),
            vec![format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/crio-conmon-{id}.scope"
            )],
        ),
    ]
}

#[test]
fn container_ids_find_their_cgroup_for_each_runtime_and_driver() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let base = TestCgroup::new(&env, "runtimes");
    let mut made: Vec<(&str, String, PathBuf)> = Vec::new();
    for layout in 0..8 {
        let id = random_id();
        let pod = "0d7e5c3a-1b2c-4d5e-8f90-123456789abc";
        let (runtime, path, beside) = layouts(&id, pod).swap_remove(layout);
        for dir in beside.iter().chain([&path]) {
            base.child(dir);
        }
        made.push((runtime, id, base.path.join(path)));
    }
    for (runtime, id, path) in &made {
        // A 12-character prefix, as `podman ps` and `docker ps` show it.
        let out = daemon.kad(&["set", "--container", &id[..12], "--idle", "77"]);
        assert!(
            out.status.success(),
            "{runtime}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim(),
            format!("{}: on idle=77 intvl=default cnt=default", path.display()),
            "{runtime}"
        );
        let stats = daemon.kad_ok(&["stats", "--container", id, "--json"]);
        let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats --json");
        assert_eq!(
            stats["cgroups"]
                .as_array()
                .map(|rows| rows.iter().map(|r| r["cgroup"].clone()).collect::<Vec<_>>()),
            Some(vec![path.display().to_string().into()]),
            "{runtime}: {stats}"
        );
        let inspect =
            daemon.kad_ok(&["inspect", "--container", &id.to_uppercase()[..20], "--json"]);
        assert_eq!(inspect.trim(), "[]", "{runtime}: no process, no connection");
        daemon.kad_ok(&["unset", "--container", id]);
    }
    assert_eq!(daemon.list(), serde_json::json!([]));

    // Errors: one line, naming the problem, and nothing changes.
    let (_, first, _) = &made[0];
    let twin = format!("{}{}", &first[..8], &random_id()[8..]);
    base.child(&format!("docker/{twin}"));
    for (id, expected) in [
        (first[..8].to_string(), "matches 2 containers"),
        ("0000000000000000000000".to_string(), "no running container"),
        ("my-container".to_string(), "not its name"),
    ] {
        let out = daemon.kad(&["set", "--container", &id, "--idle", "5"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{id}");
        assert!(stderr.contains(expected), "{id}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    assert_eq!(daemon.list(), serde_json::json!([]));
}

/// A container that is gone (its cgroup removed, as a runtime does when it stops) is found by
/// the id its policy was set with: `kad list` names it, `inspect` and `stats` say it has
/// nothing running, `unset --container` removes its policy; an id no policy was set for says
/// to unset by path.
#[test]
fn a_gone_containers_policy_is_found_by_its_id() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let base = TestCgroup::new(&env, "gone");
    let id = random_id();
    let path = base.child(&format!("libpod_parent/libpod-{id}"));
    daemon.kad_ok(&["set", "--container", &id[..12], "--idle", "78"]);
    let list = daemon.list();
    assert_eq!(list[0]["container"], id.as_str(), "{list}");
    let table = daemon.kad_ok(&["list"]);
    assert!(
        table.contains(&format!("(container {})", &id[..12])),
        "{table}"
    );
    let status = daemon.kad_ok(&["status"]);
    assert!(
        status.contains(&format!("(from container {})", &id[..12])),
        "{status}"
    );

    fs::remove_dir(&path).expect("rmdir the container's cgroup");
    let list = daemon.list();
    assert_eq!(
        (&list[0]["cgroup"], &list[0]["waiting"]),
        (&path.display().to_string().into(), &true.into()),
        "{list}"
    );
    let out = daemon.kad(&["inspect", "--container", &id[..12]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not running"), "{stderr}");
    let stats = daemon.kad_ok(&["stats", "--container", &id[..12], "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats --json");
    assert_eq!(stats["cgroups"], serde_json::json!([]), "{stats}");
    let out = daemon.kad_ok(&["unset", "--container", &id[..12]]);
    assert_eq!(out.trim(), format!("{}: policy removed", path.display()));
    assert_eq!(daemon.list(), serde_json::json!([]));

    let out = daemon.kad(&["unset", "--container", &id[..12]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no running container") && stderr.contains("kad unset --cgroup PATH"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
