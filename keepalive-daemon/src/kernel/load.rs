//! Loading kad's programs: the object embedded at build time, the kernel struct offsets it
//! needs (from BTF), and which of its programs this kernel can run ([`Features`]). The
//! tracepoint programs are attached and pinned here; the cgroup programs are attached to
//! anchors (`anchors.rs`).
use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::{
    programs::{BtfTracePoint, CgroupSockopt, Iter, ProgramFd, SockOps},
    Btf, Ebpf, EbpfLoader,
};
use keepalive_common::{
    KernelOffsets, COUNTS_MAP, HZ_MAP, LISTENERS_MAP, MARKS_MAP, OFFSETS_CGROUP, OFFSETS_GLOBAL,
    OFFSETS_KILLS, PATHS_MAP, POLICIES_MAP,
};
use tracing::warn;

use super::{
    bpffs::{replace_pin, TRACING_DIR},
    bpfsys::{self, CgroupHook},
    error::{brief, load_error},
    killlog::KillLog,
    Features, KernelError,
};

/// The programs embedded at build time (see build.rs).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kad-sockops"));

/// What loading gave: the object (its maps still to be taken), the cgroup programs to attach,
/// the links of the others, and what this kernel can do.
pub(super) struct Loaded {
    pub ebpf: Ebpf,
    pub programs: HashMap<CgroupHook, ProgramFd>,
    pub iter_link: Option<OwnedFd>,
    /// Tracepoint links, by pin name; the pins keep them after the daemon exits.
    pub tracing: Vec<OwnedFd>,
    pub features: Features,
    /// The tag of the sock_ops program (a hash of its instructions).
    pub tag: String,
    pub kill_log: Option<aya_log::EbpfLogger<KillLog>>,
}

/// Loads the programs, with the pinned maps of `dir` reused where they exist.
pub(super) fn load(dir: &Path) -> Result<Loaded, KernelError> {
    let (offsets, missing) = super::btf::kernel_offsets().unwrap_or_else(|e| {
        (
            KernelOffsets::default(),
            vec![format!("no kernel BTF: {e}")],
        )
    });
    for reason in &missing {
        warn!("{reason}");
    }
    let btf = Btf::from_sys_fs().ok();
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .map_pin_path(POLICIES_MAP, dir.join(POLICIES_MAP))
        .map_pin_path(PATHS_MAP, dir.join(PATHS_MAP))
        .map_pin_path(COUNTS_MAP, dir.join(COUNTS_MAP))
        .map_pin_path(MARKS_MAP, dir.join(MARKS_MAP))
        .map_pin_path(LISTENERS_MAP, dir.join(LISTENERS_MAP))
        .map_pin_path(HZ_MAP, dir.join(HZ_MAP))
        .override_global(OFFSETS_GLOBAL, &offsets, true)
        .load(PROGRAM)
        .map_err(|e| load_error("kad", &e))?;

    let mut programs = HashMap::new();
    let sock_ops: &mut SockOps = program(&mut ebpf, "kad_sockops")?;
    sock_ops.load().map_err(|e| load_error("sock_ops", &e))?;
    programs.insert(CgroupHook::SockOps, prog_fd(sock_ops.fd(), "sock_ops")?);
    let tag = bpfsys::prog_tag_of(programs[&CgroupHook::SockOps].as_fd())
        .unwrap_or_else(|_| "unknown".into());

    let setsockopt = (|| {
        let p: &mut CgroupSockopt = program(&mut ebpf, "kad_setsockopt")?;
        p.load().map_err(|e| load_error("setsockopt", &e))?;
        prog_fd(p.fd(), "setsockopt")
    })();
    let setsockopt = match setsockopt {
        Ok(fd) => {
            programs.insert(CgroupHook::SetSockopt, fd);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };

    let need_cgroup = |what: &str| -> Result<(), String> {
        if offsets.valid & OFFSETS_CGROUP == 0 {
            return Err(format!("{what}: the kernel's BTF lacks the cgroup fields"));
        }
        Ok(())
    };
    let (iter_link, existing) = match need_cgroup("existing connections").and_then(|()| {
        let btf = btf.as_ref().ok_or("no kernel BTF")?;
        let p: &mut Iter = program(&mut ebpf, "kad_iter_tcp").map_err(|e| e.to_string())?;
        p.load("tcp", btf)
            .map_err(|e| load_error("iter/tcp", &e).to_string())?;
        let fd = p.fd().map_err(|e| e.to_string())?;
        bpfsys::link_iter(fd.as_fd()).map_err(|e| format!("iter/tcp link: {e}"))
    }) {
        Ok(link) => (Some(link), Ok(())),
        Err(e) => (None, Err(e)),
    };

    let mut tracing = Vec::new();
    let mut attach_tp = |name: &'static str, function: &str, pin: &str| {
        let btf = btf.as_ref().ok_or("no kernel BTF")?;
        let p: &mut BtfTracePoint = program(&mut ebpf, name).map_err(|e| e.to_string())?;
        p.load(function, btf)
            .map_err(|e| load_error(name, &e).to_string())?;
        let fd = p.fd().map_err(|e| e.to_string())?;
        let link = bpfsys::link_raw_tracepoint(fd.as_fd())
            .map_err(|e| format!("tp_btf/{function}: {e}"))?;
        replace_pin(&link, &dir.join(TRACING_DIR).join(pin))
            .map_err(|e| format!("pin tp_btf/{function}: {e}"))?;
        tracing.push(link);
        Ok::<(), String>(())
    };
    let mkdir = need_cgroup("new cgroups")
        .and_then(|()| attach_tp("kad_mkdir", "cgroup_mkdir", "mkdir"))
        .and_then(|()| attach_tp("kad_rmdir", "cgroup_rmdir", "rmdir"));
    let kills = if offsets.valid & OFFSETS_KILLS == 0 {
        Err("the kernel's BTF lacks the socket fields".to_string())
    } else {
        attach_tp("kad_error_report", "inet_sk_error_report", "error_report")
    };
    let kill_log = if kills.is_ok() {
        aya_log::EbpfLogger::init_with_logger(&mut ebpf, KillLog::default())
            .map_err(|e| warn!("keepalive kill events will not be logged: {e}"))
            .ok()
    } else {
        None
    };
    let features = Features {
        existing: existing.map_err(|e| brief("existing connections", "Linux 5.15", &e)),
        mkdir: mkdir.map_err(|e| brief("new cgroups", "kernel BTF, Linux 5.5", &e)),
        setsockopt: setsockopt
            .map_err(|e| brief("programs' own options", "Linux 6.1, the oldest tested", &e)),
        kills: kills.map_err(|e| brief("keepalive kills", "Linux 5.14", &e)),
    };
    Ok(Loaded {
        ebpf,
        programs,
        iter_link,
        tracing,
        features,
        tag,
        kill_log,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Load {
            program: name,
            message: "missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| load_error(name, &e))
}

fn prog_fd(
    fd: Result<&ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<ProgramFd, KernelError> {
    fd.map_err(|e| load_error(name, &e))?
        .try_clone()
        .map_err(|e| load_error(name, &e))
}

pub(super) fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::Map {
        map: name,
        message: "missing from the object".into(),
    })
}
