//! The system calls a torch host gives up before it reads a model.
//!
//! A TorchScript file is checked operator by operator ([`super::inspect`])
//! and runs in a process of its own ([`super::host`]); a kernel bug that a
//! hostile model turns into code execution would still run as the worker's
//! user. So once libtorch is initialised (its CPU detection, thread pool
//! and device touched with a small computation), the host installs a
//! seccomp filter on all its threads, before the model's bytes are even
//! parsed. From then on these fail with `EPERM`:
//!
//! - opening, creating, linking, renaming, removing or changing files, and
//!   changing directory or root (`open`, `openat`, `openat2`, `creat`,
//!   `truncate`, `mknod`, ...): the host can only use the pipes it has;
//! - starting programs and processes (`execve`, `execveat`, `fork`,
//!   `vfork`, a `clone` without `CLONE_THREAD`), signalling other
//!   processes (`kill`), reading or writing them (`ptrace`,
//!   `process_vm_*`);
//! - the network (`socket`, `socketpair`, `connect`, `bind`, ...);
//! - side doors around the filter and the kernel's larger surfaces:
//!   `io_uring_*` (its operations bypass seccomp), `bpf`,
//!   `perf_event_open`, `userfaultfd`, the keyring, `mount`.
//!
//! `clone3` fails with `ENOSYS` instead (its flags are behind a pointer a
//! filter cannot read), so the C library falls back to `clone`, whose
//! flags are checked: threads are allowed, processes are not.
//!
//! Where the kernel refuses filters (no seccomp), the host says so on its
//! stderr, which the worker logs as a warning, and runs without one.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// System calls that fail with `EPERM` once the filter is on.
fn denied() -> Vec<i64> {
    let mut v = vec![
        // files
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_truncate,
        libc::SYS_linkat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_symlinkat,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_chdir,
        libc::SYS_fchdir,
        libc::SYS_chroot,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        // processes
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_kill,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        // network
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        // around the filter, and large kernel surfaces
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_link,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_mknod,
        libc::SYS_symlink,
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_lchown,
        libc::SYS_fork,
        libc::SYS_vfork,
    ]);
    v
}

/// The filters, in the order they are installed.
pub struct Filters {
    programs: Vec<BpfProgram>,
}

fn arch() -> Result<seccompiler::TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("no seccomp filter for this architecture: {e:?}"))
}

/// Builds the filters (nothing is installed yet).
pub fn filters() -> Result<Filters, String> {
    let err = |e: seccompiler::BackendError| e.to_string();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied().into_iter().map(|s| (s, Vec::new())).collect();
    // clone: only threads (the flags word, argument 0, has CLONE_THREAD)
    let no_thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .map_err(err)?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![no_thread]).map_err(err)?],
    );
    let eperm = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(err)?;
    let enosys = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(err)?;
    let programs = [eperm, enosys]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(err))
        .collect::<Result<_, _>>()?;
    Ok(Filters { programs })
}

impl Filters {
    /// Installs the filters on every thread of this process (and so on every
    /// thread it starts later). Allocates nothing.
    pub fn apply(&self) -> Result<(), String> {
        for p in &self.programs {
            seccompiler::apply_filter_all_threads(p).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child (the filter must not reach the test harness):
    /// files, processes and sockets are refused; threads still start and
    /// memory is still allocated. Exit code 0: all as expected; else the
    /// number of the failed check.
    #[test]
    fn a_confined_process_opens_nothing_and_starts_nothing_but_threads() {
        let filters = filters().expect("filters build");
        let hostname = c"/etc/hostname";
        let true_bin = c"/bin/true";
        // SAFETY: fork; the child only makes system calls, then _exits
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = (|| unsafe {
                if filters.apply().is_err() {
                    return 1;
                }
                let eperm = || *libc::__errno_location() == libc::EPERM;
                if libc::open(hostname.as_ptr(), libc::O_RDONLY) != -1 || !eperm() {
                    return 2;
                }
                if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) != -1 || !eperm() {
                    return 3;
                }
                let argv = [true_bin.as_ptr(), std::ptr::null()];
                if libc::execv(true_bin.as_ptr(), argv.as_ptr()) != -1 || !eperm() {
                    return 4;
                }
                // fork() is clone (or clone3, which falls back to clone)
                // without CLONE_THREAD
                let child = libc::fork();
                if child == 0 {
                    libc::_exit(0);
                }
                if child != -1 || !eperm() {
                    return 5;
                }
                if libc::kill(libc::getppid(), 0) != -1 || !eperm() {
                    return 6;
                }
                // a thread starts (glibc: clone3 is ENOSYS, clone with
                // CLONE_THREAD passes) and memory is allocated
                extern "C" fn body(_: *mut libc::c_void) -> *mut libc::c_void {
                    std::ptr::null_mut()
                }
                let mut t: libc::pthread_t = 0;
                if libc::pthread_create(&mut t, std::ptr::null(), body, std::ptr::null_mut()) != 0 {
                    return 7;
                }
                libc::pthread_join(t, std::ptr::null_mut());
                let p = libc::malloc(64 << 20);
                if p.is_null() {
                    return 8;
                }
                libc::free(p);
                0
            })();
            // SAFETY: ends the forked child
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: reaps our own child
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check that failed");
    }
}
