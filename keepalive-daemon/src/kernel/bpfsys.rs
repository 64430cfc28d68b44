//! The few `bpf(2)` commands aya 0.14 does not expose for what kad needs: creating cgroup links
//! whose fd kad keeps, replacing a link's program in place (upgrades), opening an iterator
//! from a link (once per network namespace), and reading a link's program and cgroup.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_LINK_CREATE: i64 = 28;
const BPF_LINK_UPDATE: i64 = 29;
const BPF_ITER_CREATE: i64 = 33;
const BPF_PROG_QUERY: i64 = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
// enum bpf_attach_type (include/uapi/linux/bpf.h).
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
const BPF_TRACE_ITER: u32 = 28;

/// Where a cgroup program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CgroupHook {
    SockOps,
    SetSockopt,
}

impl CgroupHook {
    pub const ALL: [CgroupHook; 2] = [CgroupHook::SockOps, CgroupHook::SetSockopt];

    fn attach_type(self) -> u32 {
        match self {
            CgroupHook::SockOps => BPF_CGROUP_SOCK_OPS,
            CgroupHook::SetSockopt => BPF_CGROUP_SETSOCKOPT,
        }
    }

    /// The name of its pin in an anchor's directory.
    pub fn pin_name(self) -> &'static str {
        match self {
            CgroupHook::SockOps => "sock_ops",
            CgroupHook::SetSockopt => "setsockopt",
        }
    }

    pub fn from_pin_name(name: &str) -> Option<CgroupHook> {
        CgroupHook::ALL.into_iter().find(|h| h.pin_name() == name)
    }
}

/// The `bpf_attr` union is 144 bytes on current kernels; commands read their own prefix and
/// the kernel checks that the rest is zero.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn u32_at(&mut self, offset: usize, value: u32) -> &mut Attr {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, offset: usize, value: u64) -> &mut Attr {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
}

fn bpf(cmd: i64, attr: &mut Attr, size: usize) -> io::Result<i64> {
    // SAFETY: attr points to `size` readable and writable bytes that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn fd_result(cmd: i64, attr: &mut Attr, size: usize) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr, size)?;
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Attaches a cgroup program through a new link (the link lives while its fd or a pin does).
pub fn link_cgroup(prog: BorrowedFd, cgroup: BorrowedFd, hook: CgroupHook) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(4, cgroup.as_raw_fd() as u32)
        .u32_at(8, hook.attach_type());
    fd_result(BPF_LINK_CREATE, &mut attr, 16)
}

/// A link for an iterator program; `iter_create` opens an iterator from it.
pub fn link_iter(prog: BorrowedFd) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(8, BPF_TRACE_ITER);
    fd_result(BPF_LINK_CREATE, &mut attr, 16)
}

/// Attaches a tp_btf program (its tracepoint was named at load time).
pub fn link_raw_tracepoint(prog: BorrowedFd) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u64_at(0, 0).u32_at(8, prog.as_raw_fd() as u32);
    fd_result(BPF_RAW_TRACEPOINT_OPEN, &mut attr, 16)
}

/// Replaces the program behind a link, atomically: no socket sees neither.
pub fn link_update(link: BorrowedFd, prog: BorrowedFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32_at(0, link.as_raw_fd() as u32)
        .u32_at(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr, 16).map(|_| ())
}

/// A new iterator over the link's program, walking the network namespace of the calling
/// thread.
pub fn iter_create(link: BorrowedFd) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, link.as_raw_fd() as u32);
    fd_result(BPF_ITER_CREATE, &mut attr, 8)
}

pub fn pin(fd: BorrowedFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, path.as_ptr() as u64)
        .u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr, 16).map(|_| ())
}

pub fn get_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, path.as_ptr() as u64);
    fd_result(BPF_OBJ_GET, &mut attr, 16)
}

/// What the kernel says of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub prog_id: u32,
    /// For cgroup links: the cgroup id, 0 once the cgroup is gone.
    pub cgroup_id: u64,
}

pub fn link_info(link: BorrowedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union { ... cgroup { u64 cgroup_id; ... } } }
    let mut info = [0u64; 16];
    let mut attr = Attr::new();
    attr.u32_at(0, link.as_raw_fd() as u32)
        .u32_at(4, std::mem::size_of_val(&info) as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, 16)?;
    Ok(LinkInfo {
        prog_id: (info[1] & 0xffff_ffff) as u32,
        cgroup_id: info[2],
    })
}

/// The ids of the programs that run for `cgroup` at `hook`: its own and its ancestors'.
pub fn effective_programs(cgroup: BorrowedFd, hook: CgroupHook) -> io::Result<Vec<u32>> {
    // union bpf_attr's query: { u32 target_fd, attach_type, query_flags, attach_flags;
    // u64 prog_ids; u32 prog_cnt; }, the fields every kernel since 4.15 knows.
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = Attr::new();
        attr.u32_at(0, cgroup.as_raw_fd() as u32)
            .u32_at(4, hook.attach_type())
            .u32_at(8, BPF_F_QUERY_EFFECTIVE)
            .u64_at(16, ids.as_mut_ptr() as u64)
            .u32_at(24, ids.len() as u32);
        let result = bpf(BPF_PROG_QUERY, &mut attr, 32);
        let count = u32::from_ne_bytes([attr.0[24], attr.0[25], attr.0[26], attr.0[27]]) as usize;
        match result {
            // More programs than room: the kernel says how many; ask again with that much.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() => {
                ids = vec![0u32; count];
            }
            Err(e) => return Err(e),
            Ok(_) => {
                ids.truncate(count.min(ids.len()));
                return Ok(ids);
            }
        }
    }
}

/// The first 256 bytes of the `struct bpf_prog_info` of the program held by fd
/// (`{ u32 type, id; u8 tag[8]; ... char name[16] at 64; ... }`).
fn prog_info(prog: BorrowedFd) -> io::Result<[u8; 256]> {
    let mut info = [0u8; 256];
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(4, info.len() as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, 16)?;
    Ok(info)
}

fn prog_by_id(prog_id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog_id);
    fd_result(BPF_PROG_GET_FD_BY_ID, &mut attr, 12)
}

/// The name the program with this id was loaded with.
pub fn prog_name(prog_id: u32) -> io::Result<String> {
    let info = prog_info(prog_by_id(prog_id)?.as_fd())?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// The id of the program held by fd.
pub fn prog_id_of(prog: BorrowedFd) -> io::Result<u32> {
    let info = prog_info(prog)?;
    Ok(u32::from_ne_bytes([info[4], info[5], info[6], info[7]]))
}

/// The tag (a hash of the instructions) of the program with this id, as hex.
pub fn prog_tag(prog_id: u32) -> io::Result<String> {
    prog_tag_of(prog_by_id(prog_id)?.as_fd())
}

/// The tag of a program held by fd.
pub fn prog_tag_of(prog: BorrowedFd) -> io::Result<String> {
    let info = prog_info(prog)?;
    Ok(info[8..16].iter().map(|b| format!("{b:02x}")).collect())
}
