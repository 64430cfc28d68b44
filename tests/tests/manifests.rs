//! What dist/ ships for containers and Kubernetes, checked with real tools: the manifests with
//! kubernetes-validate (PyPI; `cargo xtask test` installs it in a venv) against the schemas of
//! Kubernetes 1.28 and of its newest release, strictly (an unknown field is an error).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

fn validator() -> Option<PathBuf> {
    let path = std::env::var_os("KAD_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/tools/kubernetes-validate/bin/kubernetes-validate")
        });
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "{} is missing (cargo xtask test installs it)",
        path.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
    eprintln!("SKIPPED: {reason}");
    None
}

#[test]
fn kubernetes_manifests_are_valid() {
    let Some(validate) = validator() else {
        return;
    };
    let manifest = dist().join("kubernetes/kad.yaml");
    for version in ["1.28.0", "1.37.0"] {
        let out = Command::new(&validate)
            .args(["--strict", "-k", version])
            .arg(&manifest)
            .output()
            .expect("run kubernetes-validate");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{version}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Every object was checked, none skipped for want of a schema.
        for kind in [
            "namespace/kad-system",
            "serviceaccount/kad",
            "clusterrole/kad",
            "clusterrolebinding/kad",
            "configmap/kad-config",
            "daemonset/kad",
        ] {
            assert!(
                stdout.contains(&format!("passed for resource {kind}")),
                "{version}: {stdout}"
            );
        }
    }
    // The validator does fail: an unknown field in a copy.
    let text = std::fs::read_to_string(&manifest).expect("read kad.yaml");
    let bad = std::env::temp_dir().join(format!("kad-manifest-{}.yaml", std::process::id()));
    std::fs::write(&bad, text.replace("hostPID: true", "hostPid: true")).expect("write copy");
    let out = Command::new(&validate)
        .args(["--strict", "-k", "1.28.0"])
        .arg(&bad)
        .output()
        .expect("run kubernetes-validate");
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success());
}

/// The DaemonSet keeps exactly the capabilities of dist/kad.service, and reads only pods and
/// namespaces.
#[test]
fn the_daemonset_has_the_units_capabilities_and_read_only_rbac() {
    let unit = std::fs::read_to_string(dist().join("kad.service")).expect("read kad.service");
    let mut from_unit: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect();
    from_unit.sort();
    let manifest =
        std::fs::read_to_string(dist().join("kubernetes/kad.yaml")).expect("read kad.yaml");
    let added: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("add: "))
        .collect();
    assert_eq!(added.len(), 1, "one container adds capabilities");
    let mut from_manifest: Vec<String> =
        serde_json::from_str(added[0]).expect("add: is a flow list of strings");
    from_manifest.sort();
    assert_eq!(from_manifest, from_unit);
    assert!(manifest.contains("drop: [\"ALL\"]"));
    assert!(manifest.contains("privileged: false"));
    let verbs: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("verbs: "))
        .collect();
    assert_eq!(verbs, [r#"["get", "list", "watch"]"#]);
    assert!(manifest.contains(r#"resources: ["pods", "namespaces"]"#));
}

/// The hooks.d file: version 1.0.0, run for the kad.dev/keepalive annotation only, at
/// createRuntime and poststop. (tests/tests/containers.rs runs it under podman.)
#[test]
fn the_oci_hook_file_matches_the_annotation() {
    let text = std::fs::read_to_string(dist().join("oci-hooks.d/kad.json")).expect("read kad.json");
    let hook: serde_json::Value = serde_json::from_str(&text).expect("kad.json is JSON");
    assert_eq!(hook["version"], "1.0.0");
    assert_eq!(hook["hook"]["path"], "/usr/bin/kad");
    assert_eq!(hook["hook"]["args"], serde_json::json!(["kad", "oci-hook"]));
    assert_eq!(
        hook["stages"],
        serde_json::json!(["createRuntime", "poststop"])
    );
    assert_eq!(
        hook["when"]["annotations"],
        serde_json::json!({"^kad\\.dev/keepalive$": ".*"})
    );
}
