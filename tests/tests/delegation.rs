//! Users manage keepalive in the cgroups delegated to them, as libkeepalive's users did with
//! `KEEPALIVE=off`: a test cgroup is given to user nobody (65534) the way systemd's
//! `Delegate=` gives one (the directory and its `cgroup.procs`), and `kad` runs as that user.
use std::{
    fs,
    os::unix::{fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use kad_tests::{kad_env, untouched, Daemon, Env, Pair, Process, TempDir, TestCgroup, Values};

const USER: u32 = 65534;

/// kad and the test peer, copied where user nobody can run them.
struct UserBin {
    _dir: TempDir,
    kad: PathBuf,
    peer: PathBuf,
}

impl UserBin {
    fn new(env: &Env) -> UserBin {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("user-bin");
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).expect("chmod");
        let kad = dir.0.join("kad");
        let peer = dir.0.join("kad-test-peer");
        fs::copy(&env.kad, &kad).expect("copy kad");
        fs::copy(&env.peer, &peer).expect("copy the peer");
        UserBin {
            _dir: dir,
            kad,
            peer,
        }
    }

    /// `kad ARGS` as the user, against `daemon`.
    fn kad(&self, daemon: &Daemon, args: &[&str]) -> Output {
        Command::new(&self.kad)
            .args(args)
            .env("KAD_SOCKET", &daemon.socket)
            .current_dir("/")
            .uid(USER)
            .gid(USER)
            .stdin(Stdio::null())
            .output()
            .expect("run kad as the user")
    }
}

fn delegate(path: &Path) {
    chown(path, Some(USER), Some(USER)).expect("chown the cgroup");
    chown(path.join("cgroup.procs"), Some(USER), Some(USER)).expect("chown cgroup.procs");
}

fn refused(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(expected),
        "expected a refusal with {expected:?}: {stderr}"
    );
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_user_opts_out_in_their_delegated_cgroup_and_nowhere_else() {
    let env = kad_env!();
    let daemon = Daemon::start_with(&env, &["--user-policy-limit", "2"]);
    let cg = TestCgroup::new(&env, "deleg");
    let user = cg.child("user");
    delegate(&user);
    let bin = UserBin::new(&env);
    let rel = |child: &str| format!("{}/{child}", cg.relative());
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "200",
        "--intvl",
        "20",
    ]);
    let root_values: Values = (true, 200, 20, kad_tests::sysctl("tcp_keepalive_probes"));

    // The user's own opt-out, below root's policy.
    succeeded(&bin.kad(&daemon, &["set", "--cgroup", &rel("user/app"), "--off"]));
    let (_pair, r) = Pair::open(&env, &cg.child("user/app"), None);
    assert_eq!(r.client.values(), untouched(), "opted out");
    let (_pair, r) = Pair::open(&env, &user, None);
    assert_eq!(r.client.values(), root_values, "root's policy around it");

    // Elsewhere: refused, with the reason.
    refused(
        &bin.kad(&daemon, &["set", "--cgroup", &cg.relative(), "--off"]),
        "not in a cgroup delegated to uid 65534",
    );
    refused(
        &bin.kad(&daemon, &["unset", "--cgroup", &cg.relative()]),
        "set no policy",
    );
    refused(
        &bin.kad(&daemon, &["set", "--host", "--idle", "10"]),
        "only root may change the host policy",
    );
    refused(
        &bin.kad(
            &daemon,
            &["set", "--cgroup", &rel("user/x"), "--idle", "9", "--lock"],
        ),
        "only root may set a locked policy",
    );

    // The per-user limit, named.
    succeeded(&bin.kad(
        &daemon,
        &["set", "--cgroup", &rel("user/b"), "--idle", "50"],
    ));
    refused(
        &bin.kad(
            &daemon,
            &["set", "--cgroup", &rel("user/c"), "--idle", "50"],
        ),
        "--user-policy-limit 2",
    );
    succeeded(&bin.kad(&daemon, &["unset", "--cgroup", &rel("user/b")]));

    // Root locks the subtree: no opt-out below it any more.
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "200",
        "--intvl",
        "20",
        "--lock",
    ]);
    refused(
        &bin.kad(&daemon, &["set", "--cgroup", &rel("user/d"), "--off"]),
        "locked by root",
    );
    let list = daemon.list();
    let mine: Vec<&serde_json::Value> = list
        .as_array()
        .expect("an array")
        .iter()
        .filter(|e| {
            e["cgroup"]
                .as_str()
                .is_some_and(|c| c.ends_with("/user/app"))
        })
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "the user's policy stays until they remove it: {list}"
    );
    succeeded(&bin.kad(&daemon, &["unset", "--cgroup", &rel("user/app")]));
}

