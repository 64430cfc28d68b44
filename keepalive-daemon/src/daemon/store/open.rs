//! Opening the state directory's files: never through a symbolic link (`O_NOFOLLOW`), and only
//! regular files (checked with `fstat` on what was opened, which `O_NONBLOCK` makes sure
//! returns at once: a FIFO put in a file's place cannot hang the daemon; a file under a lease
//! is waited for, as before).
use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

/// Opens `path` with `options`, refusing a symbolic link and anything but a regular file.
pub(super) fn open(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let opened = options
        .clone()
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let file = match opened {
        // Only a regular file can hold a lease (F_SETLEASE), which makes a non-blocking open
        // fail at once: wait for its holder as a plain open does.
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => options
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path),
        other => other,
    }
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::other(
            "it is a symbolic link (kad does not follow links in its state directory)",
        ),
        _ => e,
    })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(io::Error::other(format!(
            "it is {what}, not a regular file"
        )));
    }
    Ok(file)
}

/// The text of the regular file at `path`; `None` if there is none.
pub(super) fn read(path: &Path) -> io::Result<Option<String>> {
    let mut file = match open(path, OpenOptions::new().read(true)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{ffi::CString, fs};

    #[test]
    fn links_fifos_and_directories_are_refused() {
        let dir = std::env::temp_dir().join(format!("kad-store-open-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let regular = dir.join("regular");
        fs::write(&regular, "x").unwrap();
        assert_eq!(read(&regular).unwrap().as_deref(), Some("x"));
        assert_eq!(read(&dir.join("missing")).unwrap(), None);
        // A dangling link is not followed: nothing is created at its target.
        let target = dir.join("target");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open(&link, OpenOptions::new().append(true).create(true)).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!target.exists(), "the link's target was not created");
        let err = read(&link).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // A FIFO is refused at once, not waited on.
        let fifo = dir.join("fifo");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read(&fifo).unwrap_err();
        assert!(
            err.to_string().contains("a FIFO, not a regular file"),
            "{err}"
        );
        let err = read(&dir).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
