//! `cargo xtask build|run|dist|test|test-kernels|test-system|lint|setup|bench`: installs what is
//! missing, builds, packages, tests, measures.
mod bench;
mod dist;
mod kernels;
mod setup;
mod system;
mod test_result;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Set up, build and test kad")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install or check the toolchain pieces, packages and the bpffs mount.
    Setup,
    /// Set up, then build the static kad (target/x86_64-unknown-linux-musl/release/kad).
    Build,
    /// Set up, build, and write target/dist/: the .deb, a tarball, the image (an OCI archive),
    /// SHA256SUMS.
    Dist,
    /// Set up, build, and run `kad daemon` in the foreground (extra arguments go to it).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, check formatting and lints, write target/dist/, then run every test.
    Test,
    /// Set up, build, and run the integration tests inside other kernels booted under QEMU.
    TestKernels {
        /// Kernel series (Debian's newest of each); default: 5.10 6.1 6.12.
        versions: Vec<String>,
    },
    /// Install kad's .deb on a real Debian 12 systemd host under QEMU and run the scenarios.
    TestSystem {
        /// The package to test; default: the newest target/dist/kad_*_amd64.deb.
        #[arg(long)]
        deb: Option<PathBuf>,
        /// Only build (or find in the cache) the image.
        #[arg(long)]
        image_only: bool,
    },
    /// rustfmt and clippy (-D warnings) on the workspace and, on its own, the eBPF crate.
    Lint,
    /// Set up, build, and measure what kad costs per connection (a ratio, in one run).
    Bench {
        /// Only part 1 (cost per socket against the C programs): quick, for working on the
        /// eBPF program.
        #[arg(long, conflicts_with_all = ["node", "docker_only", "control_only"])]
        floor_only: bool,
        /// Only part 4 (a node with 250 pods, their connections, pod churn): heavy, a few
        /// minutes.
        #[arg(long, conflicts_with_all = ["docker_only", "control_only"])]
        node: bool,
        /// Only part 5 (Docker: 100 labelled containers, each first connection checked).
        #[arg(long, conflicts_with = "control_only")]
        docker_only: bool,
        /// Only part 6 (root's `kad set` while another user floods the control socket).
        #[arg(long)]
        control_only: bool,
    },
    /// The bench's own connection loop, run inside a measured cgroup (internal).
    #[command(hide = true)]
    BenchWorker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::all(setup::Purpose::Build),
        Task::Build => {
            setup::all(setup::Purpose::Build)?;
            build(&root)
        }
        Task::Run { args } => {
            setup::all(setup::Purpose::Build)?;
            build(&root)?;
            let kad = dist::kad_bin(&root);
            eprintln!(
                "xtask: starting {} daemon {}",
                kad.display(),
                args.join(" ")
            );
            run(Command::new(kad).arg("daemon").args(args))
        }
        Task::Dist => {
            setup::all(setup::Purpose::Dist)?;
            build(&root)?;
            dist::run_dist(&root)
        }
        Task::Test => {
            setup::all(setup::Purpose::Test)?;
            build(&root)?;
            lint(&root)?;
            // The package and the image are made, and tested, like the binary
            // (tests/tests/package.rs, tests/tests/image.rs).
            dist::run_dist(&root)?;
            let kad = dist::kad_bin(&root);
            run_tests(
                cargo(&root)
                    .args([
                        "test",
                        "--release",
                        "--workspace",
                        "--exclude",
                        "keepalive-ebpf",
                    ])
                    .env("KAD_BIN", &kad)
                    .env("KAD_DIST", dist::dist_dir(&root))
                    .env("KAD_KUBERNETES_VALIDATE", setup::kubernetes_validate_bin()),
            )
        }
        Task::TestKernels { versions } => {
            setup::all(setup::Purpose::Test)?;
            kernels::run_matrix(&root, &versions)
        }
        Task::TestSystem { deb, image_only } => {
            system::run(&root, &system::Options { deb, image_only })
        }
        Task::Lint => lint(&root),
        Task::Bench {
            floor_only,
            node,
            docker_only,
            control_only,
        } => {
            setup::all(setup::Purpose::Test)?;
            build(&root)?;
            let parts = match (floor_only, node, docker_only, control_only) {
                (true, ..) => bench::Parts::Floor,
                (_, true, ..) => bench::Parts::Node,
                (_, _, true, _) => bench::Parts::Docker,
                (.., true) => bench::Parts::Control,
                _ => bench::Parts::All,
            };
            bench::run(&root, parts)
        }
        Task::BenchWorker { args } => bench::worker(&args),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root);
    command
}

/// The one build of kad: static, for the musl target (target/x86_64-unknown-linux-musl/
/// release/kad), which the tests, the package and the image all use. The test peer and the
/// tests are built for the host.
fn build(root: &Path) -> Result<()> {
    run(cargo(root).args([
        "build",
        "--release",
        "--package",
        "keepalive-daemon",
        "--bin",
        "kad",
        "--target",
        setup::MUSL_TARGET,
    ]))?;
    run(cargo(root).args(["build", "--release", "--package", "kad-tests"]))
}

fn lint(root: &Path) -> Result<()> {
    run(cargo(root).args(["fmt", "--all", "--", "--check"]))?;
    run(cargo(root).args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "keepalive-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate on its own, for its real target: with the workspace, feature unification
    // pulls std into it.
    run(Command::new("rustup")
        .current_dir(root.join("keepalive-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf-lint"))
        .args(["--", "-D", "warnings"]))
}

/// Runs cargo test, passing its output through, and closes with one line that adds up every
/// test binary's result (the last binary's own line is often a doc-test run with no tests).
fn run_tests(command: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(counts) = test_result::parse(&line) {
            passed += counts.passed;
            failed += counts.failed;
            ignored += counts.ignored;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed, 0 skipped");
    if ignored > 0 {
        // #[ignore]d: they attach to the cgroup2 root, which only a VM of the matrix may do.
        println!(
            "not run on this host: {ignored} tests that attach to the cgroup2 root (they run in \
             cargo xtask test-kernels)"
        );
    }
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command, failing with its description if it does not succeed.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
