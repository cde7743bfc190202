//! The system calls a torch host keeps once it reads a model.
//!
//! A TorchScript file is checked operator by operator ([`super::inspect`])
//! and runs in a process of its own ([`super::host`]); a kernel bug that a
//! hostile model turns into code execution would still run as the worker's
//! user. So once libtorch is initialised (its CPU detection, thread pool
//! and device touched with a small computation), the host installs a
//! seccomp filter on all its threads, before the model's bytes are even
//! parsed. It is an allowlist: what a computation needs (memory, threads,
//! futexes, clocks, reading and writing the descriptors it already has) and
//! nothing else; every other system call fails with `EPERM`. Among those
//! refused: opening, creating, changing or removing files (`openat`,
//! `utimensat`, `*xattr`, `fchmodat2`, ...), starting programs and
//! processes (`execve`, `fork`), signals to other processes (`kill`,
//! `tkill`, `pidfd_*`), reading other processes (`ptrace`,
//! `process_vm_readv`, `pidfd_getfd`), the network, `io_uring`, `bpf`,
//! `userfaultfd`, the keyring, namespaces and mounts, and the system calls
//! added after this list was written. Some of the kept ones are narrowed by
//! their arguments:
//!
//! - `clone` only with `CLONE_THREAD` (threads, not processes); `clone3`
//!   fails with `ENOSYS` instead (its flags are behind a pointer a filter
//!   cannot read), so the C library falls back to `clone`;
//! - `tgkill` only to this process (the C library's `abort` and `raise`);
//! - `newfstatat` and `statx` only on a descriptor (`fstat`), not a path
//!   (`AT_FDCWD`);
//! - `prlimit64` only on this process.
//!
//! Where the kernel refuses filters (no seccomp), the host says so on its
//! stderr, which the worker logs as a warning, and runs without one.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// System calls allowed whatever their arguments.
fn allowed() -> Vec<i64> {
    let mut v = vec![
        // the descriptors the host has: its pipes, stderr, the shared memory
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // memory
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mincore,
        libc::SYS_brk,
        libc::SYS_membarrier,
        // threads and their synchronisation
        libc::SYS_clone3,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_getparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_sched_get_priority_max,
        libc::SYS_sched_get_priority_min,
        libc::SYS_prctl,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_restart_syscall,
        // signals to itself and their handlers
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        // identity, clocks, randomness
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_getcpu,
        libc::SYS_getrandom,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_getrusage,
        libc::SYS_times,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_time,
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

/// Builds the filters for process `pid` (nothing is installed yet).
pub fn filters(pid: u32) -> Result<Filters, String> {
    let err = |e: seccompiler::BackendError| e.to_string();
    let cond = |arg, op| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, 0).map_err(err);
    let rule = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(err);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed().into_iter().map(|s| (s, Vec::new())).collect();
    // clone: only threads (the flags word, argument 0, has CLONE_THREAD)
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(err)?;
    rules.insert(libc::SYS_clone, vec![rule(vec![thread])?]);
    // signals only to this process's threads
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(pid),
        )
        .map_err(err)?])?],
    );
    // stat of a descriptor, not of a path
    let not_cwd = || {
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            u64::from(libc::AT_FDCWD as u32),
        )
        .map_err(err)
    };
    rules.insert(libc::SYS_newfstatat, vec![rule(vec![not_cwd()?])?]);
    rules.insert(libc::SYS_statx, vec![rule(vec![not_cwd()?])?]);
    // limits of this process only
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq)?])?],
    );
    let eperm = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
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
    // the allowlist last: it refuses `seccomp` itself
    let programs = [enosys, eperm]
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
        // no tgkill allowed to anyone here: the child's pid is not known yet
        let filters = filters(0).expect("filters build");
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
                let parent = libc::getppid();
                if libc::syscall(libc::SYS_tgkill, parent, parent, 0) != -1 || !eperm() {
                    return 9;
                }
                if libc::syscall(libc::SYS_tkill, parent, 0) != -1 || !eperm() {
                    return 10;
                }
                if libc::syscall(libc::SYS_pidfd_open, parent, 0) != -1 || !eperm() {
                    return 11;
                }
                // a file's times, attributes, existence: all refused
                if libc::utimensat(libc::AT_FDCWD, hostname.as_ptr(), std::ptr::null(), 0) != -1
                    || !eperm()
                {
                    return 12;
                }
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(hostname.as_ptr(), &mut st) != -1 || !eperm() {
                    return 13;
                }
                if libc::unshare(libc::CLONE_NEWUSER) != -1 || !eperm() {
                    return 14;
                }
                // ... but a descriptor's own stat works
                if libc::fstat(2, &mut st) != 0 {
                    return 15;
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
