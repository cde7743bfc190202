//! Model files, read safely, and their SHA256.
//!
//! A model path comes from configuration that may be wrong or hostile, so
//! before a byte is read the path must name a regular file (a directory,
//! FIFO, socket or device is refused saying which; a FIFO is opened
//! non-blocking so that opening it cannot hang) no larger than the limit
//! (checked from its metadata, so a 3 GB file is refused without being
//! read). The file is then read once, hashing as it is read, and reading
//! stops at the limit even if the file grows meanwhile.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Default largest model file: 1 GiB (`limits.max_model_mb` in `models.yaml`).
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 1 << 30;

/// Why a model file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("does not exist")]
    Missing(#[source] io::Error),
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {size} bytes, more than the limit of {limit} bytes (limits.max_model_mb)")]
    TooLarge { size: u64, limit: u64 },
    #[error("{0}")]
    Io(io::Error),
}

/// What a non-regular file is, in words.
fn kind_of(m: &Metadata) -> Option<&'static str> {
    let t = m.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    }
}

impl From<io::Error> for FileError {
    fn from(e: io::Error) -> FileError {
        match e.kind() {
            io::ErrorKind::NotFound => FileError::Missing(e),
            _ => FileError::Io(e),
        }
    }
}

/// A regular file's size, if it is one of at most `limit` bytes.
fn size_within(m: &Metadata, limit: u64) -> Result<u64, FileError> {
    if let Some(kind) = kind_of(m) {
        return Err(FileError::NotRegular(kind));
    }
    if m.len() > limit {
        return Err(FileError::TooLarge {
            size: m.len(),
            limit,
        });
    }
    Ok(m.len())
}

/// Checks that `path` (symbolic links followed) is a regular file of at
/// most `limit` bytes, without opening it. Returns its size.
pub fn check_file(path: &Path, limit: u64) -> Result<u64, FileError> {
    size_within(&std::fs::metadata(path)?, limit)
}

/// Opens a regular file of at most `limit` bytes. Opened non-blocking and
/// checked again on the open handle, so a path swapped for a FIFO after
/// [`check_file`] neither hangs nor passes.
fn open_checked(path: &Path, limit: u64) -> Result<File, FileError> {
    check_file(path, limit)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    size_within(&f.metadata()?, limit)?;
    Ok(f)
}

/// Reads at most `limit` bytes in 64 KiB chunks, handing each to `chunk`
/// and the hasher; returns the hex SHA256. More than `limit` bytes (a file
/// that grew after the check) is an error.
fn stream(f: File, limit: u64, mut chunk: impl FnMut(&[u8])) -> Result<String, FileError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut r = f.take(limit.saturating_add(1));
    loop {
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileError::Io(e)),
        };
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(FileError::TooLarge { size: total, limit });
        }
        h.update(&buf[..n]);
        chunk(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hex SHA256 of a regular file of at most `limit` bytes, never holding
/// more than a chunk of it.
pub fn sha256_file_limited(path: &Path, limit: u64) -> Result<String, FileError> {
    stream(open_checked(path, limit)?, limit, |_| {})
}

/// Hex SHA256 of a file (any size up to [`DEFAULT_MAX_MODEL_BYTES`]).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_file_limited(path, DEFAULT_MAX_MODEL_BYTES).map_err(|e| match e {
        FileError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    })
}

/// Reads a whole regular file of at most `limit` bytes, hashing it chunk
/// by chunk as it is read, so the bytes that are verified are exactly the
/// bytes that are then parsed (a file replaced between a hash and a second
/// read cannot slip through).
pub fn read_and_hash(path: &Path, limit: u64) -> Result<(Vec<u8>, String), FileError> {
    let f = open_checked(path, limit)?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(size.min(limit) as usize);
    let sha = stream(f, limit, |c| bytes.extend_from_slice(c))?;
    Ok((bytes, sha))
}

/// Hex SHA256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_bytes_agree_with_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), want);
        assert_eq!(sha256_bytes(b"abc"), want);
        let (bytes, sha) = read_and_hash(&p, 3).unwrap();
        assert_eq!((bytes.as_slice(), sha.as_str()), (&b"abc"[..], want));
    }

    #[test]
    fn oversized_and_non_regular_files_are_refused_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        // a sparse 2 GiB file: refused from its size, nothing read
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(2 << 30).unwrap();
        let e = read_and_hash(&big, 1 << 20).unwrap_err();
        assert!(
            matches!(e, FileError::TooLarge { size, limit } if size == 2 << 30 && limit == 1 << 20),
            "{e}"
        );
        assert!(e.to_string().contains("limits.max_model_mb"), "{e}");

        let e = read_and_hash(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is a directory, not a regular file");

        // a FIFO with no writer: opening it normally would block forever
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_and_hash(&fifo, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is a FIFO (named pipe), not a regular file");

        let e = read_and_hash(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "is a character device, not a regular file");

        let e = read_and_hash(&dir.path().join("absent"), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "does not exist");
    }
}
