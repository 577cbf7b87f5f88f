//! A child process in which `io_uring_setup` fails with EPERM, as under a container's seccomp
//! profile: a three-instruction BPF filter installed between fork and exec
//! (`PR_SET_NO_NEW_PRIVS`, then `seccomp(SECCOMP_SET_MODE_FILTER)`). Every other system call
//! is allowed.
//!
//! ```no_run
//! let mut cmd = std::process::Command::new("qedstream");
//! qedstream_tests::seccomp::deny_io_uring(&mut cmd);
//! ```

use std::os::unix::process::CommandExt;
use std::process::Command;

/// `io_uring_setup`'s number on x86_64 and aarch64 (the generic table).
const NR_IO_URING_SETUP: u32 = 425;

/// The filter: `nr == io_uring_setup` → `SECCOMP_RET_ERRNO | EPERM`, else allow.
fn program() -> [libc::sock_filter; 4] {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // offsetof(struct seccomp_data, nr) == 0
    [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Makes `cmd`'s process refuse `io_uring_setup` with EPERM (the filter is inherited by
/// everything it starts).
pub fn deny_io_uring(cmd: &mut Command) -> &mut Command {
    let filter: &'static mut [libc::sock_filter; 4] = Box::leak(Box::new(program()));
    let (len, address) = (filter.len() as u16, filter.as_mut_ptr() as usize);
    // SAFETY: the closure runs in the child between fork and exec and makes only two system
    // calls (async-signal-safe, no allocation); `address` is the filter leaked above, so it
    // is alive in the child's copy of the address space.
    unsafe { cmd.pre_exec(move || install_filter(len, address)) };
    cmd
}

/// `PR_SET_NO_NEW_PRIVS`, then the filter of `len` instructions at `address` (in the child).
fn install_filter(len: u16, address: usize) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let prog = libc::sock_fprog {
        len,
        filter: address as *mut libc::sock_filter,
    };
    // SAFETY: `prog` lives across the call and points at `len` leaked, valid instructions;
    // the kernel copies the program.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