#[test]
fn keepalive_off_kad_exec_works_for_a_user_in_a_delegated_cgroup() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "deleg-exec");
    let user = cg.child("user");
    delegate(&user);
    let bin = UserBin::new(&env);
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "210"]);

    let run = |keepalive: Option<&str>, cgroup: &Path| -> Process {
        let mut command = Command::new(&bin.kad);
        command
            .args(["exec", "--"])
            .arg(&bin.peer)
            .args(["pair", "127.0.0.1:0"])
            .env("KAD_SOCKET", &daemon.socket)
            .current_dir("/")
            .uid(USER)
            .gid(USER);
        if let Some(value) = keepalive {
            command.env("KEEPALIVE", value);
        }
        Process::spawn(command, Some(cgroup))
    };
    let mut off = run(Some("off"), &user);
    let line = off.line();
    let report: kad_tests::PairReport =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(
        report.client.values(),
        untouched(),
        "KEEPALIVE=off as the user"
    );
    assert_eq!(report.server.values(), untouched());
    drop(off);

    // Outside a delegated cgroup the error says why and what works.
    let mut command = Command::new(&bin.kad);
    let out = command
        .args(["exec", "--", "true"])
        .env("KAD_SOCKET", &daemon.socket)
        .env("KEEPALIVE", "off")
        .current_dir("/")
        .uid(USER)
        .gid(USER)
        .stdin(Stdio::null());
    let _procs = kad_tests::in_cgroup(out, &cg.path);
    let out = out.output().expect("run kad exec");
    refused(&out, "systemd-run --user --scope");
}

/// Rootless podman runs the OCI hook as the user: the hook's relative path is resolved below
/// the daemon's root and checked for delegation there; the policy is the user's, recorded with
/// the container, kept at a stop while the user's bundle exists, and removed with it.
#[test]
fn rootless_podmans_hook_keeps_the_users_container_policy() {
    use std::io::Write as _;
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "deleg-hook");
    let user = cg.child("user");
    delegate(&user);
    let bin = UserBin::new(&env);
    let dir = TempDir::new("deleg-hook");
    let give = |path: &Path| chown(path, Some(USER), Some(USER)).expect("chown");
    give(&dir.0);
    let records = dir.0.join("records");
    fs::create_dir(&records).expect("mkdir records");
    give(&records);
    // The hook as podman runs it: the container's state on stdin, as the user.
    let hook = |id: &str, bundle: &Path, stage: &str| -> Output {
        let state = serde_json::json!({
            "ociVersion": "1.0.2",
            "id": id,
            "status": if stage == "poststop" { "stopped" } else { "created" },
            "bundle": bundle,
            "annotations": {"kad.dev/keepalive": "idle=151,intvl=15,cnt=3"},
        });
        let mut child = Command::new(&bin.kad)
            .args(["oci-hook", stage, "--run-dir"])
            .arg(&records)
            .env("KAD_SOCKET", &daemon.socket)
            .current_dir("/")
            .uid(USER)
            .gid(USER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the hook as the user");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(state.to_string().as_bytes())
            .expect("write the state");
        child.wait_with_output().expect("the hook's output")
    };
    // A bundle of the user's, whose config names the container's cgroup.
    let bundle = |name: &str, cgroups_path: &str| -> PathBuf {
        let bundle = dir.0.join(name);
        fs::create_dir(&bundle).expect("mkdir bundle");
        let config = bundle.join("config.json");
        let text = serde_json::json!({"linux": {"cgroupsPath": cgroups_path}}).to_string();
        fs::write(&config, text).expect("write config.json");
        give(&bundle);
        give(&config);
        bundle
    };

    // Outside the user's cgroup: refused, and the container does not start.
    let elsewhere = "ab".repeat(32);
    let out = hook(
        &elsewhere,
        &bundle(
            "elsewhere",
            &format!("/{}/libpod-{elsewhere}", cg.relative()),
        ),
        "createRuntime",
    );
    refused(&out, "not in a cgroup delegated to uid 65534");

    // In it (the cgroup made by the user's runtime, so theirs): the user's policy.
    let id = "cd".repeat(32);
    let container_cg = user.join(format!("libpod-{id}"));
    fs::create_dir(&container_cg).expect("mkdir the container's cgroup");
    delegate(&container_cg);
    let users_bundle = bundle("users", &format!("/{}/user/libpod-{id}", cg.relative()));
    succeeded(&hook(&id, &users_bundle, "createRuntime"));
    let entry = |list: &serde_json::Value| {
        list.as_array()
            .expect("an array")
            .iter()
            .find(|e| e["container"] == id.as_str())
            .cloned()
    };
    let list = daemon.list();
    let found = entry(&list).unwrap_or_else(|| panic!("no policy for the container: {list}"));
    assert_eq!(found["cgroup"], container_cg.display().to_string());
    assert_eq!(found["idle"], 151);
    let saved = kad_tests::saved_table(&daemon.state_dir);
    let saved = saved
        .as_array()
        .expect("an array")
        .iter()
        .find(|e| e["cgroup"] == container_cg.display().to_string())
        .unwrap_or_else(|| panic!("not saved: {saved}"));
    assert_eq!(
        (&saved["uid"], &saved["container"]),
        (&USER.into(), &id.as_str().into()),
        "saved as the user's, with the container: {saved}"
    );

    // Stopped: kept while the user's bundle exists; then removed with it.
    fs::remove_dir(&container_cg).expect("rmdir the container's cgroup");
    let out = hook(&id, &users_bundle, "poststop");
    succeeded(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("its policy stays"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let list = daemon.list();
    assert_eq!(
        entry(&list).map(|e| e["stopped"].clone()),
        Some(true.into()),
        "{list}"
    );
    fs::remove_dir_all(&users_bundle).expect("remove the bundle");
    assert!(
        kad_tests::wait_for(std::time::Duration::from_secs(10), || entry(&daemon.list())
            .is_none()),
        "the policy stayed after its bundle went: {}",
        daemon.list()
    );
}
