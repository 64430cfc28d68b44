//! Small facts about the running system.
use std::ffi::CStr;

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return "unknown".into();
    }
    unsafe { CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Raises the soft limit on open files to the hard limit (capped by `fs.nr_open`, which an
/// unlimited hard limit exceeds); returns the soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let target = limit.rlim_max.min(nr_open);
    if limit.rlim_cur < target {
        limit.rlim_cur = target;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// The oldest kernel kad works on: `bpf_setsockopt` from sock_ops accepts `SO_KEEPALIVE` and
/// `TCP_KEEPIDLE`/`INTVL`/`CNT` since 5.9.
pub const MIN_KERNEL: (u32, u32) = (5, 9);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel {release} is too old: kad needs Linux {}.{} or later (for bpf_setsockopt of the \
         keepalive options from sock_ops)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    TooOld { release: String },
    #[error("cannot tell the kernel version from its release {release:?}")]
    Unparsable { release: String },
}

/// (major, minor) from a release such as `6.1.0-56-amd64` or `5.10.262`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Refuses a kernel older than [`MIN_KERNEL`]: there the program would load and attach, and
/// then fail to set anything on every connection.
pub fn check_kernel(release: &str) -> Result<(), KernelError> {
    match kernel_version(release) {
        Some(version) if version >= MIN_KERNEL => Ok(()),
        Some(_) => Err(KernelError::TooOld {
            release: release.into(),
        }),
        None => Err(KernelError::Unparsable {
            release: release.into(),
        }),
    }
}

/// Keeps the big, short-lived buffers (a reply of megabytes for thousands of policies) out of
/// the heap: glibc raises its mmap threshold after each such buffer is freed, and the heap it
/// then uses for them stays resident. A fixed threshold maps and unmaps them.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: a documented parameter and value; mallopt takes the allocator's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Gives the allocator's free pages back to the kernel: after the start, whose parsing of the
/// kernel's BTF and of the programs (megabytes, freed at once) happens on the state thread,
/// whose heap glibc does not trim by itself, and after building a big reply.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments to check; glibc walks its own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.10.262"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("2.6.78"), Some((2, 6)));
        assert_eq!(kernel_version("6"), None);
        assert_eq!(kernel_version("unknown"), None);
    }

    #[test]
    fn minimum() {
        assert!(check_kernel("5.9.0").is_ok());
        assert!(check_kernel("5.10.0-46-amd64").is_ok());
        assert!(check_kernel("6.18.44").is_ok());
        let err = check_kernel("5.8.18-1-amd64").unwrap_err().to_string();
        assert!(
            err.contains("5.8.18-1-amd64") && err.contains("5.9"),
            "{err}"
        );
        assert!(check_kernel("4.19.0").is_err());
        assert!(check_kernel("unknown").is_err());
    }
}
