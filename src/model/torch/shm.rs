//! Memory a worker shares with one torch host: batches go in and
//! predictions come back through it, not through the pipe. A pipe copies
//! every byte twice through the kernel, and slowly on a virtual machine (a
//! 130 KB batch of 1,000 rows took about 170 µs each way on the 2-core
//! machines this is built on); here the worker writes the rows once and the
//! model reads them in place.
//!
//! It is a `memfd` the worker creates, sealed so that no one can shrink it
//! (`F_SEAL_SHRINK`) or add seals (`F_SEAL_SEAL`): a hostile host could
//! otherwise cut the file under the worker's mapping and kill the worker
//! with SIGBUS on its next access. The host may still write anything into
//! it at any time; the worker reads a reply's length from the pipe, checks
//! it against its own mapping and copies the reply out before parsing it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The smallest region (a batch of 1,000 rows of 100 features fits).
pub const MIN_BYTES: usize = 1 << 20;
/// The largest region (a batch of 100,000 rows of 500 features, and its
/// predictions).
pub const MAX_BYTES: usize = 512 << 20;

/// A shared mapping of a memfd.
pub struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only touched through
// `&self`/`&mut self` methods; calls to one host are serialised by its lock.
unsafe impl Send for Shm {}

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn map(fd: RawFd, len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a new shared mapping of a file this process holds
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(last_error("mmap of the shared batch memory"));
    }
    Ok(ptr.cast())
}

impl Shm {
    /// The worker's side: a new sealed memfd of `len` bytes, mapped.
    pub fn create(len: usize) -> std::io::Result<Shm> {
        // SAFETY: plain descriptor calls; the new descriptor is owned at once
        let fd = unsafe {
            let fd = libc::memfd_create(
                c"ml-worker-torch-batch".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            );
            if fd < 0 {
                return Err(last_error("memfd_create"));
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: as above
        unsafe {
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(last_error("sizing the shared batch memory"));
            }
            if libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            ) != 0
            {
                return Err(last_error("sealing the shared batch memory"));
            }
        }
        let ptr = map(fd.as_raw_fd(), len)?;
        Ok(Shm { fd, ptr, len })
    }

    /// The host's side: the worker's memfd, inherited as descriptor `fd`,
    /// mapped at `len` bytes once [`Shm::resize`] is called.
    ///
    /// # Safety
    /// `fd` must be an open descriptor nothing else owns.
    pub unsafe fn inherit(fd: RawFd) -> Shm {
        Shm {
            fd: OwnedFd::from_raw_fd(fd),
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }

    /// The descriptor, for the host to inherit.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn size(&self) -> usize {
        self.len
    }

    /// Grows the file to `len` bytes if `grow` (the worker), and maps `len`
    /// bytes of it. The host refuses a length past the file's end (the
    /// mapping would fault there).
    pub fn resize(&mut self, len: usize, grow: bool) -> std::io::Result<()> {
        if len == self.len {
            return Ok(());
        }
        if len > MAX_BYTES {
            return Err(std::io::Error::other(format!(
                "{len} bytes of shared batch memory asked for, at most {MAX_BYTES}"
            )));
        }
        // SAFETY: fstat/ftruncate on a descriptor this value owns
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(self.fd.as_raw_fd(), &mut st) != 0 {
                return Err(last_error("fstat of the shared batch memory"));
            }
            // only ever grown (it cannot shrink), and only if it must: the
            // other side may have grown it already
            if (st.st_size as u64) < len as u64 {
                if !grow {
                    return Err(std::io::Error::other(format!(
                        "the shared batch memory has {} bytes, {len} asked for",
                        st.st_size
                    )));
                }
                if libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) != 0 {
                    return Err(last_error("growing the shared batch memory"));
                }
            }
        }
        self.unmap();
        self.ptr = map(self.fd.as_raw_fd(), len)?;
        self.len = len;
        Ok(())
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the mapping this value made, not used after this
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }

    /// Copies `src` to `at`. The caller checked the range.
    pub fn write(&mut self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.len, "shared memory write in range");
        // SAFETY: in range (checked above); `src` is private memory
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) }
    }

    /// A private copy of `len` bytes at `at`, or `None` past the end.
    pub fn read(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        if at.checked_add(len)? > self.len {
            return None;
        }
        let mut out = vec![0u8; len];
        // SAFETY: in range; the other process may write concurrently, which
        // gives garbage bytes but never reads outside the mapping
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), len) };
        Some(out)
    }

    /// `n` `f64`s at byte 0, in place (the host, while the worker waits).
    pub fn f64s(&self, n: usize) -> Option<&[f64]> {
        if n.checked_mul(8)? > self.len {
            return None;
        }
        // SAFETY: in range; a page-aligned mapping is aligned for f64; the
        // worker does not write while a request is being served
        Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<f64>(), n) })
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_region_cannot_be_shrunk_and_grows_for_its_owner() {
        let mut shm = Shm::create(MIN_BYTES).unwrap();
        shm.write(0, &1.5f64.to_le_bytes());
        assert_eq!(shm.f64s(1), Some(&[1.5][..]));
        // what a hostile host would do to fault the worker's mapping
        let shrunk = unsafe { libc::ftruncate(shm.raw_fd(), 4096) };
        assert_ne!(shrunk, 0, "a sealed memfd refuses to shrink");
        let sealed = unsafe { libc::fcntl(shm.raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
        assert_ne!(sealed, 0, "no seal can be added after F_SEAL_SEAL");
        shm.resize(4 * MIN_BYTES, true).unwrap();
        assert_eq!(shm.size(), 4 * MIN_BYTES);
        assert_eq!(shm.read(0, 8).unwrap(), 1.5f64.to_le_bytes());
        assert!(shm.read(4 * MIN_BYTES - 4, 8).is_none());
        assert!(shm.resize(MAX_BYTES + 1, true).is_err());
        // grown past what the owner asks for by the other side: still mapped
        assert_eq!(
            unsafe { libc::ftruncate(shm.raw_fd(), 16 * MIN_BYTES as i64) },
            0
        );
        shm.resize(8 * MIN_BYTES, true).unwrap();
        assert_eq!(shm.size(), 8 * MIN_BYTES);
        // the host's side maps no more than the file holds
        let dup = unsafe { libc::dup(shm.raw_fd()) };
        let mut other = unsafe { Shm::inherit(dup) };
        assert!(other.resize(32 * MIN_BYTES, false).is_err());
        other.resize(4 * MIN_BYTES, false).unwrap();
        assert_eq!(other.f64s(1), Some(&[1.5][..]));
    }
}
