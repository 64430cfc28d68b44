//! kad's kernel programs. One copy of each is loaded per daemon; the cgroup programs are
//! attached to a few anchor cgroups (a policy cgroup's parent) and decide per socket from maps.
//!
//! One module per program (or pair of programs), each opening with what it does:
//!
//! - [`sock_ops`]: `kad_sockops`, sets the options on listeners and established connections.
//! - [`setsockopt`]: `kad_setsockopt`, a program's own keepalive options (override, enforce).
//! - [`iter`]: `kad_iter_tcp`, gives existing sockets the policy of their cgroup.
//! - [`cgroup_hooks`]: `kad_mkdir` and `kad_rmdir`, a cgroup's policy by path at creation, and
//!   its entry gone at removal.
//! - [`error_report`]: `kad_error_report`, counts and logs keepalive kills.
//!
//! What they share:
//!
//! - [`maps`]: every map (the daemon finds them by name) and its typed accessors.
//! - [`kernel`]: kernel constants, the struct offsets the daemon hands over, field reads.
//! - [`decide`]: which policy decides for a socket or the current task.
//! - [`options`]: setting a policy's options on a socket; learning HZ.
//! - [`listener`]: what a listener held before kad changed it, and putting it back.
//!
//! What may import what: `kernel` and `maps` import nothing from the crate; `decide` and
//! `options` use only those two; `listener` also uses `options`. The program modules use the
//! shared ones and never each other, so a program's code is its module plus what it imports.
#![no_std]
#![no_main]

mod cgroup_hooks;
mod decide;
mod error_report;
mod iter;
mod kernel;
mod listener;
mod maps;
mod options;
mod setsockopt;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
