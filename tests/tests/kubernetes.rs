//! `kad daemon --kubernetes` through its real kube-rs client, against a minimal stand-in for
//! the API server on loopback (no kube-apiserver package is reachable here): list and watch of
//! pods (with the node's field selector) and of namespaces, over plain HTTP. What the daemon
//! makes of the objects is checked on real cgroups and connections; tests/tests/pods.rs drives
//! the same events through a FIFO in more cases.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use kad_tests::{connect, kad_env, wait_for, Daemon, TempDir, TestCgroup};

/// The objects a resource list holds, and the watch connections open on it.
#[derive(Default)]
struct Resource {
    items: Vec<serde_json::Value>,
    watchers: Vec<TcpStream>,
}

#[derive(Default)]
struct FakeApi {
    resources: Mutex<BTreeMap<&'static str, Resource>>,
    /// Every request line, for the assertions on what the client asked.
    requests: Mutex<Vec<String>>,
}

impl FakeApi {
    fn start() -> (Arc<FakeApi>, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let api = Arc::new(FakeApi::default());
        let shared = Arc::clone(&api);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let api = Arc::clone(&shared);
                std::thread::spawn(move || api.serve(stream));
            }
        });
        (api, port)
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            return;
        }
        // The rest of the head: the client sends no body with GET.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        self.requests.lock().unwrap().push(request.clone());
        let target = request.split_whitespace().nth(1).unwrap_or("");
        let kind = if target.starts_with("/api/v1/pods") {
            "pods"
        } else if target.starts_with("/api/v1/namespaces") {
            "namespaces"
        } else {
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        let mut stream = stream;
        let mut resources = self.resources.lock().unwrap();
        let resource = resources.entry(kind).or_default();
        if target.contains("watch=true") {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head.as_bytes()).is_ok() {
                resource.watchers.push(stream);
            }
        } else {
            let list_kind = if kind == "pods" {
                "PodList"
            } else {
                "NamespaceList"
            };
            let body = serde_json::json!({"kind": list_kind, "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"}, "items": resource.items})
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    }

    fn set_items(&self, kind: &'static str, items: Vec<serde_json::Value>) {
        self.resources
            .lock()
            .unwrap()
            .entry(kind)
            .or_default()
            .items = items;
    }

    /// Sends a watch event (ADDED, MODIFIED, DELETED) to the open watches of `kind`.
    fn event(&self, kind: &'static str, kind_type: &str, object: serde_json::Value) {
        let line = serde_json::json!({"type": kind_type, "object": object}).to_string() + "\n";
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        let mut resources = self.resources.lock().unwrap();
        let resource = resources.entry(kind).or_default();
        resource
            .watchers
            .retain_mut(|w| w.write_all(chunk.as_bytes()).is_ok());
    }

    fn watching(&self, kind: &'static str) -> bool {
        self.resources
            .lock()
            .unwrap()
            .get(kind)
            .is_some_and(|r| !r.watchers.is_empty())
    }
}

fn pod(uid: &str, name: &str, annotation: Option<&str>) -> serde_json::Value {
    let mut meta = serde_json::json!({"name": name, "namespace": "team", "uid": uid,
        "resourceVersion": "2"});
    if let Some(value) = annotation {
        meta["annotations"] = serde_json::json!({"kad.dev/keepalive": value});
    }
    serde_json::json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"qosClass": "BestEffort"}})
}

fn kubeconfig(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         users:\n- name: u\n  user:\n    token: test\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

#[test]
fn the_watcher_turns_the_nodes_pods_into_policies() {
    let env = kad_env!();
    let (api, port) = FakeApi::start();
    let uid = "5a1b2c3d-0000-4000-8000-00000000beef";
    api.set_items(
        "namespaces",
        vec![serde_json::json!({"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": "team", "uid": "ns-1", "resourceVersion": "1",
                "annotations": {"kad.dev/keepalive": "idle=300"}}})],
    );
    api.set_items(
        "pods",
        vec![pod(uid, "web", Some("idle=151,intvl=15,cnt=3"))],
    );
    let dir = TempDir::new("kube");
    let config = kubeconfig(&dir.0, port);
    let kubelet = TestCgroup::new(&env, "kubelet");
    let root = kubelet.relative();
    let kubeconfig_env = format!("KUBECONFIG={}", config.display());
    let daemon = Daemon::start_wrapped(
        &env,
        &["env", &kubeconfig_env],
        &[
            "--kubernetes",
            "--node-name",
            "node-1",
            "--kubelet-cgroup-root",
            &root,
        ],
    );
    let path = kubelet.path.join(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5a1b2c3d_0000_4000_8000_00000000beef.slice",
    );
    let entry_of = |daemon: &Daemon| {
        daemon.list().as_array().and_then(|a| {
            a.iter()
                .find(|e| e["cgroup"] == path.display().to_string())
                .cloned()
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), || entry_of(&daemon)
            .is_some_and(|e| e["idle"] == 151 && e["pod"] == "team/web")),
        "{}\n{}",
        daemon.list(),
        daemon.log()
    );
    // Only this node's pods were asked for.
    let requests = api.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{requests:?}"
    );
    let ctr = path.join("cri-containerd-abc.scope");
    std::fs::create_dir_all(&ctr).expect("mkdir pod cgroup");
    let (server, client) = connect(&env, Some(&ctr), Some(&ctr), false);
    assert_eq!(server.values(), (true, 151, 15, 3));
    assert_eq!(client.values(), (true, 151, 15, 3));

    // Watch events: the annotation removed (the namespace's default applies), then the pod
    // deleted.
    assert!(wait_for(Duration::from_secs(10), || api.watching("pods")));
    api.event("pods", "MODIFIED", pod(uid, "web", None));
    assert!(
        wait_for(Duration::from_secs(10), || entry_of(&daemon)
            .is_some_and(|e| e["idle"] == 300)),
        "{}",
        daemon.list()
    );
    api.event("pods", "DELETED", pod(uid, "web", None));
    assert!(
        wait_for(Duration::from_secs(10), || entry_of(&daemon).is_none()),
        "{}",
        daemon.list()
    );
    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
    assert_eq!(status["pods"]["connected"], true, "{status}");
    assert_eq!(status["pods"]["source"], "kubernetes (node node-1)");
}

#[test]
fn an_unreachable_api_server_is_reported_and_retried() {
    let env = kad_env!();
    // A port nothing listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = TempDir::new("kube-down");
    let config = kubeconfig(&dir.0, port);
    let kubeconfig_env = format!("KUBECONFIG={}", config.display());
    let daemon = Daemon::start_wrapped(
        &env,
        &["env", &kubeconfig_env],
        &["--kubernetes", "--node-name", "node-1"],
    );
    let mut status = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(20), || {
            status =
                serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
            status["pods"]["connected"] == false
                && status["pods"]["error"]
                    .as_str()
                    .is_some_and(|e| e != "not connected yet")
        }),
        "{status}"
    );
    let text = daemon.kad_ok(&["status"]);
    assert!(text.contains("NOT connected"), "{text}");
    // The daemon goes on serving.
    assert_eq!(daemon.list(), serde_json::json!([]));
}
